"""Optuna studies in the report: best trial, optimisation history and parameter importances.

Studies live in the store's database (``tune-*`` from harness/tune.py, ``sweep-*`` from
harness/sweep.py). A study with at least two complete trials gets its best value and parameters,
a plot of each trial's objective with the best so far, and optuna's parameter importances
(``optuna.importance.get_param_importances``: the default evaluator of the installed optuna —
PED-ANOVA from optuna 4.x on, fANOVA before, which needs scikit-learn) over the parameters that
took at least two values in every complete trial. When importances cannot be computed (one
objective value, too few trials to separate good from bad ones, an evaluator error) the report
says why instead of failing.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from harness import plots
from harness.report_doc import Block, Heading, Images, Table, Text
from harness.report_train import _image, slug
from harness.store import Store

MIN_COMPLETE = 2
# objective of studies that do not name theirs (user attr "objective"), by kind: sweeps, and
# tune studies made before tune optimised validation accuracy (they optimised test accuracy)
LEGACY_OBJECTIVES = {"tune": "test_acc", "train": "test_acc", "efficiency": "tokens_per_s"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def optuna_sections(store: Store, out_dir: Path) -> list[Block]:
    # Only read: asking optuna about a database without its tables would create them.
    if not sa.inspect(store.engine).has_table("studies"):
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    blocks: list[Block] = [Heading(2, "Optuna studies")]
    try:
        storage = optuna.storages.RDBStorage(store.url)
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable study database loses this section
        return blocks + [Text(f"The optuna studies could not be read: {type(exc).__name__}: "
                              f"{exc}")]
    if not summaries:
        return []
    overview = Table(["study", "kind", "objective", "direction", "complete", "pruned", "failed",
                      "best value", "best trial"], [])
    details: list[Block] = []
    skipped: list[str] = []
    for summary in sorted(summaries, key=lambda s: s.study_name):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) < MIN_COMPLETE or len(study.directions) > 1:
            skipped.append(f"`{summary.study_name}` ({len(complete)} complete"
                           + (", multi-objective" if len(study.directions) > 1 else "") + ")")
            continue
        counts = {s: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        best = study.best_trial
        kind = study.user_attrs.get("kind") or summary.study_name.split("-", 1)[0]
        objective = study.user_attrs.get("objective") or LEGACY_OBJECTIVES.get(str(kind), "?")
        overview.rows.append([f"`{summary.study_name}`", str(kind), str(objective),
                              "maximize" if maximize else "minimize",
                              str(len(complete)), str(counts[optuna.trial.TrialState.PRUNED]),
                              str(counts[optuna.trial.TrialState.FAIL]), _fmt(best.value),
                              f"#{best.number}"])
        details += study_blocks(study, complete, maximize, out_dir)
    blocks.append(Text(
        f"Studies with at least {MIN_COMPLETE} complete trials. Objective: `tune` studies "
        "maximise validation accuracy (`val_acc_best`; test accuracy is only reported, as the "
        "trials' user attribute `test_acc`), train sweeps record the test accuracy of each grid "
        "cell, efficiency sweeps tokens/s."
        + (f" Not shown: {', '.join(skipped)}." if skipped else "")))
    if overview.rows:
        blocks.append(overview)
    return blocks + details


def study_blocks(study: Any, complete: list, maximize: bool, out_dir: Path) -> list[Block]:
    name = study.study_name
    best = study.best_trial
    blocks: list[Block] = [Heading(3, f"Study `{name}`")]
    params = Table(["parameter", "best value"], [[k, _fmt(v)] for k, v in best.params.items()])
    params.caption = f"Best trial #{best.number}: objective {_fmt(best.value)}."
    blocks.append(params)
    history = pd.DataFrame({"number": [t.number for t in complete],
                            "value": [t.value for t in complete]})
    stem = slug(name)
    images = [_image(plots.plot_optuna_history(
        history, out_dir / "plots" / f"optuna_{stem}_history.png",
        f"{name}: optimisation history", maximize), out_dir, f"{name} optimisation history")]
    importances, reason = param_importances(study, complete)
    if importances:
        images.append(_image(plots.plot_importances(
            importances, out_dir / "plots" / f"optuna_{stem}_importance.png",
            f"{name}: parameter importances"), out_dir, f"{name} parameter importances"))
    blocks.append(Images(images))
    if importances:
        blocks.append(Table(["parameter", "importance"],
                            [[k, f"{v:.3f}"] for k, v in importances.items()]))
    else:
        blocks.append(Text(f"Parameter importances not shown: {reason}."))
    return blocks


def param_importances(study: Any, complete: list) -> tuple[dict[str, float], str]:
    """Importances over the parameters present in every complete trial with >= 2 values."""
    import optuna

    names = set.intersection(*(set(t.params) for t in complete)) if complete else set()
    varied = sorted(n for n in names if len({repr(t.params[n]) for t in complete}) >= 2)
    if not varied:
        return {}, "no parameter took two or more values across the complete trials"
    if len({t.value for t in complete}) < 2:
        return {}, "every complete trial has the same objective value"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            found = optuna.importance.get_param_importances(study, params=varied)
        except Exception as exc:  # noqa: BLE001 - e.g. fANOVA without scikit-learn
            first = (str(exc).splitlines() or [""])[0][:200]
            return {}, f"optuna could not compute them ({type(exc).__name__}: {first})"
    # With few trials PED-ANOVA's top quantile holds one or two trials and every parameter gets
    # the same share (sometimes with a warning): that says nothing, so it is not shown.
    values = [float(v) for v in found.values()]
    if any("will be equal" in str(w.message) for w in caught) or (
            len(values) > 1 and max(values) - min(values) < 1e-9):
        return {}, (f"optuna's evaluator gave every parameter the same share; "
                    f"{len(complete)} complete trials are too few to tell them apart")
    return {k: float(v) for k, v in found.items()}, ""
