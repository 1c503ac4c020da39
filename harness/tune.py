"""Hyper-parameter search: an optuna TPE study over declared search spaces, with pruning.

Each trial is a train cell (harness/train.py), stored in the store like any other; the study
itself lives in the store's database (RDB storage), so several workers — processes, or machines
sharing a ``postgresql://`` store — can add trials to one study; ``storage`` puts the study in
another optuna storage instead. The objective is the trial's best validation accuracy
(``val_acc_best``: the accuracy of the weights validation selected), never the test split, which
stays a reported number (trial user attribute ``test_acc``). Trials report validation accuracy at
every evaluation; optuna's median pruner stops trials that are behind (status ``pruned`` in the
store, with the curve so far).

Search spaces are declared per model (``SEARCH_SPACES``, ``default`` for the rest) and can be
overridden field by field on the command line: ``lr=log:1e-4:3e-3``, ``window=cat:32,64,128``,
``dropout=float:0:0.3``, ``n_layers=int:1:4``. A fixed value (``--set``) of a field of the
model's default space takes that field out of the space; a field given both as a fixed value and
in ``--space`` is an error. Routing of a field is the sweep's (harness/sweep.py).
:func:`plan_tune` checks every fixed value and every value the space can produce before any study
or trial exists, so bad input fails as one line instead of as failed trials.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import optuna

from harness.cli_args import fixed_flag
from harness.interrupts import DeferredInterrupts
from harness.store import Store, store_url

OBJECTIVE = "val_acc_best"  # what the study maximises; test_acc is only reported

# (kind, *args): log / float (low, high), int (low, high), cat (choices)
Dimension = tuple[str, Any, Any] | tuple[str, list[Any]]

SEARCH_SPACES: dict[str, dict[str, Dimension]] = {
    "default": {
        "lr": ("log", 1e-4, 3e-3),
        "weight_decay": ("cat", [0.0, 0.01, 0.1]),
        "dropout": ("cat", [0.0, 0.1]),
    },
    "longvq": {
        "lr": ("log", 1e-4, 3e-3),
        "codebook_size": ("cat", [64, 128, 256, 512]),
        "window": ("cat", [32, 64, 128]),
        "attn_fn": ("cat", ["softmax", "laplace"]),
        "commitment": ("log", 1e-4, 1e-2),
        "dropout": ("cat", [0.0, 0.1]),
    },
    "transformer_vq": {
        "lr": ("log", 1e-4, 3e-3),
        "codebook_size": ("cat", [64, 128, 256, 512]),
        "window": ("cat", [32, 64, 128]),
        "dropout": ("cat", [0.0, 0.1]),
    },
}


def parse_dimension(name: str, text: str) -> Dimension:
    """``log:1e-4:1e-2`` | ``float:0:0.5`` | ``int:1:4`` | ``cat:a,b,c``; errors name the field."""
    kind, _, rest = text.partition(":")
    try:
        if kind in ("log", "float"):
            low, high = (float(x) for x in rest.split(":"))
            if not low < high or (kind == "log" and low <= 0):
                raise ValueError
            return (kind, low, high)
        if kind == "int":
            low, high = (int(x) for x in rest.split(":"))
            if not low <= high:
                raise ValueError
            return ("int", low, high)
        if kind == "cat" and rest:
            return ("cat", [_number(v.strip()) for v in rest.split(",")])
    except ValueError:
        pass
    raise ValueError(f"--space {name}={text!r}: expected log:LOW:HIGH, float:LOW:HIGH, "
                     f"int:LOW:HIGH or cat:A,B,...")


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def search_space(model: str, overrides: dict[str, str],
                 fixed: Iterable[str] = ()) -> dict[str, Dimension]:
    """The model's declared space with ``overrides`` (``--space``) applied and the ``fixed``
    fields (``--set``/``--task-opt`` keys) taken out: a trial's value would override them."""
    fixed = set(fixed)
    both = [name for name in overrides if name in fixed]
    if both:
        raise ValueError(f"given in both {fixed_flag(both[0])} and --space: {', '.join(both)}")
    space = {name: dim for name, dim in SEARCH_SPACES.get(model, SEARCH_SPACES["default"]).items()
             if name not in fixed}
    for name, text in overrides.items():
        space[name] = parse_dimension(name, text)
    if not space:
        raise ValueError("the search space is empty (--set fixes every field of it); "
                         "add fields with --space FIELD=SPEC")
    return space


def _candidates(dim: Dimension) -> list[Any]:
    """The values of a dimension worth checking up front: every choice, or both bounds."""
    return list(dim[1]) if dim[0] == "cat" else [dim[1], dim[2]]


