"""`tune`: optuna TPE search over a model's declared search space, maximising validation
accuracy (test accuracy is reported, never optimised) and pruning on it."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.cli_args import (
    UsageError,
    fixed_values,
    parse_assignments,
    resolve_device,
    resolve_dtype,
)


def run(args: argparse.Namespace, console: Console) -> int:
    from harness.registry import REGISTRY
    from harness.store import Store
    from harness.sweep import SweepSpec
    from harness.tune import SEARCH_SPACES, open_storage, plan_tune, run_tune, search_space

    REGISTRY.get(args.model)
    if args.trials < 1:
        raise UsageError(f"--trials: {args.trials} must be >= 1")
    if not (args.task or args.preset):
        raise UsageError("--task: required (or give --preset)")
    base = fixed_values(args)
    # a --set field of the default space is fixed (taken out of it); in --space too: an error
    space = search_space(args.model, parse_assignments(args.space or [], "--space"), base)
    spec = SweepSpec(name=args.name, model=args.model, task=args.task, preset=args.preset,
                     base=base, grid={"_": [0]})
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    plan_tune(spec, space, device, dtype, args.quick)  # bad fields/values fail before any trial
    store = Store(args.store)
    storage = open_storage(args.storage) if args.storage else None
    fixed = [k for k in base if k in SEARCH_SPACES.get(args.model, SEARCH_SPACES["default"])]
    console.print(f"[bold]tune[/bold] {args.model} on {args.task or args.preset}: "
                  f"{args.trials} trials over {', '.join(space)}"
                  + (f" ({', '.join(fixed)} fixed by --set)" if fixed else "")
                  + f" ({device}, {dtype}), maximising validation accuracy, store {store.url}"
                  + (f", study storage {args.storage}" if args.storage else ""))

    def on_trial(number: int, params: dict[str, Any], status: str, value, test_acc) -> None:
        def shown(x) -> str:
            return f"{x:.4f}" if isinstance(x, float) else "-"

        text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in params.items())
        console.print(f"  trial {number}: {status} val_acc={shown(value)} "
                      f"(test_acc={shown(test_acc)})  {text}")

    try:
        result = run_tune(spec, store, space, args.trials, device, dtype, args.quick, args.seed,
                          on_trial=on_trial, storage=storage)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: finished trials are in the store and the study")
        return 130
    table = Table(title=f"best of study {result.study_name} ({result.n_complete} complete, "
                        f"{result.n_pruned} pruned)")
    table.add_column("field")
    table.add_column("value")
    for name, value in result.best_params.items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    for label, value in (("val_acc (objective)", result.best_value),
                         ("test_acc (reported)", result.best_test_acc)):
        table.add_row(label, "-" if value is None else f"{value:.4f}")
    console.print(table)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "tune", parents=[common],
        help="optuna TPE search over a model's hyper-parameters (maximises val accuracy)",
        description="Add --trials TPE trials (train cells) to an optuna study stored in the "
                    "store's database (or --storage). The objective is validation accuracy "
                    "(val_acc_best: the accuracy of the weights validation selected); the test "
                    "accuracy is reported beside it (trial user attr test_acc) but never "
                    "optimised. Trials report validation accuracy at each evaluation and the "
                    "median pruner stops the ones that are behind. The best config is printed "
                    "and kept in the study (user attr best_params) and the store.")
    p.add_argument("--model", default="longvq", help="registry model (default longvq)")
    p.add_argument("--task", default=None, help="task (mqar, listops, text, ...)")
    p.add_argument("--preset", default=None, help="task preset (see `train --help`)")
    p.add_argument("--trials", type=int, default=20, help="trials to add (default 20)")
    p.add_argument("--space", nargs="+", action="extend", metavar="FIELD=SPEC",
                   help="override search dimensions: lr=log:1e-4:1e-2, window=cat:32,64, "
                        "dropout=float:0:0.3, n_layers=int:1:4")
    p.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE",
                   help="fixed values; a field of the model's default search space given here "
                        "is fixed (not searched); one also given in --space is an error")
    p.add_argument("--task-opt", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="fixed task options")
    p.add_argument("--name", default="default", help="study suffix (default 'default')")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="optuna storage URL for the study, e.g. sqlite:///study.db or "
                        "postgresql://user@host/db (default: the store's database, --store); "
                        "the trials' rows still go to --store")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quick", action="store_true", help="small backbone and short runs")
    p.set_defaults(func=run)
