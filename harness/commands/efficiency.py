"""`efficiency`: time and memory of training steps, models x lengths x batch."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.cli_args import (
    UsageError,
    parse_assignments,
    parse_int_list,
    progress_bar,
    resolve_device,
    resolve_dtype,
)
from harness.registry import parse_model_spec, resolve_model_specs

if TYPE_CHECKING:
    from harness.efficiency_presets import EfficiencyPreset
    from harness.fast_path_check import FastPathChecks


class FailFast(Exception):
    """--fail-fast: a cell run by this command ended with a status other than ok."""


@dataclass
class Settings:
    """What the command will run, from the flags and the preset (if any)."""

    shapes: list[tuple[int, int]]  # (seq_len, batch) of every cell, per model
    overrides: dict[str, Any]  # model-config fields for every entry that has them
    warmup: int
    steps: int
    max_step_s: float | None
    skip_after_failure: bool
    preset: EfficiencyPreset | None


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Flags + preset -> settings; explicit --warmup/--steps/--max-step-s/--skip-after-oom win.
    With a preset, --lengths picks a subset of its lengths (same batch rule, same store keys, so
    a later full run resumes them); --batch cannot be combined with it (the preset fixes it)."""
    from harness.efficiency_presets import get_efficiency_preset
    from harness.runner import QUICK_BACKBONE

    preset = get_efficiency_preset(args.preset, quick=args.quick) if args.preset else None
    if preset is not None:
        if args.batch is not None:
            raise UsageError(f"--batch {args.batch!r} cannot be combined with --preset "
                             f"{preset.name}: the preset fixes the batch "
                             "(run without --preset for other shapes)")
        shapes = preset.shapes()
        if args.lengths is not None:
            chosen = parse_int_list(args.lengths, "--lengths")
            for length in chosen:
                if length not in preset.lengths:
                    raise UsageError(f"--lengths: {length} is not a length of --preset "
                                     f"{preset.name} (its lengths: "
                                     f"{', '.join(map(str, sorted(preset.lengths)))})")
            shapes = [shape for shape in shapes if shape[0] in chosen]
        settings = Settings(shapes, dict(preset.backbone), preset.warmup, preset.steps,
                            preset.max_step_s, preset.skip_after_failure, preset)
    else:
        lengths = parse_int_list(args.lengths or "1024,2048,4096", "--lengths")
        batches = parse_int_list(args.batch or "4", "--batch")
        settings = Settings([(seq_len, batch) for seq_len in lengths for batch in batches],
                            dict(QUICK_BACKBONE) if args.quick else {}, 3,
                            3 if args.quick else 10, None, False, None)
    settings.overrides.update(parse_assignments(args.set or [], "--set"))
    if args.warmup is not None:
        settings.warmup = args.warmup
    if args.steps is not None:
        settings.steps = args.steps
    for flag, value in (("--warmup", settings.warmup), ("--steps", settings.steps)):
        if value < 1:
            raise UsageError(f"{flag}: {value} must be >= 1")
    if args.max_step_s is not None:
        if args.max_step_s <= 0:
            raise UsageError(f"--max-step-s: {args.max_step_s} must be > 0")
        settings.max_step_s = args.max_step_s
    if args.skip_after_oom is not None:
        settings.skip_after_failure = args.skip_after_oom
    return settings


