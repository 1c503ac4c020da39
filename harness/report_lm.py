"""Byte-level language modelling in the report: bits per byte, overall and by context position.

Train rows whose result holds ``test_bpb`` (the ``lm-bytes`` task, harness/tasks/lm_bytes.py)
are grouped per task into configurations as in harness/report_train.py (every setting except the
seed). Per configuration, over the seeds that finished ``ok``: test bits per byte (the weights
selected by val loss) as mean ± sample std, the mean of each position bucket (0-1K, 1K-4K,
4K-16K, 16K-64K, 64K+: those the length reaches), tokens/s and peak memory (as recorded by
harness/train.py: CUDA max allocated, or CPU resident tensors) and the parameter count. Runs with
an ``eval_seq_len`` get a second table, the same weights tested at that longer length.

The plot draws bits per byte against the position in the window (log-spaced bins of
``test_bpb_profile``, averaged over seeds), one line per configuration: solid at the training
length, dashed (same colour) at the evaluation length when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness.plots import DPI  # noqa: E402
from harness.report_doc import Block, Bullets, Heading, Images, Table, Text  # noqa: E402
from harness.report_train import (  # noqa: E402
    SHARED_MARK,
    SHARED_NOTE,
    _image,
    _value_text,
    fmt_num,
    fmt_pm,
    key_fields,
    load_runs,
    mean_std,
    shared,
    slug,
)
from harness.store import Store  # noqa: E402
from harness.tasks.lm_bytes import BUCKETS  # noqa: E402

MAX_KEY_FIELDS = 4
# result fields read per prefix: "test_" (training length) and "test_long_" (eval_seq_len)
PREFIXES = {"test_": "training length L",
            "test_long_": "evaluation length (eval_seq_len; the same weights)"}


def lm_runs(store: Store) -> pd.DataFrame:
    """report_train's train runs (no tuning trials) of the tasks that record bits per byte, with
    the bpb fields of their results: ``bpb``/``buckets``/``profile`` per prefix."""
    runs = load_runs(store, "train")
    if runs.empty:
        return runs
    runs = runs[runs["tune_space"].isna()]
    results = {row["cell_key"]: json.loads(row["result"]) for row in store.records("train")}
    lm_tasks = {task for task, key in zip(runs["task"], runs["cell_key"], strict=True)
                if "test_bpb" in results.get(key, {})}
    runs = runs[runs["task"].isin(lm_tasks)].copy()
    # TrainConfig.to_dict leaves eval_seq_len out when 0; put it back so it can be a key field
    runs["config"] = [{**c, "eval_seq_len": c.get("eval_seq_len", 0)} for c in runs["config"]]
    for prefix in PREFIXES:
        result = [results.get(key, {}) for key in runs["cell_key"]]
        runs[f"{prefix}bpb"] = [float(r.get(f"{prefix}bpb", np.nan)) for r in result]
        runs[f"{prefix}buckets"] = [r.get(f"{prefix}bpb_buckets") or {} for r in result]
        runs[f"{prefix}profile"] = [r.get(f"{prefix}bpb_profile") or [] for r in result]
        runs[f"{prefix}status"] = [r.get(f"{prefix}status", "") for r in result]
        runs[f"{prefix}message"] = [r.get(f"{prefix}message", "") for r in result]
    runs["params"] = [results.get(key, {}).get("params") for key in runs["cell_key"]]
    return runs


def _bucket_labels(rows: pd.DataFrame, column: str) -> list[str]:
    present = {label for buckets in rows[column] for label in buckets}
    return [label for label, _, _ in BUCKETS if label in present]


def mean_profile(profiles: list[list[list[float]]]) -> list[tuple[float, float]]:
    """(bin centre, bpb mean over seeds) for the profiles sharing the first one's bins."""
    profiles = [p for p in profiles if p]
    if not profiles:
        return []
    bins = [(lo, hi) for lo, hi, _ in profiles[0]]
    same = [p for p in profiles if [(lo, hi) for lo, hi, _ in p] == bins]
    values = np.nanmean(np.array([[v for _, _, v in p] for p in same], dtype=np.float64), axis=0)
    return [((lo + hi - 1) / 2, float(v)) for (lo, hi), v in zip(bins, values, strict=True)]


