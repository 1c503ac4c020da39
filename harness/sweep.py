"""Sweeps: a grid over any config fields, run as an optuna study with ``GridSampler``.

A sweep is a :class:`SweepSpec` — from the command line (``--grid codebook_size=64,128
attn_fn=softmax,laplace``) or from a file in ``sweeps/`` (TOML, or Python defining ``SWEEP``).
Every grid point is one *cell*: a training run (``kind="train"``) or an efficiency measurement
(``kind="efficiency"``), keyed in the store exactly like the ``train`` and ``efficiency``
commands key theirs, so a cell is never measured twice whichever command asked for it.

Distribution and resumption:
- the optuna study lives in the store's database (RDB storage: the SQLite file, or a
  ``postgresql://`` URL shared by several machines); workers started on the same sweep load the
  same study and ``GridSampler`` hands them grid points;
- before running a cell, a worker *claims* it in the store (unique key + compare-and-set,
  :meth:`Store.claim`), so two workers that ``GridSampler`` gave the same point (it can, under
  concurrency) never both run it, and a cell already final in the store is never rerun;
- heartbeats mark the trials of a dead worker failed; after the sampler stops, each worker runs a
  completion pass over the grid and takes any cell that is still missing (its worker died, or a
  duplicate pick hid it). A rerun of the same sweep therefore finishes exactly what is left;
  a cell that ended non-final (``error``, ``interrupted``) is retried by the next rerun, never
  twice in one invocation.

Field routing for a grid point (base values, then the point): ``model`` picks the registry entry;
TrainConfig / EfficiencyCell fields (``seq_len``, ``lr``, ``steps``, ``batch``, ``seed``, ...) go
to the run; ``task.<name>`` goes to the task options; any other name must be a field of the
model's config (``codebook_size``, ``attn_fn``, ``local_bias``, ...) — else one clear error.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import runpy
import time
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import torch

from harness.config import config_hash
from harness.fast_path_check import FastPathChecks
from harness.interrupts import DeferredInterrupts
from harness.measure import EfficiencyCell
from harness.registry import REGISTRY, Entry
from harness.store import FINAL_STATUSES, CellRecord, Store

KINDS = ("train", "efficiency")
OBJECTIVES = {"train": "test_acc", "efficiency": "tokens_per_s"}
SHARED_DEVICE_ENV = "LONGVQ_DEVICE_SHARED_BY"  # set by ``sweep --workers N`` for each worker


@dataclass
class SweepSpec:
    name: str
    kind: str = "train"
    model: str = "longvq"
    task: str | None = None  # train sweeps: the task (or given by ``preset``)
    preset: str | None = None  # train sweeps: a harness.presets name
    base: dict[str, Any] = field(default_factory=dict)  # fixed fields, routed like the grid's
    grid: dict[str, list[Any]] = field(default_factory=dict)
    description: str = ""

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sweep kind={self.kind!r}; choose one of {', '.join(KINDS)}")
        if not self.grid:
            raise ValueError(f"sweep {self.name!r} has an empty grid")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid field {key!r} needs a non-empty list of values")
        if self.kind == "train" and not (self.task or self.preset):
            raise ValueError(f"train sweep {self.name!r} needs a task (--task) or a preset")

    def points(self) -> list[dict[str, Any]]:
        """Every grid point, in a stable order (cartesian product in the grid's key order)."""
        keys = list(self.grid)
        return [dict(zip(keys, combo, strict=True))
                for combo in itertools.product(*(self.grid[k] for k in keys))]

    def study_name(self) -> str:
        payload = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "description"}
        return f"sweep-{self.name}-{config_hash(payload)[:8]}"


