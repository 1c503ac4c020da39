"""A train cell in the store: its key, one row per cell, resume, and the learning-curve files.

The key hashes everything that defines the cell: the :class:`TrainConfig` (model, task, seq_len,
steps, batch, lr, schedule, clip, eval sizes, seed, device, dtype, overrides, task options), the
model's *full* config dict (so a changed default in a model file is a different cell), the task's
``describe()`` and the device's name. A rerun with the same key skips the cell when its status is
final (ok / oom / diverged); ``error`` and ``interrupted`` cells run again and replace their row.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from harness import distributed
from harness.config import ModelConfig, config_hash
from harness.provenance import device_name, provenance
from harness.store import CellRecord, Store
from harness.tasks import Task
from harness.train import (
    StepCallback,
    TrainConfig,
    TrainInterrupted,
    build_task,
    model_config,
    train_cell,
)

CURVE_COLUMNS = ["step", "train_loss", "grad_norm", "lr", "val_loss", "val_acc"]


def _key(cfg: TrainConfig, model_cfg: ModelConfig, task: Task, device_label: str) -> str:
    # The resolved model config keys the cell, not the overrides that produced it: a sweep that
    # spells out a default (attn_fn=softmax) or a string ("512" from the CLI) is the same cell.
    train = {k: v for k, v in cfg.to_dict().items() if k != "model_overrides"}
    return config_hash({"kind": "train", "train": train, "model_config": model_cfg.to_dict(),
                        "task": task.describe(), "device_name": device_label})


def train_cell_key(cfg: TrainConfig, device_label: str, task: Task | None = None) -> str:
    """The store key of a train cell (builds the task unless given; raises on a bad config)."""
    cfg.validate()
    task = task if task is not None else build_task(cfg)
    _entry, model_cfg = model_config(cfg, task)
    return _key(cfg, model_cfg, task, device_label)


def run_train(cfg: TrainConfig, store: Store, force: bool = False,
              on_step: StepCallback | None = None,
              task: Task | None = None,
              extra_cell: dict[str, Any] | None = None) -> tuple[CellRecord | None, str]:
    """Train one cell unless the store already has it final; write its row. (record, key).

    Bad configs (unknown model/task/field, a non-causal model on an LM task) raise ValueError
    before anything runs. Ctrl-C writes an ``interrupted`` row with the curve so far, then
    re-raises. ``task``: the already built task of ``cfg`` (else it is built here);
    ``extra_cell``: fields recorded in the row's cell (a sweep's name) but not in its key.
    """
    cfg.validate()
    task = task if task is not None else build_task(cfg)
    _entry, model_cfg = model_config(cfg, task)
    device = torch.device(cfg.device)
    key = _key(cfg, model_cfg, task, device_name(device))
    if not force and store.is_finished(key):
        return None, key
    prov = provenance(device)
    cell = {**(extra_cell or {}), **cfg.to_dict(), **task.describe(),
            "model_config": model_cfg.to_dict()}

    def write(outcome, notes: list[str]) -> CellRecord:
        result = dict(outcome.metrics)
        if notes:
            result["warnings"] = notes
        record = CellRecord(cell_key=key, kind="train", model=cfg.model, status=outcome.status,
                            message=outcome.message, cell=cell, result=result, provenance=prov)
        if distributed.world().is_main:  # torchrun: one row per cell, from rank 0
            store.write(record)
        return record

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per location: a per-step warning stays one note
        try:
            outcome = train_cell(cfg, on_step, task=task)
        except TrainInterrupted as exc:
            write(exc.outcome, [])
            raise
    return write(outcome, sorted({str(w.message).splitlines()[0] for w in caught})), key


def stored_result(store: Store, key: str) -> dict[str, Any] | None:
    """status, message and result of a stored train cell (for a skipped rerun's summary)."""
    rows = store.records(kind="train", keys=[key])
    if not rows:
        return None
    row = rows[-1]
    return {"status": row["status"], "message": row["message"],
            "result": json.loads(row["result"])}


# -- files ----------------------------------------------------------------------------------------
def write_curve_csv(curve: list[dict[str, Any]], path: Path) -> None:
    extra = sorted({k for r in curve for k in r} - set(CURVE_COLUMNS))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS + extra, restval="")
        writer.writeheader()
        writer.writerows(curve)


def plot_learning_curve(curve: list[dict[str, Any]], path: Path, title: str,
                        test_acc: float | None = None) -> None:
    """Train loss (left axis, log scale) and val accuracy (right axis) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax_loss = plt.subplots(figsize=(6.4, 4.2))
    train = [(r["step"], r["train_loss"]) for r in curve if "train_loss" in r]
    if train:
        steps, losses = zip(*train, strict=True)
        ax_loss.plot(steps, losses, color="tab:blue", lw=0.8, label="train loss")
        if all(v > 0 for v in losses):
            ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss", color="tab:blue")
    ax_acc = ax_loss.twinx()
    val = [(r["step"], r["val_acc"]) for r in curve if "val_acc" in r]
    if val:
        steps, accs = zip(*val, strict=True)
        ax_acc.plot(steps, accs, color="tab:orange", marker="o", ms=3, label="val acc")
    if test_acc is not None:
        ax_acc.axhline(test_acc, color="tab:green", ls="--", lw=0.8,
                       label=f"test acc {test_acc:.3f}")
    ax_acc.set_ylim(0, 1)
    ax_acc.set_ylabel("accuracy", color="tab:orange")
    handles = ax_loss.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
    ax_loss.legend(handles=handles, fontsize=7, loc="center right")
    ax_loss.set_title(title, fontsize=9)
    ax_loss.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], status: str, out_dir: Path, title: str) -> list[Path]:
    """curve.csv, learning_curve.png and result.json (the stored metrics) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = result.get("curve", [])
    paths = [out_dir / "curve.csv", out_dir / "learning_curve.png", out_dir / "result.json"]
    write_curve_csv(curve, paths[0])
    plot_learning_curve(curve, paths[1], f"{title} ({status})", result.get("test_acc"))
    paths[2].write_text(json.dumps({"status": status, **result}, indent=1, default=str))
    return paths
