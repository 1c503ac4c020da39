"""`sweep`: a grid over any config fields (train or efficiency cells), as an optuna study."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.cli_args import (
    UsageError,
    fixed_flag,
    fixed_values,
    progress_bar,
    resolve_device,
    resolve_dtype,
)
from harness.commands.efficiency import FailFast
from harness.provenance import REPO_ROOT


def build_specs(args: argparse.Namespace):
    from harness.sweep import SweepSpec, load_sweep_file, parse_grid

    specs = []
    base = fixed_values(args)
    for path in args.files or []:
        for spec in load_sweep_file(Path(path)):
            # --set / --task-opt override a file's fixed values (e.g. a shorter --set steps=300
            # budget for the paper sweeps); a field the file grids over stays gridded.
            spec.base.update({k: v for k, v in base.items() if k not in spec.grid})
            specs.append(spec)
    if args.grid:
        grid = parse_grid(args.grid)
        # the grid would silently win over a --set of the same field (the point is applied last)
        both = [k for k in grid if k in base]
        if both:
            raise UsageError(f"given in both {fixed_flag(both[0])} and --grid: "
                             f"{', '.join(both)}")
        name = args.name or "cli-" + "-".join(sorted(grid))
        specs.append(SweepSpec(name=name, kind=args.kind, model=args.model, task=args.task,
                               preset=args.preset, base=base, grid=grid))
    if not specs:
        raise UsageError("sweep: give a sweep file or --grid field=v1,v2 ...")
    for spec in specs:
        spec.validate()
    return specs


def run(args: argparse.Namespace, console: Console) -> int:
    from harness.store import Store

    specs = build_specs(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.workers < 1:
        raise UsageError(f"--workers: {args.workers} must be >= 1")
    if args.workers > 1:
        return spawn_workers(args, console, device)
    store = Store(args.store)
    for spec in specs:
        status = run_one(spec, store, device, dtype, args, console)
        if status:
            return status
    return 0


def run_one(spec, store, device: str, dtype: str, args: argparse.Namespace,
            console: Console) -> int:

    from harness.sweep import plan_sweep, run_sweep

    cells = plan_sweep(spec, device, dtype, args.quick)  # a bad value fails here, naming it
    points = spec.points()
    console.print(f"[bold]sweep[/bold] {spec.name}: {len(points)} {spec.kind} cells of "
                  f"{spec.model} on {device} ({dtype}), study {spec.study_name()}, "
                  f"store {store.url}")
    with progress_bar(console) as progress:
        done = sum(store.is_finished(cell.key) for cell in cells.values())
        bar = progress.add_task(spec.name, total=len(points), completed=done)
        if done:
            progress.console.print(f"  {done} of {len(points)} cells already in the store")

        def on_cell(cell, record, what: str) -> None:
            params = " ".join(f"{k}={v}" for k, v in cell.params.items())
            if record is None:
                if what != "already in store":
                    progress.console.print(f"  {params}: [dim]{what}[/dim]")
                return
            else:
                colour = "green" if record.status == "ok" else "yellow"
                progress.console.print(f"  {params}: [{colour}]{record.status}[/{colour}] "
                                       f"{record.message[:100]}")
            progress.advance(bar)
            if args.fail_fast and record.status != "ok":
                raise FailFast(f"{params}: {record.status} {record.message[:200]}")

        try:
            run_sweep(spec, store, cells, seed=args.seed, on_cell=on_cell)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]: finished cells are in the store; rerun the "
                          "same command to run the rest")
            return 130
        except FailFast as exc:
            console.print(f"[red]stopped (--fail-fast)[/red]: {exc}")
            return 1
    print_summary(spec, store, cells, console)
    return 0


def print_summary(spec, store, cells, console: Console) -> None:
    from harness.sweep import OBJECTIVES

    keys = {cell.key: cell.params for cell in cells.values()}
    frame = store.dataframe(keys=list(keys))
    objective = OBJECTIVES[spec.kind]
    table = Table(title=f"sweep {spec.name} ({objective})")
    for column in [*spec.grid, "status", objective]:
        table.add_column(column)
    by_key = {row["cell_key"]: row for _, row in frame.iterrows()} if not frame.empty else {}
    for key, params in keys.items():
        row = by_key.get(key)
        value = row.get(objective) if row is not None else None
        shown = f"{value:.4g}" if isinstance(value, float) and value == value else "-"
        table.add_row(*(str(params[k]) for k in spec.grid),
                      str(row["status"]) if row is not None else "missing", shown)
    console.print(table)


def spawn_workers(args: argparse.Namespace, console: Console, device: str) -> int:
    """N processes of this same command, each ``--workers 1`` on the shared study and store.

    On CUDA each worker sees one GPU (``CUDA_VISIBLE_DEVICES=i`` round-robin over the GPUs).
    """
    import torch

    from harness.sweep import SHARED_DEVICE_ENV

    argv = [a for a in sys.argv[1:]]
    if "--workers" in argv:
        index = argv.index("--workers")
        argv[index + 1] = "1"
    else:
        argv = [a if not a.startswith("--workers=") else "--workers=1" for a in argv]
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    procs = []
    for worker in range(args.workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(worker % gpus)
        # recorded in every row: how many workers share this one's device (GPU or the CPU)
        env[SHARED_DEVICE_ENV] = str(len(range(worker % gpus, args.workers, gpus)) if gpus
                                     else args.workers)
        # own process group: Ctrl-C reaches only this parent, which forwards exactly one
        # SIGTERM (= Ctrl-C in a worker) to each worker, also when the parent itself got SIGTERM
        procs.append(subprocess.Popen([sys.executable, str(REPO_ROOT / "run_bench.py"), *argv],
                                      env=env, process_group=0))
    console.print(f"started {args.workers} workers: pids {', '.join(str(p.pid) for p in procs)}")
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait()
        console.print("[red]interrupted[/red]: workers stopped, finished cells are in the "
                      "store; rerun the same command to run the rest")
        return 130
    failed = [c for c in codes if c]
    if failed:
        console.print(f"[red]{len(failed)} worker(s) exited with {failed}[/red]")
        return failed[0]
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sweep", parents=[common], help="grid over config fields (train or efficiency cells)",
        description="Run a grid of cells as an optuna study (GridSampler) whose storage is the "
                    "store's database. Grid fields may be run fields (seq_len, lr, steps, batch, "
                    "seed, ...), task options (task.<name>) or any field of the model's config "
                    "(codebook_size, attn_fn, local_bias, window, ssm, vq, gate, ...). Cells "
                    "already final in the store are skipped, so a rerun resumes; several "
                    "workers (--workers, or the same command on several machines with a "
                    "postgresql:// --store) share one study and run each cell once.")
    p.add_argument("files", nargs="*", help="sweep files (sweeps/*.toml or *.py) to run")
    p.add_argument("--grid", nargs="+", action="extend", metavar="FIELD=V1,V2",
                   help="grid, e.g. codebook_size=64,128 attn_fn=softmax,laplace local_bias=on,off")
    p.add_argument("--kind", default="train", choices=["train", "efficiency"],
                   help="what each cell runs (default train)")
    p.add_argument("--model", default="longvq", help="registry model (default longvq); a grid "
                                                     "may also vary model=...")
    p.add_argument("--task", default=None, help="task of train cells (mqar, listops, text, ...)")
    p.add_argument("--preset", default=None, help="task preset of train cells (see `train`)")
    p.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE",
                   help="fixed values for every cell (routed like grid fields); with sweep "
                        "files they override the files' base values, e.g. --set steps=300")
    p.add_argument("--task-opt", nargs="+", action="extend", metavar="KEY=VALUE",
                   help="fixed task options")
    p.add_argument("--name", default=None, help="sweep name (default: from the grid fields)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="autocast dtype (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quick", action="store_true",
                   help="small backbone, few steps, small datasets: a CPU smoke sweep")
    p.add_argument("--fail-fast", dest="fail_fast", action="store_true",
                   help="stop at the first cell whose status is not ok (exit code 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the study (CUDA: one GPU each, round-robin)")
    p.set_defaults(func=run)