def plan_tune(spec, space: dict[str, Dimension], device: str, dtype: str, quick: bool) -> None:
    """Build (not run) a cell for the fixed values and for every choice / bound of each search
    dimension, so an unknown field or a bad value fails here as one ValueError naming it, before
    any study or trial exists (inside a trial it would be a FAIL trial and a traceback)."""
    from harness.sweep import make_cell

    make_cell(spec, {}, device, dtype, quick, {})  # task, preset, --set, --task-opt alone
    for name, dim in space.items():
        for value in _candidates(dim):
            try:
                make_cell(spec, {name: value}, device, dtype, quick, {})
            except ValueError as exc:
                raise ValueError(f"search space {name}={value!r}: {exc}") from None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The optuna storage of ``--storage URL``; a bad or unreachable URL is one ValueError."""
    import sqlalchemy as sa

    from harness.sweep import _storage

    if "://" not in url:
        raise ValueError(f"--storage {url!r}: expected an optuna storage URL, e.g. "
                         "sqlite:///study.db or postgresql://user@host/db")
    try:
        return _storage(store_url(url))  # store_url: postgresql:// gets the installed driver
    except (ImportError, sa.exc.SQLAlchemyError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ValueError(f"--storage {url!r}: cannot open the optuna storage ({reason})"
                         ) from None


def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if dim[0] == "log":
            params[name] = trial.suggest_float(name, dim[1], dim[2], log=True)
        elif dim[0] == "float":
            params[name] = trial.suggest_float(name, dim[1], dim[2])
        elif dim[0] == "int":
            params[name] = trial.suggest_int(name, dim[1], dim[2])
        else:
            params[name] = trial.suggest_categorical(name, dim[1])
    return params


@dataclass
class TuneResult:
    study_name: str
    best_value: float | None  # the objective: validation accuracy (OBJECTIVE)
    best_params: dict[str, Any]
    n_complete: int
    n_pruned: int
    best_test_acc: float | None = None  # reported, not optimised


# on_trial(number, params, status, val_acc_best, test_acc)
TrialCallback = Callable[[int, dict[str, Any], str, float | None, float | None], None]


def run_tune(spec, store: Store, space: dict[str, Dimension], trials: int, device: str,
             dtype: str, quick: bool, seed: int, on_trial: TrialCallback | None = None,
             storage: optuna.storages.BaseStorage | None = None) -> TuneResult:
    """``spec`` is a :class:`harness.sweep.SweepSpec` giving model, task/preset and fixed values
    (its grid is unused); ``trials`` more trials are added to the study, which lives in
    ``storage`` (default: the store's database). Check the inputs with :func:`plan_tune` first
    (the CLI does): a bad value found here fails trials."""
    from harness.sweep import _storage, make_cell
    from harness.train import StopTraining

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"tune-{spec.model}-{spec.task or spec.preset}-{spec.name}"
    study = optuna.create_study(
        study_name=name, storage=storage if storage is not None else _storage(store),
        load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    study.set_user_attr("space", json.dumps(space, default=str))
    study.set_user_attr("objective", OBJECTIVE)
    note = {"study": name, "tune_space": ",".join(space)}
    # a Ctrl-C inside optuna's bookkeeping breaks it: signals interrupt only a running cell
    interrupts = DeferredInterrupts()
    stopping: list[BaseException] = []

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        cell = make_cell(spec, params, device, dtype, quick, note)
        trial.set_user_attr("cell_key", cell.key)
        evals = [0]

        def on_step(record: dict[str, Any]) -> None:
            if "val_acc" in record and record.get("step") != evals[0]:
                evals[0] = record["step"]
                trial.report(float(record["val_acc"]), int(record["step"]))
                if trial.should_prune():
                    raise StopTraining("pruned by optuna's median pruner")

        try:
            with interrupts.live():
                record = cell.run(store, on_step=on_step)
        except KeyboardInterrupt as exc:  # re-raised after optuna has closed the trial
            stopping.append(exc)
            trial.study.stop()
            raise optuna.TrialPruned() from None
        status = record.status if record is not None else "skipped"
        result = record.result if record is not None else {}
        value, test_acc = result.get(OBJECTIVE), result.get("test_acc")
        if test_acc is not None:  # reported beside the objective, never optimised
            trial.set_user_attr("test_acc", float(test_acc))
        if on_trial:
            on_trial(trial.number, params, status, value, test_acc)
        if status == "pruned":
            raise optuna.TrialPruned()
        if value is None:
            raise optuna.TrialPruned()  # failed cells carry no objective; the row says why
        return float(value)

    with interrupts.installed():
        study.optimize(objective, n_trials=trials)
    if stopping:
        raise stopping[0]
    interrupts.raise_pending()
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    best = study.best_trial if complete else None
    study.set_user_attr("best_params", json.dumps(best.params if best else {}, default=str))
    return TuneResult(name, best.value if best else None, best.params if best else {},
                      len(complete), len(pruned),
                      best.user_attrs.get("test_acc") if best else None)
