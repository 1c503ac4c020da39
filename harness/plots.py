"""Log-log plots of step time and peak memory against sequence length, one line per model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or GPU machines

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

METRICS = {
    "ms_median": ("time per training step (ms, median)", "time"),
    "peak_mem_mib": ("peak allocated memory (MiB)", "memory"),
}


def plot_vs_length(frame: pd.DataFrame, out_dir: Path, title: str, stem: str = "") -> list[Path]:
    """Write ``<stem>time_vs_length.png`` and ``<stem>memory_vs_length.png``; return the paths.

    ``frame`` holds efficiency rows (model, seq_len, status, ms_median, peak_mem_mib). Cells that
    ran out of memory are drawn as a cross at the first failing length, on the top edge.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if frame.empty:
        return paths
    for column, (label, name) in METRICS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for model, rows in frame.groupby("model", sort=True):
            rows = rows.sort_values("seq_len")
            ok = rows[rows["status"] == "ok"]
            line = None
            if not ok.empty and column in ok:
                (line,) = ax.plot(ok["seq_len"], ok[column], marker="o", label=str(model))
            failed = rows[rows["status"] == "oom"]
            if not failed.empty:
                color = line.get_color() if line is not None else None
                ax.scatter(failed["seq_len"].min(), 1.0, marker="x", s=60, color=color,
                           transform=ax.get_xaxis_transform(), clip_on=False,
                           label=f"{model} OOM" if line is None else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}{name}_vs_length.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