def plot_bpb_vs_position(lines: dict[str, dict[str, list[tuple[float, float]]]], path: Path,
                         title: str) -> Path:
    """Bits per byte against window position (log x), one colour per label; ``lines[label]``
    maps ``"train"``/``"eval"`` (solid/dashed) to (position, bpb) points."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    palette = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    for i, (label, styles) in enumerate(lines.items()):
        color = palette(i % palette.N)
        for style, points in styles.items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(np.array(xs) + 1, ys, color=color, lw=1.0,
                    ls="-" if style == "train" else "--",
                    label=label if style == "train" else f"{label} (eval length)")
    for _, lo, _ in BUCKETS[1:]:
        if ax.has_data() and lo < ax.get_xlim()[1]:
            ax.axvline(lo + 1, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window + 1 (log scale; dotted: 1K, 4K, 16K, 64K)")
    ax.set_ylabel("bits per byte (test)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _config_label(first: pd.Series, fields: list[str]) -> str:
    return " ".join([first["model"], f"L={first['config'].get('seq_len')}",
                     *(f"{f}={_value_text(first['config'].get(f))}" for f in fields)])


def lm_sections(store: Store, out_dir: Path) -> list[Block]:
    runs = lm_runs(store)
    if runs.empty:
        return []
    blocks: list[Block] = [Heading(2, "Byte-level language modelling"), Text(
        "Bits per byte (cross-entropy in nats / ln 2 per predicted byte) on the test split, of "
        "the weights with the lowest val loss; mean ± sample std over seeds, buckets are means "
        "over the positions of the context window they name. tokens/s: training throughput; "
        "peak MiB: CUDA max allocated (CPU: resident tensors only); both means over seeds."
        + (f" {SHARED_NOTE}" if shared(runs) else ""))]
    for task, rows in runs.groupby("task", sort=True):
        fields = [f for f in key_fields(rows) if f != "seq_len"][:MAX_KEY_FIELDS]
        blocks.append(Heading(3, f"Task `{task}`"))
        ok = rows[rows["status"] == "ok"]
        lines: dict[str, dict[str, list[tuple[float, float]]]] = {}
        tables = {prefix: _table(ok, prefix, fields) for prefix in PREFIXES}
        for prefix, table in tables.items():
            if table is not None:
                blocks += [Text(f"Test bits per byte at the {PREFIXES[prefix]}:"), table]
        for _, group in sorted(ok.groupby("config_id"),
                               key=lambda g: (g[1].iloc[0]["model"], g[0])):
            label = _config_label(group.iloc[0], fields)
            if label in lines:  # differs only in fields beyond MAX_KEY_FIELDS
                label += f" #{len(lines) + 1}"
            lines[label] = {"train": mean_profile(list(group["test_profile"])),
                            "eval": mean_profile(list(group["test_long_profile"]))}
        if any(points for styles in lines.values() for points in styles.values()):
            path = plot_bpb_vs_position(lines, out_dir / "plots" / f"lm_{slug(task)}_position.png",
                                        f"{task}: test bits per byte vs position in the window")
            blocks.append(Images([_image(path, out_dir, f"{task} bits per byte vs position")]))
        notes = [f"`{r['model']}` seed {r['seed']}: **{r['status']}** — {str(r['message'])[:200]}"
                 for _, r in rows[rows["status"] != "ok"].iterrows()]
        notes += [f"`{r['model']}` seed {r['seed']}, test at eval_seq_len "
                  f"{r['config'].get('eval_seq_len')}: **{r['test_long_status']}** — "
                  f"{str(r['test_long_message'])[:200]}"
                  for _, r in ok.iterrows() if r["test_long_status"] not in ("", "ok")]
        if notes:
            blocks.append(Bullets(notes))
    return blocks


def _table(ok: pd.DataFrame, prefix: str, fields: list[str]) -> Table | None:
    """One row per configuration: bpb (mean ± std), buckets, cost columns; None if empty."""
    scored = ok[ok[f"{prefix}bpb"].notna()]
    if scored.empty:
        return None
    labels = _bucket_labels(scored, f"{prefix}buckets")
    long = prefix == "test_long_"
    fields = [f for f in fields if not (long and f == "eval_seq_len")]
    lengths = ["seq_len", "eval_seq_len"] if long else ["seq_len"]
    header = ["model", "backend", "L", *(["eval L"] if long else []), *fields, "seeds",
              "bpb (mean ± std)",
              *(f"bpb {label}" for label in labels), "tokens/s", "peak MiB", "params"]
    table = Table(header, [])
    for _, group in sorted(scored.groupby("config_id"),
                           key=lambda g: (g[1].iloc[0]["model"], g[0])):
        first = group.iloc[0]
        mean, std, n = mean_std(group[f"{prefix}bpb"])
        seeds = ",".join(str(s) for s in sorted(group["seed"]))
        buckets = [fmt_num(float(np.nanmean([b.get(label, np.nan) for b in
                                             group[f"{prefix}buckets"]])), 3)
                   for label in labels]
        params = first["params"]
        table.rows.append([first["model"], ", ".join(sorted({b for b in group["backend"] if b})),
                           *(_value_text(first["config"].get(f)) for f in lengths),
                           *(_value_text(first["config"].get(f)) for f in fields),
                           f"{n} ({seeds})", fmt_pm(mean, std, 1.0, 3), *buckets,
                           fmt_num(group["tokens_per_s"].mean(), 0)
                           + (SHARED_MARK if shared(group) else ""),
                           fmt_num(group["peak_mem_mib"].mean()),
                           f"{int(params):,}" if pd.notna(params) else ""])
    return table
