"""`efficiency`: time and memory of training steps, models x lengths x batch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.cli_args import (
    UsageError,
    parse_assignments,
    parse_int_list,
    progress_bar,
    resolve_device,
    resolve_dtype,
)
from harness.registry import REGISTRY


class FailFast(Exception):
    """--fail-fast: a cell run by this command ended with a status other than ok."""


def run(args: argparse.Namespace, console: Console) -> int:

    from harness.runner import QUICK_BACKBONE, plan_cells, results_frame, run_cells
    from harness.store import Store

    entries = REGISTRY.resolve(args.models.split(","))
    if not entries:
        raise UsageError("--models: no model named")
    lengths = parse_int_list(args.lengths, "--lengths")
    batches = parse_int_list(args.batch, "--batch")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    overrides: dict[str, Any] = dict(QUICK_BACKBONE) if args.quick else {}
    overrides.update(parse_assignments(args.set or [], "--set"))
    warmup = args.warmup if args.warmup is not None else 3
    steps = args.steps if args.steps is not None else (3 if args.quick else 10)
    for flag, value in (("--warmup", warmup), ("--steps", steps)):
        if value < 1:
            raise UsageError(f"{flag}: {value} must be >= 1")
    try:
        planned = plan_cells(
            entries, lengths, batches, device, dtype, overrides, warmup, steps, args.seed
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    store = Store(args.store)
    console.print(
        f"[bold]efficiency[/bold]: {len(planned)} cells on {device} ({dtype}), store {store.url}"
    )
    with progress_bar(console) as progress:
        task = progress.add_task("cells", total=len(planned))

        def on_cell(item, record) -> None:
            cell = item.cell
            label = f"{cell.model} L={cell.seq_len} B={cell.batch}"
            if record is None:
                progress.console.print(f"  {label}: [dim]already in store, skipped[/dim]")
            else:
                ms = record.result.get("ms_median")
                detail = (
                    f"{ms:.1f} ms/step, {record.result['peak_mem_mib']:.0f} MiB"
                    if ms
                    else record.message[:120]
                )
                colour = "green" if record.status == "ok" else "yellow"
                progress.console.print(f"  {label}: [{colour}]{record.status}[/{colour}] {detail}")
            progress.advance(task)
            if args.fail_fast and record is not None and record.status != "ok":
                raise FailFast(f"{label}: {record.status} {record.message[:200]}")

        try:
            run_cells(planned, store, force=args.force, on_cell=on_cell)
        except KeyboardInterrupt:
            done = sum(store.is_finished(p.key) for p in planned)
            console.print(
                f"[red]interrupted[/red]: {done}/{len(planned)} cells are in the store;"
                " rerun the same command to finish the rest"
            )
            return 130
        except FailFast as exc:
            console.print(f"[red]stopped (--fail-fast)[/red]: {exc}")
            return 1
    frame = results_frame(store, planned)
    print_efficiency_table(frame, console)
    if args.out:
        write_outputs(frame, Path(args.out), console)
    return 0


def print_efficiency_table(frame, console: Console) -> None:
    from harness.report import add_ratios

    if frame.empty:
        return
    frame = add_ratios(frame)
    table = Table(title="efficiency (training step: fwd + bwd + optimizer)")
    for column in (
        "model",
        "backend",
        "L",
        "batch",
        "status",
        "ms/step",
        "tokens/s",
        "peak MiB",
        "params",
        "speed×vanilla",
        "mem×vanilla",
    ):
        table.add_column(column, justify="right" if column[0].islower() is False else "left")
    for _, row in frame.iterrows():
        ok = row["status"] == "ok"
        table.add_row(
            str(row["model"]),
            row["backend"] if isinstance(row["backend"], str) else "",
            str(row["seq_len"]),
            str(row["batch"]),
            str(row["status"]),
            f"{row['ms_median']:.1f}" if ok else "-",
            f"{row['tokens_per_s']:,.0f}" if ok else "-",
            f"{row['peak_mem_mib']:.1f}" if ok else "-",
            f"{int(row['params']):,}" if ok else "-",
            f"{row['speed_x_vanilla']:.2f}"
            if ok and row["speed_x_vanilla"] == row["speed_x_vanilla"]
            else "-",
            f"{row['mem_x_vanilla']:.2f}"
            if ok and row["mem_x_vanilla"] == row["mem_x_vanilla"]
            else "-",
        )
    console.print(table)


def write_outputs(frame, out_dir: Path, console: Console) -> None:
    from harness.plots import plot_vs_length

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "efficiency.csv"
    frame.to_csv(csv_path, index=False)
    device = str(frame["device"].iloc[0]) if not frame.empty else ""
    plots = plot_vs_length(frame, out_dir, f"efficiency on {device}")
    console.print(f"wrote {csv_path}" + "".join(f", {p}" for p in plots))


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p_eff = sub.add_parser(
        "efficiency",
        parents=[common],
        help="time and memory of training steps vs length",
        description="Sweep models x lengths x batch sizes; each cell times training steps "
        "(forward + backward + AdamW) and records peak memory into the store. Cells "
        "already in the store with a final status (ok/oom/diverged) are skipped, so "
        "a rerun resumes; error/interrupted cells are run again.",
    )
    p_eff.add_argument(
        "--models", default="all", help="comma-separated registry names, or 'all' (default)"
    )
    p_eff.add_argument(
        "--lengths",
        default="1024,2048,4096",
        help="comma-separated sequence lengths (1k = 1024), default 1024,2048,4096",
    )
    p_eff.add_argument("--batch", default="4", help="comma-separated batch sizes (default 4)")
    p_eff.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast dtype (auto: bf16 on cuda, fp32 on cpu)",
    )
    p_eff.add_argument(
        "--set",
        nargs="+",
        action="extend",
        metavar="FIELD=VALUE",
        help="config overrides for every model that has the field, e.g. "
        "--set d_model=256 n_layers=4 codebook_size=512",
    )
    p_eff.add_argument(
        "--quick",
        action="store_true",
        help="small backbone (d_model=64, 2 layers, FFN 128, 4 heads) and 3 "
        "timed steps: a CPU smoke run",
    )
    p_eff.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (3)")
    p_eff.add_argument(
        "--steps", type=int, default=None, help="timed steps per cell (10; 3 with --quick)"
    )
    p_eff.add_argument(
        "--force", action="store_true", help="re-measure cells even when the store already has them"
    )
    p_eff.add_argument(
        "--fail-fast", dest="fail_fast", action="store_true",
        help="stop at the first cell whose status is not ok (exit code 1)",
    )
    p_eff.add_argument(
        "--out", default=None, help="folder for efficiency.csv and time/memory-vs-length PNG plots"
    )
    p_eff.set_defaults(func=run)
