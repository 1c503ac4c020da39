"""Hyper-parameter search: an optuna TPE study over declared search spaces, with pruning.

Each trial is a train cell (harness/train.py), stored in the store like any other; the study
itself lives in the store's database (RDB storage), so several workers — processes, or machines
sharing a ``postgresql://`` store — can add trials to one study. Trials report validation
accuracy at every evaluation; optuna's median pruner stops trials that are behind (status
``pruned`` in the store, with the curve so far).

Search spaces are declared per model (``SEARCH_SPACES``, ``default`` for the rest) and can be
overridden field by field on the command line: ``lr=log:1e-4:3e-3``, ``window=cat:32,64,128``,
``dropout=float:0:0.3``, ``n_layers=int:1:4``. Routing of a field is the sweep's (harness/sweep.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from harness.interrupts import DeferredInterrupts
from harness.store import Store

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


def search_space(model: str, overrides: dict[str, str]) -> dict[str, Dimension]:
    space = dict(SEARCH_SPACES.get(model, SEARCH_SPACES["default"]))
    for name, text in overrides.items():
        space[name] = parse_dimension(name, text)
    return space


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
    best_value: float | None
    best_params: dict[str, Any]
    n_complete: int
    n_pruned: int


def run_tune(spec, store: Store, space: dict[str, Dimension], trials: int, device: str,
             dtype: str, quick: bool, seed: int,
             on_trial: Callable[[int, dict[str, Any], str, float | None], None] | None = None
             ) -> TuneResult:
    """``spec`` is a :class:`harness.sweep.SweepSpec` giving model, task/preset and fixed values
    (its grid is unused); ``trials`` more trials are added to the study."""
    from harness.sweep import _storage, make_cell
    from harness.train import StopTraining

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"tune-{spec.model}-{spec.task or spec.preset}-{spec.name}"
    study = optuna.create_study(
        study_name=name, storage=_storage(store), load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    study.set_user_attr("space", json.dumps(space, default=str))
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
        value = record.result.get("test_acc") if record is not None else None
        if on_trial:
            on_trial(trial.number, params, status, value)
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
                      len(complete), len(pruned))