# -- parsing -------------------------------------------------------------------------------------
def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["codebook_size=64,128", "attn_fn=softmax"]`` -> {name: [values]}; errors name the item."""
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not name.strip() or not all(parts):
            raise ValueError(f"--grid: expected field=v1,v2,..., got {item!r}")
        if name.strip() in grid:
            raise ValueError(f"--grid: field {name.strip()!r} given twice")
        grid[name.strip()] = parts
    return grid


def load_sweep_file(path: Path) -> list[SweepSpec]:
    """Sweeps from a TOML file (one table, or ``[[sweep]]`` tables) or a Python file (``SWEEP``:
    a dict or a list of dicts)."""
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"sweep file {str(path)!r}: invalid TOML ({exc})") from None
        raw = data.get("sweep", data)
    elif path.suffix == ".py":
        raw = runpy.run_path(str(path)).get("SWEEP")
        if raw is None:
            raise ValueError(f"sweep file {str(path)!r} defines no SWEEP")
    else:
        raise ValueError(f"sweep file {str(path)!r}: expected a .toml or .py file")
    specs = []
    known = {f.name for f in fields(SweepSpec)}
    for item in raw if isinstance(raw, list) else [raw]:
        unknown = set(item) - known
        if unknown:
            raise ValueError(f"sweep file {str(path)!r}: unknown keys {sorted(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        item = {**item, "grid": {k: v if isinstance(v, list) else [v]
                                 for k, v in item.get("grid", {}).items()}}
        item.setdefault("name", path.stem)
        spec = SweepSpec(**item)
        spec.validate()
        specs.append(spec)
    return specs


# -- cells ---------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One grid point made concrete: how to key, claim and run it."""

    params: dict[str, Any]
    key: str
    model: str
    kind: str
    describe: dict[str, Any]
    run: Callable[..., CellRecord | None]  # run(store, on_step=None) -> the row written


def _route(entry: Entry, values: dict[str, Any], run_fields: set[str]) -> tuple[dict, dict, dict]:
    run, model, task = {}, {}, {}
    model_fields = set(entry.config_cls.__dataclass_fields__)
    for name, value in values.items():
        if name == "model":
            continue
        if name.startswith("task."):
            task[name.removeprefix("task.")] = value
        elif name in run_fields:
            run[name] = value
        elif name in model_fields:
            model[name] = value
        else:
            close = difflib.get_close_matches(name, [*run_fields, *model_fields], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"field {name!r} is neither a run field "
                             f"({', '.join(sorted(run_fields))}), a task option (task.<name>) "
                             f"nor a field of {entry.name}'s config{hint}")
    return run, model, task


def _coerce_run(name: str, value: Any, default: Any) -> Any:
    if isinstance(value, str) and isinstance(default, bool):
        return value.lower() in {"1", "true", "on", "yes"}
    if isinstance(value, str) and isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"field {name!r}: expected an integer, got {value!r}") from None
    if isinstance(value, str) and isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"field {name!r}: expected a number, got {value!r}") from None
    return value


def make_cell(spec: SweepSpec, params: dict[str, Any], device: str, dtype: str, quick: bool,
              sweep_note: dict[str, Any], checks: FastPathChecks | None = None) -> Cell:
    """The cell of one grid point; ``checks``: the sweep's fast-path checks (efficiency cells
    of one model config share one), default a new one per cell."""
    values = {**spec.base, **params}
    entry = REGISTRY.get(str(values.get("model", spec.model)))
    if spec.kind == "train":
        return _train_cell(spec, entry, values, params, device, dtype, quick, sweep_note)
    return _efficiency_cell(entry, values, params, device, dtype, quick, sweep_note, checks)


def _train_cell(spec, entry, values, params, device, dtype, quick, sweep_note) -> Cell:
    from harness.presets import QUICK_DATA, QUICK_RUN, get_preset
    from harness.provenance import device_name
    from harness.runner import QUICK_BACKBONE
    from harness.train import TrainConfig
    from harness.train_runner import run_train, train_cell_key

    defaults = TrainConfig(model=entry.name, task="", seq_len=1)
    run_fields = {f.name for f in fields(TrainConfig)} - {"model", "device", "model_overrides",
                                                         "task_options"}
    run, model, task = _route(entry, values, run_fields)
    settings: dict[str, Any] = get_preset(spec.preset) if spec.preset else {}
    model_overrides = dict(settings.pop("model_overrides", {}))
    task_options = dict(settings.pop("task_options", {}))
    if spec.task:
        settings["task"] = spec.task
    if quick:
        settings.update(QUICK_RUN)
        model_overrides.update(QUICK_BACKBONE)
        task_options.update(QUICK_DATA)
    settings.update({k: _coerce_run(k, v, getattr(defaults, k)) for k, v in run.items()})
    settings.setdefault("seq_len", 512)
    model_overrides.update(model)
    task_options.update(task)
    settings.setdefault("dtype", dtype)
    cfg = TrainConfig(model=entry.name, device=device, model_overrides=model_overrides,
                      task_options=task_options, **settings)
    key = train_cell_key(cfg, device_name(torch.device(device)))

    def run_it(store: Store, on_step=None) -> CellRecord | None:
        record, _ = run_train(cfg, store, force=True, on_step=on_step, extra_cell=sweep_note)
        return record

    return Cell(params, key, entry.name, "train", cfg.to_dict(), run_it)


