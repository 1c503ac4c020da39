"""Efficiency sweeps: models x lengths x batches, one store row per cell, resumable.

Each cell is written to the store as soon as it finishes (in its own transaction), so an OOM,
an exception or Ctrl-C in one cell never loses the rows before it, and a rerun of the same
command skips every cell whose outcome is final.

Skip after failure (``run_cells(..., skip_after_failure=True)``, on for the efficiency presets):
once a model's cell at (L0, batch B0) ends ``oom``, every later cell of the same model and
config with L >= L0 and batch*L >= B0*L0 is written as ``oom`` with the message
``skipped-after-oom: ...`` and ``result.skipped = "after-oom"``, without running it. That cell
needs at least as much memory: memory is batch x (per-sequence memory), and per-sequence memory
per token does not shrink as L grows for any model here (linear or quadratic in L). The same
holds for time, so a cell stopped as ``too-slow`` (measure's ``max_step_s``) skips the longer
ones as ``error`` / ``skipped-after-too-slow`` (error rows are not final: a rerun retries them).
Skipped rows are ordinary rows (a resumed sweep keeps them; ``--force`` measures them).

Before a cell is timed its model's fast kernels are checked against its reference
(harness/fast_path_check.py); a cell that fails is written as ``wrong``, untimed (not final:
a rerun checks again).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from harness.config import config_hash
from harness.fast_path_check import CheckResult, FastPathChecks
from harness.measure import TOO_SLOW, CellOutcome, EfficiencyCell, measure
from harness.provenance import provenance
from harness.registry import Entry, ModelSpec
from harness.store import CellRecord, Store

# The --quick backbone: small enough that every registry entry runs in seconds on 2 CPU cores.
QUICK_BACKBONE: dict[str, Any] = {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ffn": 128}

CSV_COLUMNS = [
    "model", "backend", "seq_len", "batch", "status", "ms_median", "ms_p20", "ms_p80",
    "tokens_per_s", "peak_mem_mib", "params", "device", "dtype", "d_model", "n_layers",
    "n_heads", "d_ffn", "head", "compile", "activation_memory_budget", "cuda_graph", "preset",
    "codebook_utilisation", "codebook_perplexity", "check", "check_rel_err", "check_reference",
    "message", "torch", "cuda", "tf32",
    "git_commit", "timestamp", "cell_key",
]


SKIPPED_AFTER_OOM = "skipped-after-oom"
SKIPPED_AFTER_TOO_SLOW = "skipped-after-too-slow"


@dataclass
class PlannedCell:
    entry: Entry
    model_config: Any
    cell: EfficiencyCell
    key: str
    preset: str = ""  # efficiency preset name (part of the key and of the row)
    max_step_s: float | None = None  # time limit of a warm-up step (not part of the key)

    def extra_cell(self) -> dict[str, Any]:
        return {"preset": self.preset} if self.preset else {}

    def failure_group(self) -> tuple[Any, ...]:
        """Cells of one model and config that differ only in (L, batch)."""
        config = config_hash(self.model_config.to_dict())
        c = self.cell
        return (c.model, config, c.device, c.dtype, c.compile, c.cuda_graph, c.lr, self.preset)


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


def plan_shapes(
    entries: Sequence[Entry | ModelSpec],
    shapes: Sequence[tuple[int, int]],
    device: str,
    dtype: str,
    overrides: dict[str, Any],
    warmup: int,
    steps: int,
    seed: int,
    compile: bool = False,
    preset: str = "",
    cuda_graph: bool = False,
    max_step_s: float | None = None,
) -> list[PlannedCell]:
    """Every entry x (seq_len, batch) pair, entry-major in the given shape order (a plain
    sweep passes lengths x batches; the scaling preset pairs each L with its own batch).
    A ``ModelSpec`` variant adds its own fields over ``overrides`` and is recorded under its
    label (``longvq[key_grad=window]``)."""
    specs = [e if isinstance(e, ModelSpec) else ModelSpec(e) for e in entries]
    check_overrides([s.entry for s in specs], overrides)
    device_label = provenance(torch.device(device))["device"]
    planned: list[PlannedCell] = []
    for spec in specs:
        entry = spec.entry
        entry_overrides = {**overrides_for(entry, overrides), **dict(spec.overrides)}
        if not entry.bidirectional and "head" not in overrides:
            entry_overrides["head"] = "lm"  # causal-only models are measured with their LM head
        model_config = entry.make_config(**entry_overrides)
        model_config.check_memory_budget(compiled=compile)
        for seq_len, batch in shapes:
            cell = EfficiencyCell(spec.label, seq_len, batch, device, dtype, warmup, steps,
                                  seed, compile=compile, cuda_graph=cuda_graph)
            sized = model_config.sized_for(seq_len, fixed=entry_overrides)
            key = cell_key(cell, sized, device_label, preset)
            planned.append(PlannedCell(entry, sized, cell, key, preset, max_step_s))
    return planned


def cell_key(cell: EfficiencyCell, model_config: Any, device_label: str, preset: str = "") -> str:
    """The store key of an efficiency cell: what was asked, the full model config, the device,
    and the preset when there is one.

    ``compile`` and ``cuda_graph`` enter the key only when on, so the keys of rows written
    before the fields existed (all eager) stay valid and a rerun still finds them.
    """
    described = cell.to_dict()
    for flag in ("compile", "cuda_graph"):
        if not described.get(flag):
            described.pop(flag, None)
    payload = {"kind": "efficiency", "cell": described,
               "model_config": model_config.to_dict(), "device_name": device_label}
    if preset:
        payload["preset"] = preset
    return config_hash(payload)


def fast_path_verdict(planned: PlannedCell, checks: FastPathChecks
                      ) -> tuple[CheckResult, CellOutcome | None]:
    """The cell's fast-path check and, when the cell must not be timed (the check failed or
    could not run), the cell's outcome."""
    c = planned.cell
    try:
        check = checks.check(planned.entry, planned.model_config, c.seq_len, c.device, c.dtype,
                             c.compile, label=c.model)
    except Exception as exc:  # noqa: BLE001 - a check that cannot run says why, untimed
        check = CheckResult("error")
        return check, CellOutcome("error", f"fast-path check: {type(exc).__name__}: {exc}",
                                  check.row_fields())
    if check.status == "failed":
        return check, CellOutcome("wrong", check.message, {"backend": check.backend,
                                                           **check.row_fields()})
    return check, None


