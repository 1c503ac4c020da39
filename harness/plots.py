"""The report's plots (PNG, Agg backend): efficiency vs length, learning curves, ablations, optuna.

Every function takes plain data (frames or lists already reduced by the report), writes one PNG
and returns its path; none reads the store.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI or GPU machines

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402

DPI = 110

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*", "h")
METRICS = {
    "ms_median": ("time per training step (ms, median)", "time"),
    "peak_mem_mib": ("peak allocated memory (MiB)", "memory"),
}


def plot_vs_length(frame: pd.DataFrame, out_dir: Path, title: str, stem: str = "",
                   crossovers: dict[str, int] | None = None,
                   reference: str = "transformer_sdpa") -> list[Path]:
    """Write ``<stem>time_vs_length.png`` and ``<stem>memory_vs_length.png``; return the paths.

    ``frame`` holds efficiency rows (model, seq_len, status, ms_median, peak_mem_mib). Cells that
    ran out of memory are drawn as a cross at the first failing length, on the top edge.
    ``crossovers`` (model -> L from which it stays faster than ``reference``) are drawn on the
    time plot as one dotted vertical line per length, labelled with the models.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if frame.empty:
        return paths
    models = sorted({str(m) for m in frame["model"]})
    palette = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    style = {m: (palette(i % palette.N), MARKERS[i % len(MARKERS)]) for i, m in enumerate(models)}
    for column, (label, name) in METRICS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4) if len(models) <= 6 else (8.4, 4.6))
        any_oom = False
        for model, rows in frame.groupby("model", sort=True):
            color, marker = style[str(model)]
            rows = rows.sort_values("seq_len")
            ok = rows[rows["status"] == "ok"]
            line = None
            if not ok.empty and column in ok:
                (line,) = ax.plot(ok["seq_len"], ok[column], marker=marker, color=color,
                                  label=str(model))
            failed = rows[rows["status"] == "oom"]
            if not failed.empty:
                any_oom = True
                ax.scatter(failed["seq_len"].min(), 1.0, marker="x", s=60, color=color,
                           transform=ax.get_xaxis_transform(), clip_on=False,
                           label=f"{model} OOM" if line is None else None)
        if any_oom:  # a legend entry saying what the crosses on the top edge are
            ax.scatter([], [], marker="x", color="0.3", label="× on top: first OOM length")
        if crossovers and name == "time":
            _mark_crossovers(ax, crossovers, reference)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=8)  # long group names
        ax.grid(True, which="both", alpha=0.3)
        if len(models) <= 6:
            ax.legend(fontsize=7)
        else:  # many lines: the legend beside the axes, not over the curves
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out_dir / f"{stem}{name}_vs_length.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


def _mark_crossovers(ax: plt.Axes, crossovers: dict[str, int], reference: str) -> None:
    """One dotted line per crossover length, named by its models (legend says what it is)."""
    by_length: dict[int, list[str]] = {}
    for model, length in sorted(crossovers.items()):
        by_length.setdefault(int(length), []).append(model)
    for i, (length, models) in enumerate(sorted(by_length.items())):
        ax.axvline(length, color="0.35", linestyle=":", linewidth=1.2,
                   label=f"crossover: faster than {reference} from here" if i == 0 else None)
        ax.text(length, 0.03, " " + ", ".join(models), transform=ax.get_xaxis_transform(),
                rotation=90, fontsize=6.5, color="0.2", va="bottom", ha="right",
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1})


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:  # figures with a legend outside use "constrained"
        fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    """Train loss (log scale when positive) and val accuracy against step, one line per label.

    ``curves`` maps a label to a frame with ``step`` and optional ``train_loss`` / ``val_acc``
    columns (already averaged over seeds by the caller).
    """
    rows = math.ceil(len(curves) / 2)  # the legend below the panels, two labels a row
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2 + 0.16 * rows),
                                          layout="constrained")
    positive = True
    palette = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (label, curve) in enumerate(curves.items()):
        color = palette(i % palette.N)  # the same colour for a label on both panels
        if "train_loss" in curve:
            train = curve.dropna(subset=["train_loss"])
            ax_loss.plot(train["step"], train["train_loss"], lw=0.9, color=color, label=label)
            positive = positive and bool((train["train_loss"] > 0).all())
        if "val_acc" in curve:
            val = curve.dropna(subset=["val_acc"])
            ax_acc.plot(val["step"], val["val_acc"], marker="o", ms=3, lw=0.9, color=color,
                        label=label)
    if positive and ax_loss.has_data():
        ax_loss.set_yscale("log")
    for ax, ylabel in ((ax_loss, "train loss"), (ax_acc, "val accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax_loss.get_legend_handles_labels() if ax_loss.has_data()
               else ax_acc.get_legend_handles_labels(), loc="outside lower center", ncols=2,
               fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_acc_vs_codebook(lines: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    """Test accuracy (mean, error bar = std over seeds) against codebook size S (log2 axis).

    ``lines`` maps a label (the other grid fields) to a frame with codebook_size, mean, std.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, frame in lines.items():
        frame = frame.sort_values("codebook_size")
        ax.errorbar(frame["codebook_size"], frame["mean"], yerr=frame["std"].fillna(0),
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    sizes = sorted({float(s) for frame in lines.values() for s in frame["codebook_size"]})
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("codebook size S")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if any(lines):  # a single unlabelled line needs no legend
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_acc_vs_cost(points: pd.DataFrame, path: Path, title: str) -> Path:
    """Test accuracy against wall time and against training throughput, one point per setting.

    ``points``: label, mean, std (test accuracy), wall_s, tokens_per_s (means over seeds).
    """
    rows = math.ceil(len(points) / 2)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4 + 0.16 * rows), sharey=True,
                             layout="constrained")
    for column, ax, xlabel in (("wall_s", axes[0], "wall time per run (s)"),
                               ("tokens_per_s", axes[1], "training throughput (tokens/s)")):
        for _, row in points.iterrows():
            ax.errorbar(row[column], row["mean"], yerr=0 if pd.isna(row["std"]) else row["std"],
                        marker="o", capsize=3, linestyle="none", label=row["label"])
        values = points[column].dropna()
        if not values.empty and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2,
               fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_optuna_history(trials: pd.DataFrame, path: Path, title: str, maximize: bool) -> Path:
    """Objective value of each complete trial against its number, with the best so far."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    trials = trials.sort_values("number")
    ax.scatter(trials["number"], trials["value"], s=18, label="trial value")
    best = trials["value"].cummax() if maximize else trials["value"].cummin()
    ax.step(trials["number"], best, where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel("objective value")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_importances(importances: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bars of parameter importances, largest on top."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.35 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fraction of the objective's variation)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