def _efficiency_cell(entry, values, params, device, dtype, quick, sweep_note,
                     checks: FastPathChecks | None) -> Cell:
    from harness.provenance import provenance
    from harness.runner import QUICK_BACKBONE, PlannedCell, cell_key, run_cell

    run_fields = {f.name for f in fields(EfficiencyCell)} - {"model", "device"}
    run, model, _task = _route(entry, values, run_fields)
    defaults = EfficiencyCell(entry.name, 1, 1, device, dtype)
    settings = {"warmup": 3, "steps": 3 if quick else 10, "dtype": dtype, "seq_len": 1024,
                "batch": 4}
    settings.update({k: _coerce_run(k, v, getattr(defaults, k)) for k, v in run.items()})
    overrides = {**(QUICK_BACKBONE if quick else {}), **model}
    if not entry.bidirectional:
        overrides.setdefault("head", "lm")
    model_config = entry.make_config(**overrides)
    cell = EfficiencyCell(entry.name, device=device, **settings)
    _check_efficiency_cell(cell)
    model_config.check_memory_budget(compiled=cell.compile)
    prov = provenance(torch.device(device))
    planned = PlannedCell(entry, model_config, cell, cell_key(cell, model_config, prov["device"]))

    def run_it(store: Store, on_step=None) -> CellRecord:  # no steps to report: not a train
        return run_cell(planned, store, prov, extra_cell=sweep_note, checks=checks)

    return Cell(params, planned.key, entry.name, "efficiency", cell.to_dict(), run_it)


def _check_efficiency_cell(cell: EfficiencyCell) -> None:
    """Bad run values fail while planning (one line naming them), not as ``error`` cells."""
    from harness.measure import DTYPES

    for name in ("seq_len", "batch", "warmup", "steps"):
        if getattr(cell, name) < 1:
            raise ValueError(f"{name}={getattr(cell, name)!r} must be >= 1")
    if cell.lr <= 0:
        raise ValueError(f"lr={cell.lr!r} must be > 0")
    if cell.dtype not in DTYPES:
        raise ValueError(f"dtype={cell.dtype!r} must be one of {', '.join(DTYPES)}")


# -- the study -----------------------------------------------------------------------------------
def _storage(store: Store | str) -> optuna.storages.RDBStorage:
    """optuna's RDB storage on the store's database (or on a database URL)."""
    import sqlalchemy as sa

    url = store if isinstance(store, str) else store.url
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs: dict[str, Any] = {"heartbeat_interval": 60, "grace_period": 180}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(5):  # workers starting together race to create optuna's tables
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (ImportError, sa.exc.ArgumentError):
            raise  # a malformed URL or a missing database driver: retrying cannot help
        except Exception:  # noqa: BLE001 - sqlalchemy errors of the losing worker; retried
            if attempt == 4:
                raise
            time.sleep(0.3 * (attempt + 1))
    raise AssertionError("unreachable")


def _stored_value(store: Store, key: str, kind: str) -> float | None:
    rows = store.records(keys=[key])
    if not rows or rows[0]["status"] != "ok":
        return None
    value = json.loads(rows[0]["result"]).get(OBJECTIVES[kind])
    return None if value is None else float(value)


@dataclass
class SweepProgress:
    ran: int = 0
    skipped: int = 0
    busy: int = 0  # running in another worker
    statuses: dict[str, int] = field(default_factory=dict)
    # keys of the cells this invocation ran: a non-final one (error, interrupted) is retried by a
    # later rerun of the command, never twice in one invocation
    ran_keys: set[str] = field(default_factory=set)


def plan_sweep(spec: SweepSpec, device: str, dtype: str, quick: bool) -> dict[str, Cell]:
    """Every cell of the sweep by its params' JSON; a bad value fails here, before any work."""
    spec.validate()
    note = {"sweep": spec.name, "study": spec.study_name(), "sweep_keys": ",".join(spec.grid),
            # workers of this sweep on this worker's device (CPU or one GPU): > 1 means its
            # cells may have run side by side, so their tokens/s are not clean speed numbers
            "device_shared_by": int(os.environ.get(SHARED_DEVICE_ENV, "1"))}
    checks = FastPathChecks()
    return {json.dumps(p, sort_keys=True, default=str): make_cell(spec, p, device, dtype, quick,
                                                                  note, checks)
            for p in spec.points()}