def checked_measure(planned: PlannedCell, checks: FastPathChecks) -> CellOutcome:
    """The fast-path check, then (unless it failed) the measurement; the row gets both."""
    check, failure = fast_path_verdict(planned, checks)
    if failure is not None:
        return failure
    outcome = measure(planned.entry, planned.model_config, planned.cell,
                      max_step_s=planned.max_step_s)
    outcome.metrics.update(check.row_fields())
    return outcome


def run_cell(planned: PlannedCell, store: Store, prov: dict[str, Any],
             extra_cell: dict[str, Any] | None = None,
             checks: FastPathChecks | None = None) -> CellRecord:
    """Check and measure one cell and write its row; ``extra_cell`` (e.g. the sweep's name) is
    recorded with the cell's description but is not part of its key. ``checks``: the run's
    fast-path checks (each model config is checked once per run); default, a new one."""
    cell = {**planned.cell.to_dict(), **planned.extra_cell(), **(extra_cell or {}),
            "model_config": planned.model_config.to_dict()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            outcome = checked_measure(planned, checks or FastPathChecks())
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the row says so (a rerun measures it)
            store.write(CellRecord(planned.key, "efficiency", planned.cell.model, "interrupted",
                                   cell, provenance=prov, message="interrupted (Ctrl-C)"))
            raise
    notes = sorted({str(w.message).splitlines()[0] for w in caught})
    result = dict(outcome.metrics)
    if notes:
        result["warnings"] = notes
    record = CellRecord(
        cell_key=planned.key,
        kind="efficiency",
        model=planned.cell.model,
        status=outcome.status,
        message=outcome.message,
        cell=cell,
        result=result,
        provenance=prov,
    )
    store.write(record)
    return record


def skipped_record(planned: PlannedCell, failure: tuple[int, int, str],
                   prov: dict[str, Any]) -> CellRecord:
    """The row of a cell not run because a shorter one of the same model failed."""
    seq_len, batch, status = failure
    if status == "oom":
        tag, what, final = SKIPPED_AFTER_OOM, "ran out of memory", "oom"
    else:
        tag, what, final = SKIPPED_AFTER_TOO_SLOW, "was too slow", "error"
    cell = {**planned.cell.to_dict(), **planned.extra_cell(),
            "model_config": planned.model_config.to_dict()}
    message = (f"{tag}: {planned.cell.model} {what} at L={seq_len}, batch={batch}; "
               f"L={planned.cell.seq_len}, batch={planned.cell.batch} needs at least as much, "
               "not run")
    return CellRecord(planned.key, "efficiency", planned.cell.model, final, cell,
                      result={"skipped": tag.removeprefix("skipped-")}, provenance=prov,
                      message=message)


def _failure_of(status: str | None, message: str) -> str | None:
    """'oom' / 'too-slow' when a finished cell should make longer ones be skipped."""
    if status == "oom":
        return "oom"
    if status == "error" and message.startswith((TOO_SLOW, SKIPPED_AFTER_TOO_SLOW)):
        return TOO_SLOW
    return None


def covering_failure(failures: Sequence[tuple[int, int, str]], seq_len: int,
                     batch: int) -> tuple[int, int, str] | None:
    """The first recorded failure (L0, B0, kind) with L0 <= seq_len and B0*L0 <= batch*seq_len."""
    for failure in failures:
        length, fail_batch, _ = failure
        if length <= seq_len and fail_batch * length <= batch * seq_len:
            return failure
    return None


def run_cells(
    planned: Sequence[PlannedCell],
    store: Store,
    force: bool = False,
    on_cell: Callable[[PlannedCell, CellRecord | None], None] | None = None,
    skip_after_failure: bool = False,
    checks: FastPathChecks | None = None,
) -> None:
    """Run every planned cell not already final in the store; ``on_cell`` reports progress.

    ``skip_after_failure``: see the module docstring (cells are visited in plan order, so
    plan each model's lengths ascending to skip as much as possible).
    """
    prov_by_device: dict[str, dict[str, Any]] = {}
    checks = checks or FastPathChecks()
    failures: dict[tuple[Any, ...], list[tuple[int, int, str]]] = {}

    def prov_for(device: str) -> dict[str, Any]:
        if device not in prov_by_device:
            prov_by_device[device] = provenance(torch.device(device))
        return prov_by_device[device]

    def note(item: PlannedCell, status: str | None, message: str) -> None:
        kind = _failure_of(status, message)
        if kind is not None:
            failures.setdefault(item.failure_group(), []).append(
                (item.cell.seq_len, item.cell.batch, kind))

    for item in planned:
        if not force and store.is_finished(item.key):
            if skip_after_failure:
                note(item, store.status_of(item.key), "")
            if on_cell:
                on_cell(item, None)
            continue
        failure = None
        if skip_after_failure:
            failure = covering_failure(failures.get(item.failure_group(), []),
                                       item.cell.seq_len, item.cell.batch)
        if failure is not None:
            record = skipped_record(item, failure, prov_for(item.cell.device))
            store.write(record)
        else:
            record = run_cell(item, store, prov_for(item.cell.device), checks=checks)
            note(item, record.status, record.message)
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
    # the config leaves torch's default (1.0) out of its description and key
    frame["activation_memory_budget"] = frame["activation_memory_budget"].fillna(1.0)
    rest = [c for c in frame.columns if c not in CSV_COLUMNS]
    return frame[CSV_COLUMNS + rest]