def run(args: argparse.Namespace, console: Console) -> int:

    from harness.fast_path_check import FastPathChecks
    from harness.runner import plan_shapes, results_frame, run_cells
    from harness.store import Store

    settings = resolve_settings(args)
    preset = settings.preset
    if settings.warmup < 3 and not args.quick:  # --quick trades it for time, knowingly
        console.print(f"note: --warmup {settings.warmup} is below the method's 3 warm-up steps "
                      "(HARNESS.md): autotuning or compilation may fall into the timed steps; "
                      "rows record the warm-up", markup=False)
    try:
        entries = resolve_model_specs(args.models)
        if preset is not None and args.models == "all":
            variants = preset.variants + (preset.compiled_variants if args.compile else ())
            entries += [s for s in map(parse_model_spec, variants) if s not in entries]
    except ValueError as exc:
        raise UsageError(f"--models: {exc}") from None
    if not entries:
        raise UsageError("--models: no model named")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.cuda_graph and device != "cuda":
        raise UsageError(f"--cuda-graph needs --device cuda (the device is {device})")
    shapes = settings.shapes
    if args.profile_top < 1:
        raise UsageError(f"--profile-top: {args.profile_top} must be >= 1")
    if args.profile and args.memory:
        raise UsageError("--profile and --memory: give one of them (each runs one model)")
    one_model = args.profile or args.memory
    if one_model:  # one model at one shape: the preset's profile length, else the first
        flag = "--profile" if args.profile else "--memory"
        try:
            entries = [parse_model_spec(one_model)]
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        length = preset.profile_len if preset is not None else shapes[0][0]
        shapes = [(length, preset.batch_for(length))] if preset is not None else shapes[:1]
    try:
        planned = plan_shapes(entries, shapes, device, dtype, settings.overrides,
                              settings.warmup, settings.steps, args.seed, compile=args.compile,
                              preset=preset.name if preset else "", cuda_graph=args.cuda_graph,
                              max_step_s=settings.max_step_s)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.profile:
        return run_profile(planned[0], Path(args.out) if args.out else None, console,
                           args.profile_top, FastPathChecks(skip=args.skip_check))
    if args.memory:
        return run_memory(planned[0], Path(args.out) if args.out else None, console,
                          args.profile_top)
    store = Store(args.store)
    console.print(
        f"[bold]efficiency[/bold]: {len(planned)} cells on {device} ({dtype}"
        f"{', torch.compile' if args.compile else ''}"
        f"{', CUDA graph' if args.cuda_graph else ''}), store {store.url}"
    )
    if preset is not None:
        announce_preset(settings, args, console)
    measured = 0
    with progress_bar(console) as progress:
        task = progress.add_task("cells", total=len(planned))

        def on_cell(item, record) -> None:
            nonlocal measured
            cell = item.cell
            label = f"{escape(cell.model)} L={cell.seq_len} B={cell.batch}"
            if record is None:
                progress.console.print(f"  {label}: [dim]already in store, skipped[/dim]")
            else:
                measured += 1
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

        exit_code = 0
        checks = FastPathChecks(skip=args.skip_check)
        started = time.perf_counter()
        try:
            run_cells(planned, store, force=args.force, on_cell=on_cell,
                      skip_after_failure=settings.skip_after_failure, checks=checks)
        except KeyboardInterrupt:
            # the finished rows still get their tables and files (a long sweep cut by a time
            # limit keeps its partial results); a rerun measures only what is missing
            done = sum(store.is_finished(p.key) for p in planned)
            console.print(
                f"[red]interrupted[/red]: {done}/{len(planned)} cells are in the store;"
                " rerun the same command to finish the rest (tables below: finished cells)"
            )
            exit_code = 130
        except FailFast as exc:
            console.print(f"[red]stopped (--fail-fast)[/red]: {exc}")
            return 1
        finally:
            for line in checks.summary():
                console.print(line, markup=False)
    wall = wall_time_line(time.perf_counter() - started, measured, len(planned))
    console.print(wall, markup=False)
    frame = results_frame(store, planned)
    if preset is not None:
        print_preset(frame, preset.name, Path(args.out) if args.out else None, console,
                     note=wall)
        return exit_code
    print_efficiency_table(frame, console)
    if args.out:
        write_outputs(frame, Path(args.out), console)
    return exit_code


def wall_time_line(seconds: float, measured: int, planned: int) -> str:
    """How long this command's cells took, as the preset's "< 10 minutes" goal reads it: every
    measured cell with its fast-path check, compilation and autotuning (first calls on a fresh
    machine pay Triton's compile; later runs reuse its cache)."""
    skipped = planned - measured
    return (f"Wall time of this run: {seconds:.0f} s ({seconds / 60:.1f} min) for {measured} "
            f"measured cell{'s' * (measured != 1)}"
            + (f" ({skipped} of {planned} already in the store, not re-run)" if skipped else "")
            + "; fast-path checks, compilation and autotuning included.")


