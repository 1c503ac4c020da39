"""`tune`: optuna TPE search over a model's declared search space, pruning on val accuracy."""

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
    from harness.tune import run_tune, search_space

    REGISTRY.get(args.model)
    if args.trials < 1:
        raise UsageError(f"--trials: {args.trials} must be >= 1")
    if not (args.task or args.preset):
        raise UsageError("--task: required (or give --preset)")
    base = fixed_values(args)
    space = search_space(args.model, parse_assignments(args.space or [], "--space"))
    spec = SweepSpec(name=args.name, model=args.model, task=args.task, preset=args.preset,
                     base=base, grid={"_": [0]})
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    store = Store(args.store)
    console.print(f"[bold]tune[/bold] {args.model} on {args.task or args.preset}: "
                  f"{args.trials} trials over {', '.join(space)} ({device}, {dtype}), "
                  f"store {store.url}")

    def on_trial(number: int, params: dict[str, Any], status: str, value) -> None:
        shown = f"{value:.4f}" if isinstance(value, float) else "-"
        text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in params.items())
        console.print(f"  trial {number}: {status} test_acc={shown}  {text}")

    try:
        result = run_tune(spec, store, space, args.trials, device, dtype, args.quick, args.seed,
                          on_trial=on_trial)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: finished trials are in the store and the study")
        return 130
    table = Table(title=f"best of study {result.study_name} ({result.n_complete} complete, "
                        f"{result.n_pruned} pruned)")
    table.add_column("field")
    table.add_column("value")
    for name, value in result.best_params.items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    table.add_row("test_acc", "-" if result.best_value is None else f"{result.best_value:.4f}")
    console.print(table)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "tune", parents=[common], help="optuna TPE search over a model's hyper-parameters",
        description="Add --trials TPE trials (train cells) to an optuna study stored in the "
                    "store's database; trials report validation accuracy at each evaluation "
                    "and the median pruner stops the ones that are behind. The best config is "
                    "printed and kept in the study (user attr best_params) and the store.")
    p.add_argument("--model", default="longvq", help="registry model (default longvq)")
    p.add_argument("--task", default=None, help="task (mqar, listops, text, ...)")
    p.add_argument("--preset", default=None, help="task preset (see `train --help`)")
    p.add_argument("--trials", type=int, default=20, help="trials to add (default 20)")
    p.add_argument("--space", nargs="+", action="extend", metavar="FIELD=SPEC",
                   help="override search dimensions: lr=log:1e-4:1e-2, window=cat:32,64, "
                        "dropout=float:0:0.3, n_layers=int:1:4")
    p.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE",
                   help="fixed values")
    p.add_argument("--task-opt", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="fixed task options")
    p.add_argument("--name", default="default", help="study suffix (default 'default')")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quick", action="store_true", help="small backbone and short runs")
    p.set_defaults(func=run)
