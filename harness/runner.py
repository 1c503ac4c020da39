"""Efficiency sweeps: models x lengths x batches, one store row per cell, resumable.

Each cell is written to the store as soon as it finishes (in its own transaction), so an OOM,
an exception or Ctrl-C in one cell never loses the rows before it, and a rerun of the same
command skips every cell whose outcome is final.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from harness.config import config_hash
from harness.measure import EfficiencyCell, measure
from harness.provenance import provenance
from harness.registry import Entry
from harness.store import CellRecord, Store

# The --quick backbone: small enough that every registry entry runs in seconds on 2 CPU cores.
QUICK_BACKBONE: dict[str, Any] = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ffn": 128}

CSV_COLUMNS = [
    "model", "backend", "seq_len", "batch", "status", "ms_median", "ms_p20", "ms_p80",
    "tokens_per_s", "peak_mem_mib", "params", "device", "dtype", "d_model", "n_layers",
    "n_heads", "d_ffn", "head", "codebook_utilisation", "codebook_perplexity", "message",
    "torch", "cuda", "tf32", "git_commit", "timestamp", "cell_key",
]


@dataclass
class PlannedCell:
    entry: Entry
    model_config: Any
    cell: EfficiencyCell
    key: str


def overrides_for(entry: Entry, overrides: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``overrides`` that are fields of this entry's config."""
    names = set(entry.config_cls.__dataclass_fields__)
    return {k: v for k, v in overrides.items() if k in names}


def check_overrides(entries: Sequence[Entry], overrides: dict[str, Any]) -> None:
    """Fail if some override is a field of none of the selected models (a typo, most likely)."""
    for name in overrides:
        if not any(name in e.config_cls.__dataclass_fields__ for e in entries):
            models = ", ".join(e.name for e in entries)
            raise ValueError(f"config field {name!r} exists in none of the models: {models}")


def plan_cells(
    entries: Sequence[Entry],
    lengths: Sequence[int],
    batches: Sequence[int],
    device: str,
    dtype: str,
    overrides: dict[str, Any],
    warmup: int,
    steps: int,
    seed: int,
) -> list[PlannedCell]:
    check_overrides(entries, overrides)
    device_label = provenance(torch.device(device))["device"]
    planned: list[PlannedCell] = []
    for entry in entries:
        entry_overrides = overrides_for(entry, overrides)
        if not entry.bidirectional and "head" not in overrides:
            entry_overrides["head"] = "lm"  # causal-only models are measured with their LM head
        model_config = entry.make_config(**entry_overrides)
        for seq_len in lengths:
            for batch in batches:
                cell = EfficiencyCell(entry.name, seq_len, batch, device, dtype, warmup, steps,
                                      seed)
                key = cell_key(cell, model_config, device_label)
                planned.append(PlannedCell(entry, model_config, cell, key))
    return planned


def cell_key(cell: EfficiencyCell, model_config: Any, device_label: str) -> str:
    """The store key of an efficiency cell: what was asked, the full model config, the device."""
    return config_hash({"kind": "efficiency", "cell": cell.to_dict(),
                        "model_config": model_config.to_dict(), "device_name": device_label})


def run_cell(planned: PlannedCell, store: Store, prov: dict[str, Any],
             extra_cell: dict[str, Any] | None = None) -> CellRecord:
    """Measure one cell and write its row; ``extra_cell`` (e.g. the sweep's name) is recorded
    with the cell's description but is not part of its key."""
    cell = {**planned.cell.to_dict(), **(extra_cell or {}),
            "model_config": planned.model_config.to_dict()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = measure(planned.entry, planned.model_config, planned.cell)
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the row says so (a rerun measures it)
            store.write(CellRecord(planned.key, "efficiency", planned.entry.name, "interrupted",
                                   cell, provenance=prov, message="interrupted (Ctrl-C)"))
            raise
    notes = sorted({str(w.message).splitlines()[0] for w in caught})
    result = dict(outcome.metrics)
    if notes:
        result["warnings"] = notes
    record = CellRecord(
        cell_key=planned.key,
        kind="efficiency",
        model=planned.entry.name,
        status=outcome.status,
        message=outcome.message,
        cell=cell,
        result=result,
        provenance=prov,
    )
    store.write(record)
    return record


def run_cells(
    planned: Sequence[PlannedCell],
    store: Store,
    force: bool = False,
    on_cell: Callable[[PlannedCell, CellRecord | None], None] | None = None,
) -> None:
    """Run every planned cell not already final in the store; ``on_cell`` reports progress."""
    prov_by_device: dict[str, dict[str, Any]] = {}
    for item in planned:
        if not force and store.is_finished(item.key):
            if on_cell:
                on_cell(item, None)
            continue
        device = item.cell.device
        if device not in prov_by_device:
            prov_by_device[device] = provenance(torch.device(device))
        record = run_cell(item, store, prov_by_device[device])
        if on_cell:
            on_cell(item, record)


def results_frame(store: Store, planned: Sequence[PlannedCell]) -> pd.DataFrame:
    """The store rows of the planned cells, in plan order, with the CSV columns first."""
    frame = store.dataframe("efficiency", keys=[p.key for p in planned])
    if frame.empty:
        return frame
    order = {p.key: i for i, p in enumerate(planned)}
    frame = frame.sort_values("cell_key", key=lambda s: s.map(order)).reset_index(drop=True)
    for column in CSV_COLUMNS:
        if column not in frame:
            frame[column] = None
    rest = [c for c in frame.columns if c not in CSV_COLUMNS]
    return frame[CSV_COLUMNS + rest]