def announce_preset(settings: Settings, args: argparse.Namespace, console: Console) -> None:
    preset = settings.preset
    assert preset is not None
    limit = settings.max_step_s
    console.print(f"preset [bold]{preset.name}[/bold]{' (--quick)' if args.quick else ''}: "
                  f"{preset.description}")
    console.print(f"  backbone: {preset.describe_backbone()}"
                  + (f"; --set {' '.join(args.set)}" if args.set else ""))
    console.print(f"  lengths {', '.join(str(length) for length, _ in settings.shapes)}; "
                  f"{settings.warmup} warm-up + {settings.steps} timed steps per cell"
                  + (f"; skip longer L after an oom{' / too-slow' if limit else ''}"
                     if settings.skip_after_failure else "")
                  + (f"; warm-up step limit {limit:g} s" if limit else ""))


def rich_table(block, title: str = "", drop_uniform: tuple[str, ...] = ()) -> Table:
    """A report Table block as a rich table (first column left-aligned, the rest right).

    Columns named in ``drop_uniform`` are left out when every row has the same value (the
    backbone line above the table states it); two-word ratio headers break after the ×.
    """
    keep = [i for i, name in enumerate(block.header)
            if name not in drop_uniform or len({row[i] for row in block.rows}) > 1]
    table = Table(title=title or None, caption=block.caption or None)
    for i in keep:
        column = block.header[i].replace("× ", "×\n")
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i < 2)
    for row in block.rows:
        table.add_row(*(escape(str(row[i])) for i in keep))  # labels like longvq[k=v]
    return table


def print_preset(frame, name: str, out_dir: Path | None, console: Console,
                 note: str | None = None) -> None:
    """Print the paper-format table (and for several lengths: crossovers, growth, plots);
    with ``out_dir``: efficiency.csv (all columns), NAME.csv (the table's numbers), NAME.md
    (``note``, e.g. the run's wall time, closes it)."""
    from harness.report_doc import Images, Text
    from harness.report_doc import Table as TableBlock
    from harness.report_efficiency import crossovers, preset_blocks, write_preset_files

    if frame.empty:
        return
    title = f"efficiency preset {name} on {frame['device'].iloc[0]}"
    blocks = preset_blocks(frame, out_dir, "", f"{name}_", title)
    for block in blocks:
        if isinstance(block, TableBlock):
            console.print(rich_table(block, drop_uniform=("head", "compile")))
        elif isinstance(block, Text):
            console.print(block.text, markup=False)  # labels hold brackets: longvq[...]
        elif isinstance(block, Images):
            console.print("plots: " + ", ".join(str(i.path) for i in block.images))
    if frame["seq_len"].nunique() > 1:
        for model, length in crossovers(frame).items():
            where = (f"faster from L={length} on" if length is not None
                     else "none (not faster through the longest measured L)")
            console.print(f"  crossover with transformer_sdpa: {model} {where}", markup=False)
    if out_dir is not None:
        paths = write_preset_files(frame, name, out_dir, blocks + ([Text(note)] if note else []))
        console.print("wrote " + ", ".join(str(p) for p in paths))


