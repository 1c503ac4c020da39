"""results/REPORT.md and results/report.html from the store.

Sections, in order: efficiency (tables with speed/memory ratios against the reference
Transformers, plots vs length), training results (harness/report_train.py), byte-level language
modelling (bits per byte by position, harness/report_lm.py), ablation sweeps
(harness/report_ablation.py), optuna studies (harness/report_optuna.py), provenance of every row,
and links to the committed reference runs. Both files are rendered from one list of blocks
(harness/report_doc.py); report.html is self-contained (inline CSS, PNGs as data URIs).

Ratios: speed x = ms(reference) / ms(model), memory x = peak(reference) / peak(model), at the same
L and backbone group (> 1: the model is faster / smaller).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.plots import plot_vs_length
from harness.report_ablation import ablation_sections
from harness.report_doc import (
    Block,
    Bullets,
    Heading,
    Image,
    Images,
    Table,
    Text,
    render_html,
    render_markdown,
    table_markdown,
)
from harness.report_efficiency import (
    check_text,
    efficiency_report,
    label_config_variants,
    normalised,
    reference_ratios,
)
from harness.report_lm import lm_sections
from harness.report_optuna import optuna_sections
from harness.report_train import load_runs, slug, training_sections
from harness.store import Store

GROUP_KEYS = ["device", "dtype", "compile", "cuda_graph", "batch", "d_model", "n_layers", "d_ffn",
              "n_heads", "head"]
TITLE = "longvq-bench report"
PROVENANCE_FIELDS = {"device": "device", "torch": "torch", "cuda": "CUDA", "driver": "driver",
                     "python": "python", "git_commit": "commit", "tf32": "TF32"}


def add_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Speed x and memory x of each row against each reference model at the same L and group
    (``reference_ratios``): speed x = ms(reference) / ms(model); memory x = peak(reference) /
    peak(model); > 1 means the model is faster / smaller. Empty where either did not finish."""
    return reference_ratios(frame, [k for k in GROUP_KEYS if k in frame] + ["seq_len"])


def _fmt(value: object, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def efficiency_rows(frame: pd.DataFrame) -> Table:
    """One row per (model, L), failures shown with their status."""
    columns = ["model", "backend", "seq_len", "status", "ms_median", "tokens_per_s",
               "peak_mem_mib", "params", "speed_x_vanilla", "mem_x_vanilla", "speed_x_sdpa",
               "mem_x_sdpa"]
    header = ["model", "backend", "L", "status", "ms/step", "tokens/s", "peak MiB", "params",
              "speed × vanilla", "mem × vanilla", "speed × sdpa", "mem × sdpa"]
    table = Table(header, [])
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
        table.rows.append(cells)
    return table


def efficiency_table(frame: pd.DataFrame) -> str:
    """The efficiency table as Markdown."""
    return table_markdown(efficiency_rows(frame))


def build_report(store: Store, out_dir: Path) -> Path:
    """Write ``out_dir/REPORT.md``, ``out_dir/report.html`` and the plots under
    ``out_dir/plots``; return the path of REPORT.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks: list[Block] = [Heading(1, TITLE), Text(
        f"Generated from the store `{store.url}`. Regenerate with `python run_bench.py report`.")]
    frame = store.dataframe("efficiency")
    if frame.empty:
        blocks.append(Text("No efficiency rows in the store yet: run "
                           "`python run_bench.py efficiency`."))
    else:
        blocks += efficiency_report(frame, out_dir, efficiency_sections)  # + preset rows
    train = load_runs(store, "train")
    if train.empty:
        blocks.append(Text("No training rows in the store yet: run `python run_bench.py train` "
                           "or `python run_bench.py sweep`."))
    else:
        blocks += training_sections(train, out_dir)
        blocks += lm_sections(store, out_dir)
    runs = [r for r in (train, load_runs(store, "efficiency")) if not r.empty]
    if runs:
        blocks += ablation_sections(pd.concat(runs, ignore_index=True), out_dir)
    blocks += optuna_sections(store, out_dir)
    blocks += provenance_section(store.dataframe())
    blocks += reference_runs(out_dir)
    path = out_dir / "REPORT.md"
    path.write_text(render_markdown(blocks))
    (out_dir / "report.html").write_text(render_html(blocks, TITLE))
    return path


def efficiency_sections(frame: pd.DataFrame, out_dir: Path) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Efficiency"), Text(
        "Training steps (forward + backward + AdamW) on random tokens; median over the timed "
        "steps after warm-up. Peak memory is allocated memory (CUDA: max_memory_allocated; "
        "CPU: resident tensors + resident-set growth during one step). Ratios compare with the "
        "reference model at the same L in the same group (> 1: faster / smaller).")]
    frame = normalised(frame)
    keys = [k for k in GROUP_KEYS if k in frame]
    for group, rows in frame.groupby(keys, dropna=False, sort=True):
        desc = ", ".join(f"{k}={v}" for k, v in zip(keys, group, strict=True))
        rows = add_ratios(label_config_variants(rows, shared=keys))
        blocks += [Heading(3, desc), efficiency_rows(rows), Text(check_text(rows))]
        paths = plot_vs_length(rows, out_dir / "plots", desc, stem=slug(desc) + "_")
        if paths:
            blocks.append(Images([Image(p, f"plots/{p.name}", p.stem) for p in paths]))
        failures = rows[rows["status"] != "ok"]
        if not failures.empty:
            blocks.append(Bullets([f"`{row['model']}` L={row['seq_len']}: **{row['status']}** "
                                   f"— {str(row['message'])[:200]}"
                                   for _, row in failures.iterrows()]))
        prov = rows.iloc[-1]
        blocks.append(Text(
            f"Provenance: device `{prov.get('device')}`, torch {prov.get('torch')}, "
            f"CUDA {prov.get('cuda') or '-'}, TF32 {prov.get('tf32')}, "
            f"commit {prov.get('git_commit')}, last row {prov.get('timestamp')}."))
    return blocks


def provenance_section(frame: pd.DataFrame) -> list[Block]:
    """Where every row of the store was measured: distinct values with their row counts."""
    if frame.empty:
        return []
    table = Table(["field", "values (rows)"], [])
    for column, label in PROVENANCE_FIELDS.items():
        if column not in frame:
            continue
        values = frame[column].map(lambda v: "-" if v is None or v == "" or pd.isna(v) else v)
        counts = values.astype(str).value_counts()
        table.rows.append([label, "; ".join(f"`{v}` ({n})" for v, n in counts.items())])
    times = frame["timestamp"] if "timestamp" in frame else frame["updated_at"]
    times = times.dropna().astype(str)
    kinds = frame["kind"].value_counts()
    table.rows.append(["rows", "; ".join(f"{k} ({n})" for k, n in kinds.items())])
    if not times.empty:
        table.rows.append(["time span (UTC)", f"{times.min()} … {times.max()}"])
    return [Heading(2, "Provenance"), Text("Every row of the store, any kind: the distinct "
                                           "values of each provenance field."), table]


def reference_runs(out_dir: Path) -> list[Block]:
    """Links to committed reference runs (sub-folders of results/ with their own REPORT.md)."""
    found = sorted(p for p in out_dir.glob("*/REPORT.md"))
    if not found:
        return []
    items = []
    for path in found:
        name = path.parent.name
        html = f" ([html]({name}/report.html))" if (path.parent / "report.html").exists() else ""
        items.append(f"[{name}]({name}/REPORT.md){html}")
    return [Heading(2, "Committed reference runs"), Bullets(items)]
