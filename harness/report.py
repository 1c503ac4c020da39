"""results/REPORT.md from the store: efficiency tables with ratios, plots, provenance."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from harness.plots import plot_vs_length
from harness.store import Store

REFERENCES = ("transformer_vanilla", "transformer_sdpa")
GROUP_KEYS = ["device", "dtype", "batch", "d_model", "n_layers", "d_ffn", "n_heads", "head"]


def add_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Speed x and memory x of each row against each reference model at the same L and group.

    speed x = ms(reference) / ms(model); memory x = peak(reference) / peak(model); > 1 means the
    model is faster / smaller. Empty where the reference did not finish at that length.
    """
    frame = frame.copy()
    keys = [k for k in GROUP_KEYS if k in frame] + ["seq_len"]
    ok = frame[frame["status"] == "ok"]
    for ref in REFERENCES:
        short = ref.removeprefix("transformer_")
        base = ok[ok["model"] == ref][keys + ["ms_median", "peak_mem_mib"]]
        base = base.rename(columns={"ms_median": "_ref_ms", "peak_mem_mib": "_ref_mem"})
        merged = frame.merge(base, on=keys, how="left")
        frame[f"speed_x_{short}"] = (merged["_ref_ms"] / merged["ms_median"]).to_numpy()
        frame[f"mem_x_{short}"] = (merged["_ref_mem"] / merged["peak_mem_mib"]).to_numpy()
    return frame


def _fmt(value: object, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def efficiency_table(frame: pd.DataFrame) -> str:
    """A markdown table, one row per (model, L), failures shown with their status."""
    columns = ["model", "backend", "seq_len", "status", "ms_median", "tokens_per_s",
               "peak_mem_mib", "params", "speed_x_vanilla", "mem_x_vanilla", "speed_x_sdpa",
               "mem_x_sdpa"]
    header = ["model", "backend", "L", "status", "ms/step", "tokens/s", "peak MiB", "params",
              "speed × vanilla", "mem × vanilla", "speed × sdpa", "mem × sdpa"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in frame.sort_values(["seq_len", "model"]).iterrows():
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "tokens_per_s" and isinstance(value, float) and not pd.isna(value):
                cells.append(f"{value:,.0f}")
            elif column.startswith(("speed_x", "mem_x")):
                cells.append(_fmt(value, 2) + ("×" if _fmt(value) else ""))
            elif column == "params" and value is not None and not pd.isna(value):
                cells.append(f"{int(value):,}")
            else:
                cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:60]


def build_report(store: Store, out_dir: Path) -> Path:
    """Write ``out_dir/REPORT.md`` (and its plots under ``out_dir/plots``); return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = store.dataframe("efficiency")
    lines = ["# longvq-bench report", "",
             f"Generated from the store `{store.url}`. Regenerate with "
             "`python run_bench.py report`.", ""]
    if frame.empty:
        lines += ["No efficiency rows in the store yet: run `python run_bench.py efficiency`.", ""]
    else:
        lines += efficiency_sections(frame, out_dir)
    lines += reference_runs(out_dir)
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def efficiency_sections(frame: pd.DataFrame, out_dir: Path) -> list[str]:
    lines = ["## Efficiency", "",
             "Training steps (forward + backward + AdamW) on random tokens; median over the timed "
             "steps after warm-up. Peak memory is allocated memory (CUDA: max_memory_allocated; "
             "CPU: resident tensors + profiler allocation peak). Ratios compare with the "
             "reference model at the same L in the same group (> 1: faster / smaller).", ""]
    frame = add_ratios(frame)
    keys = [k for k in GROUP_KEYS if k in frame]
    for group, rows in frame.groupby(keys, dropna=False, sort=True):
        desc = ", ".join(f"{k}={v}" for k, v in zip(keys, group, strict=True))
        lines += [f"### {desc}", ""]
        lines += [efficiency_table(rows), ""]
        plot_dir = out_dir / "plots"
        for path in plot_vs_length(rows, plot_dir, desc, stem=_slug(desc) + "_"):
            lines.append(f"![{path.stem}](plots/{path.name})")
        lines.append("")
        failures = rows[rows["status"] != "ok"]
        for _, row in failures.iterrows():
            lines.append(f"- `{row['model']}` L={row['seq_len']}: **{row['status']}** "
                         f"— {str(row['message'])[:200]}")
        prov = rows.iloc[-1]
        lines += ["", f"Provenance: device `{prov.get('device')}`, torch {prov.get('torch')}, "
                  f"CUDA {prov.get('cuda') or '-'}, TF32 {prov.get('tf32')}, "
                  f"commit {prov.get('git_commit')}, last row {prov.get('timestamp')}.", ""]
    return lines


def reference_runs(out_dir: Path) -> list[str]:
    """Links to committed reference runs (sub-folders of results/ with their own REPORT.md)."""
    found = sorted(p for p in out_dir.glob("*/REPORT.md"))
    if not found:
        return []
    lines = ["## Committed reference runs", ""]
    for path in found:
        lines.append(f"- [{path.parent.name}]({path.parent.name}/REPORT.md)")
    return lines + [""]