def safe_name(label: str) -> str:
    """A model label as a file-name part: ``longvq[key_grad=window]`` ->
    ``longvq-key_grad-window``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def _cell_label(cell, graphed: bool) -> str:
    return f"{escape(cell.model)} L={cell.seq_len} B={cell.batch} {cell.dtype}" + (
        " compiled" if cell.compile else "") + (" CUDA graph" if graphed else "")


def _one_model_failed(what: str, exc: Exception, console: Console) -> int:
    """--profile / --memory could not run: one line, status as a cell's would be; exit 1."""
    from harness.measure import is_oom

    status = "oom" if is_oom(exc) else "error"
    console.print(f"[red]{what} {status}[/red]: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
    return 1


def _show_tables(tables, rows, out_dir: Path | None, stem: str, console: Console,
                 categories=None) -> int:
    """Print the tables; with --out also write them (md) and ``rows`` (csv) under ``stem``."""
    from harness.report_efficiency import write_profile_files

    for block in tables:
        console.print(rich_table(block))
    if out_dir is not None:
        paths = write_profile_files(rows, tables, out_dir / stem, categories)
        console.print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_profile(planned, out_dir: Path | None, console: Console, top: int,
                checks: FastPathChecks) -> int:
    """--profile MODEL: torch.profiler over the cell's timed steps; the top-``top`` table and
    every kernel summed by category (no store row). Kernel times are speeds too: the model's
    fast path is checked first, as before a timed cell."""
    from harness.measure import profile_cell
    from harness.report_efficiency import profile_category_table, profile_table
    from harness.runner import fast_path_verdict

    cell = planned.cell
    label = _cell_label(cell, cell.cuda_graph)
    _check, failed = fast_path_verdict(planned, checks)
    for line in checks.summary():
        console.print(line, markup=False)
    if failed is not None:  # kernel times of a wrong kernel are not reported either
        console.print(f"[red]profile[/red] {label}: {escape(failed.message)}")
        return 1
    console.print(f"[bold]profile[/bold] {label} on {cell.device}: {cell.warmup} warm-up, "
                  f"{cell.steps} profiled training steps")
    try:
        found = profile_cell(planned.entry, planned.model_config, cell, top=top)
    except Exception as exc:  # noqa: BLE001 - reported as one line, like a cell's status
        return _one_model_failed("profile", exc, console)
    tables = [profile_table(found.rows, f"top {len(found.rows)} {found.what}, {label}, "
                                        f"{cell.steps} steps"),
              profile_category_table(found.categories, found.total_ms_per_step,
                                     f"all {found.events} by category, per step")]
    return _show_tables(tables, found.rows, out_dir,
                        f"profile_{safe_name(cell.model)}_L{cell.seq_len}", console,
                        found.categories)


def run_memory(planned, out_dir: Path | None, console: Console, top: int = 20) -> int:
    """--memory MODEL: the resident state and the tensors saved for the backward of the cell's
    training step (harness/memory_accounting.py; no store row). The step runs without a CUDA
    graph, which would hide its autograd graph."""
    from harness.memory_accounting import account_cell, memory_tables, saved_rows

    cell = planned.cell
    label = _cell_label(cell, graphed=False)
    console.print(f"[bold]memory[/bold] {label} on {cell.device}: {max(1, cell.warmup)} "
                  "warm-up steps, then one forward whose saved tensors are counted")
    try:
        account = account_cell(planned.entry, planned.model_config, cell)
    except Exception as exc:  # noqa: BLE001 - reported as one line, like a cell's status
        return _one_model_failed("memory", exc, console)
    tables = memory_tables(account, f"memory of one training step, {label}, {cell.device}",
                           top)
    return _show_tables(tables, saved_rows(account), out_dir,
                        f"memory_{safe_name(cell.model)}_L{cell.seq_len}", console)


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
            escape(str(row["model"])),
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
        "--models", default="all",
        help="comma-separated registry names, or 'all' (default; with --preset also the "
        "preset's variants); a variant measures an entry with config fields of its own, "
        "reported under its label: 'longvq[key_grad=window]' or 'longvq[key_grad=window;"
        "window=128]'"
    )
    p_eff.add_argument(
        "--lengths",
        default=None,
        help="comma-separated sequence lengths (1k = 1024), default 1024,2048,4096; with "
        "--preset: a subset of the preset's lengths",
    )
    p_eff.add_argument("--batch", default=None, help="comma-separated batch sizes (default 4)")
    p_eff.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help="a named table (harness/efficiency_presets.py): paper-text4k (L=4096, byte vocab, "
        "classification, batch 8: speed x / memory x vs transformer_vanilla and "
        "transformer_sdpa) or scaling (L=1K..64K at 64K tokens per step: log-log plots, "
        "crossover with transformer_sdpa, time growth 8K->64K); fixes lengths, batch and "
        "backbone; with --quick a CPU-sized version",
    )
    p_eff.add_argument(
        "--compile", action="store_true",
        help="wrap each model in torch.compile, compiled afresh per cell (recorded per row as "
        "compile; default off); the quantiser's codebook snapshot and update, the VQ attention "
        "op and the chunked S4D's scan run eager as graph breaks; the FFT convolution and (CUDA) "
        "the quantiser's nearest-code kernel are opaque custom ops. Compiled steps may trade "
        "time for memory with the config field activation_memory_budget (--set "
        "activation_memory_budget=0.5, or a variant such as "
        "'longvq[activation_memory_budget=0.5]'): the share of the default saved "
        "activations the backward keeps, the rest recomputed",
    )
    p_eff.add_argument(
        "--cuda-graph", action="store_true",
        help="capture each cell's whole training step (forward, backward, AdamW) in one CUDA "
        "graph after two eager steps and time its replays: the GPU time of a step without "
        "the CPU cost of launching its kernels (recorded per row as cuda_graph; CUDA only; "
        "default off)",
    )
    p_eff.add_argument(
        "--profile", default=None, metavar="MODEL",
        help="instead of the sweep: torch.profiler over a few training steps of MODEL (a name or "
        "a variant, e.g. 'longvq[key_grad=window]'; at the "
        "preset's profile length, else the first --lengths/--batch) and the top kernels by "
        "self device time (self CPU time on CPU), then every kernel summed by category; with "
        "--out: profile_MODEL_L<L>.{md,csv} and profile_MODEL_L<L>_categories.csv",
    )
    p_eff.add_argument(
        "--memory", default=None, metavar="MODEL",
        help="instead of the sweep: where a training step's memory goes for MODEL (at the shape "
        "--profile would use): parameters, gradients, optimizer state and every tensor the "
        "forward saves for the backward (counted per storage: a saved view keeps its whole "
        "base), by autograd node or compiled graph, by module when not compiled; on CUDA also "
        "the allocator's peak over one step; works on CPU; with --out: "
        "memory_MODEL_L<L>.{md,csv}",
    )
    p_eff.add_argument(
        "--profile-top", type=int, default=20, metavar="N",
        help="with --profile: how many kernels (ops on CPU) the table lists; with --memory: "
        "how many of the largest saved tensors (default 20)",
    )
    p_eff.add_argument(
        "--skip-after-oom", dest="skip_after_oom", action=argparse.BooleanOptionalAction,
        default=None,
        help="after a model runs out of memory (or is too slow) at some L, record its longer "
        "lengths as oom / skipped-after-oom without running them (default: on with --preset)",
    )
    p_eff.add_argument(
        "--max-step-s", dest="max_step_s", type=float, default=None,
        help="a warm-up step (after the first) slower than this ends the cell as error "
        "'too-slow' (default: the preset's, 10 s / 5 s on the GPU presets; else none)",
    )
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
        "timed steps: a CPU smoke run (with --preset: the preset's CPU-sized version)",
    )
    p_eff.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (3)")
    p_eff.add_argument(
        "--steps", type=int, default=None, help="timed steps per cell (10; 3 with --quick)"
    )
    p_eff.add_argument(
        "--force", action="store_true", help="re-measure cells even when the store already has them"
    )
    p_eff.add_argument(
        "--skip-check", dest="skip_check", action="store_true",
        help="time without first checking each model's fast kernels (Triton, mamba-ssm, fla, "
        "SDPA, chunked S4D) against its reference on this device; by default a model whose "
        "check fails is not timed (status wrong). Rows record check=skipped",
    )
    p_eff.add_argument(
        "--fail-fast", dest="fail_fast", action="store_true",
        help="stop at the first cell whose status is not ok (exit code 1)",
    )
    p_eff.add_argument(
        "--out", default=None,
        help="folder for efficiency.csv and time/memory-vs-length PNG plots (with --preset: "
        "also NAME.csv and NAME.md in the paper's format)",
    )
    p_eff.set_defaults(func=run)