def run_sweep(spec: SweepSpec, store: Store, cells: dict[str, Cell], seed: int = 0,
              on_cell: Callable[[Cell, CellRecord | None, str], None] | None = None
              ) -> SweepProgress:
    """Run this worker's share of the sweep until every cell is final or taken by a live one."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_name = spec.study_name()
    progress = SweepProgress()
    space = {k: list(v) for k, v in spec.grid.items()}
    study = optuna.create_study(
        study_name=study_name, storage=_storage(store), load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.GridSampler(space, seed=seed))
    study.set_user_attr("kind", spec.kind)

    stopping: list[BaseException] = []
    interrupts = DeferredInterrupts()

    def objective(trial: optuna.Trial) -> float:
        params = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        cell = cells[json.dumps(params, sort_keys=True, default=str)]
        trial.set_user_attr("cell_key", cell.key)
        try:
            with interrupts.live():
                value = _run_or_reuse(cell, store, progress, on_cell)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - re-raised below
            # Ctrl-C, --fail-fast or a bug: stop the study and re-raise it ourselves, so
            # optuna does not log a "trial failed" traceback for what is not a trial failure
            stopping.append(exc)
            trial.study.stop()
            raise optuna.TrialPruned() from None
        if value is None:
            raise optuna.TrialPruned()  # no objective value (failed, or run by another worker)
        return value

    def optimize(n_trials: int | None) -> None:
        with interrupts.installed():
            try:
                study.optimize(objective, n_trials=n_trials)
            except (RuntimeError, ValueError) as exc:
                # Two workers can pop the same enqueued trial; the second one's tell then finds
                # it finished (UpdateFinishedTrialError or "Cannot tell a PRUNED trial"). The
                # cell itself is claimed in the store, and the completion pass below takes
                # whatever is still missing, so this worker just moves on.
                finished = isinstance(exc, optuna.exceptions.UpdateFinishedTrialError)
                if not finished and "Cannot tell a" not in str(exc):
                    raise
        if stopping:
            raise stopping[0]
        interrupts.raise_pending()

    optimize(None)  # GridSampler stops the study when it is exhausted
    for cell in cells.values():  # completion pass: what a dead worker or a duplicate pick left
        status = store.status_of(cell.key)
        if status in FINAL_STATUSES or cell.key in progress.ran_keys:
            continue
        study.enqueue_trial(cell.params, skip_if_exists=False)
        optimize(1)
    return progress


def _run_or_reuse(cell: Cell, store: Store, progress: SweepProgress,
                  on_cell: Callable[[Cell, CellRecord | None, str], None] | None) -> float | None:
    kind_objective = cell.kind
    if store.is_finished(cell.key):
        progress.skipped += 1
        if on_cell:
            on_cell(cell, None, "already in store")
        return _stored_value(store, cell.key, kind_objective)
    if cell.key in progress.ran_keys:  # e.g. an exhausted GridSampler re-picking an error cell
        return _stored_value(store, cell.key, kind_objective)
    claim = CellRecord(cell_key=cell.key, kind=cell.kind, model=cell.model, status="running",
                       cell=cell.describe)
    if not store.claim(claim):
        progress.busy += 1
        if on_cell:
            on_cell(cell, None, "running in another worker")
        return None
    progress.ran_keys.add(cell.key)
    try:
        log = os.environ.get("LONGVQ_SWEEP_RUN_LOG")
        if log:  # one line per cell this worker actually runs (tests check "exactly once")
            with open(log, "a") as handle:
                handle.write(f"{cell.key} {os.getpid()}\n")
        record = cell.run(store)
    except KeyboardInterrupt:  # our claim must not stay `running`: mark it, then stop
        if store.status_of(cell.key) == "running":
            store.write(CellRecord(cell.key, cell.kind, cell.model, "interrupted", cell.describe,
                                   message="interrupted (Ctrl-C)"))
        raise
    progress.ran += 1
    if record is not None:
        progress.statuses[record.status] = progress.statuses.get(record.status, 0) + 1
    if on_cell:
        on_cell(cell, record, "ran")
    return _stored_value(store, cell.key, kind_objective)
