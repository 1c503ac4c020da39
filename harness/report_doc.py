"""The report as a list of blocks, rendered twice: REPORT.md and one self-contained report.html.

Sections build :class:`Heading`, :class:`Text`, :class:`Table`, :class:`Images` and
:class:`Bullets` blocks instead of Markdown strings, so both files come from the same content and
the HTML needs no Markdown parser. Inline text may use three Markdown marks, converted for HTML:
backquoted code, ``**bold**`` and ``[label](relative/link)``.

report.html opens offline: the CSS is inline and every PNG is embedded as a
``data:image/png;base64`` URI, so the file can be mailed or attached on its own.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    level: int  # 1 = title, 2 = section (listed in the contents), 3+ = subsection
    text: str


@dataclass
class Text:
    text: str  # one paragraph


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Image:
    path: Path  # the PNG on disk
    rel: str  # its path relative to the report's folder (for REPORT.md)
    alt: str


@dataclass
class Images:
    images: list[Image] = field(default_factory=list)  # shown side by side in the HTML


@dataclass
class Bullets:
    items: list[str]


Block = Heading | Text | Table | Images | Bullets


def anchor_ids(blocks: list[Block]) -> dict[int, str]:
    """GitHub-style anchors (lowercase, punctuation dropped, spaces -> '-', '-1' on repeats)."""
    seen: dict[str, int] = {}
    ids: dict[int, str] = {}
    for i, block in enumerate(blocks):
        if not isinstance(block, Heading):
            continue
        plain = re.sub(r"[`*]", "", block.text).lower()
        slug = re.sub(r"[^\w\- ]", "", plain).strip().replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids[i] = slug if count == 0 else f"{slug}-{count}"
    return ids


def _contents(blocks: list[Block]) -> list[tuple[str, str]]:
    ids = anchor_ids(blocks)
    return [(b.text, ids[i]) for i, b in enumerate(blocks)
            if isinstance(b, Heading) and b.level == 2]


# -- Markdown -------------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |",
             "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    contents = _contents(blocks)
    for i, block in enumerate(blocks):
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
            if i == 0 and block.level == 1 and len(contents) > 1:
                lines += [f"- [{text}](#{slug})" for text, slug in contents] + [""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Table):
            if block.caption:
                lines += [block.caption, ""]
            lines += [table_markdown(block), ""]
        elif isinstance(block, Images):
            lines += [f"![{image.alt}]({image.rel})" for image in block.images] + [""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
    return "\n".join(lines).rstrip() + "\n"


# -- HTML -----------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em 4em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.6em; } h4 { margin-top: 1.2em; }
code { background: #f6f8fa; padding: .1em .3em; border-radius: 4px; font-size: 90%; }
.scroll { overflow-x: auto; margin: .6em 0 1em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; } tr:nth-child(even) td { background: #fafbfc; }
td:first-child, th:first-child { text-align: left; }
.caption { font-size: 13px; color: #57606a; margin-bottom: .2em; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; min-width: 320px; }
figure img { width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { font-size: 12px; color: #57606a; }
nav ul { columns: 2; }
"""


def inline_html(text: str) -> str:
    """Escape, then turn the three inline Markdown marks the sections use into HTML."""
    out = html.escape(str(text))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)
    return out


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure_style(path: Path) -> str:
    """Never wider than the PNG itself; narrow plots share a row, wide ones take their own."""
    header = path.read_bytes()[:24]
    width = int.from_bytes(header[16:20], "big") if header[:8] == b"\x89PNG\r\n\x1a\n" else 640
    basis = width if width > 900 else 480
    return f"flex: 1 1 {basis}px; max-width: {width}px"


def render_html(blocks: list[Block], title: str) -> str:
    ids = anchor_ids(blocks)
    contents = _contents(blocks)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>"]
    for i, block in enumerate(blocks):
        if isinstance(block, Heading):
            level = min(block.level, 6)
            parts.append(f'<h{level} id="{ids[i]}">{inline_html(block.text)}</h{level}>')
            if i == 0 and block.level == 1 and len(contents) > 1:
                items = "".join(f'<li><a href="#{slug}">{inline_html(text)}</a></li>'
                                for text, slug in contents)
                parts.append(f"<nav><ul>{items}</ul></nav>")
        elif isinstance(block, Text):
            parts.append(f"<p>{inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            if block.caption:
                parts.append(f'<div class="caption">{inline_html(block.caption)}</div>')
            head = "".join(f"<th>{inline_html(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                         f"<tbody>{body}</tbody></table></div>")
        elif isinstance(block, Images):
            figures = "".join(
                f'<figure style="{_figure_style(image.path)}">'
                f'<img src="{_data_uri(image.path)}" alt="{html.escape(image.alt)}">'
                f"<figcaption>{html.escape(image.alt)}</figcaption></figure>"
                for image in block.images)
            parts.append(f'<div class="figures">{figures}</div>')
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{inline_html(item)}</li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
