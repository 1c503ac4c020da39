"""Command line: ``python run_bench.py {list,efficiency,report} --help``.

User errors (unknown model, bad value, missing path) print one line naming the bad value and
exit with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.cpu_alloc import tune_glibc_malloc
from harness.provenance import REPO_ROOT
from harness.registry import REGISTRY, RegistryError

DEFAULT_STORE = REPO_ROOT / "results" / "bench.db"


class UsageError(ValueError):
    """A bad command-line value; the message names it."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (plus a pointer to --help) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# -- value parsers (each error names the bad value) ---------------------------------------------
def parse_int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part.lower().replace("k", "")) * (1024 if part.lower().endswith("k") else 1)
        except ValueError:
            raise UsageError(f"{flag}: {part!r} is not an integer") from None
        if value < minimum:
            raise UsageError(f"{flag}: {value} must be >= {minimum}")
        values.append(value)
    if not values:
        raise UsageError(f"{flag}: expected a comma-separated list, got {text!r}")
    return values


def parse_assignments(items: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"{flag}: expected field=value, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    if requested == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return requested


# -- list ---------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace, console: Console) -> int:
    import torch

    device = resolve_device(args.device)
    table = Table(title=f"registered models (backend on {device}, default size)")
    for column in ("name", "family", "backend", "params", "modes", "description"):
        table.add_column(column)
    for entry in REGISTRY.entries():
        modes = "/".join(m for m, ok in (("causal", entry.causal),
                                         ("bidirectional", entry.bidirectional)) if ok)
        cfg = entry.make_config(**({} if entry.bidirectional else {"head": "lm"}))
        try:
            torch.manual_seed(0)
            model = entry.build(cfg).to(device)
            with torch.no_grad():
                model(torch.zeros(1, 64, dtype=torch.long, device=device))
            backend, params = model.backend, f"{model.num_params():,}"
        except Exception as exc:  # noqa: BLE001 - list must show every entry
            backend, params = f"error: {type(exc).__name__}", "?"
        table.add_row(entry.name, entry.family, backend, params, modes, entry.description)
    console.print(table)
    for module, error in REGISTRY.import_errors().items():
        console.print(f"[red]module {module} failed to import:[/red] {error}")
    return 0


# -- efficiency ---------------------------------------------------------------------------------
def cmd_efficiency(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    if warmup < 1 or steps < 1:
        raise UsageError("--warmup and --steps must be >= 1")
    try:
        planned = plan_cells(entries, lengths, batches, device, dtype, overrides, warmup, steps,
                             args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    store = Store(args.store)
    console.print(f"[bold]efficiency[/bold]: {len(planned)} cells on {device} ({dtype}), "
                  f"store {store.url}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("cells", total=len(planned))

        def on_cell(item, record) -> None:
            cell = item.cell
            label = f"{cell.model} L={cell.seq_len} B={cell.batch}"
            if record is None:
                progress.console.print(f"  {label}: [dim]already in store, skipped[/dim]")
            else:
                ms = record.result.get("ms_median")
                detail = f"{ms:.1f} ms/step, {record.result['peak_mem_mib']:.0f} MiB" if ms \
                    else record.message[:120]
                colour = "green" if record.status == "ok" else "yellow"
                progress.console.print(f"  {label}: [{colour}]{record.status}[/{colour}] {detail}")
            progress.advance(task)

        try:
            run_cells(planned, store, force=args.force, on_cell=on_cell)
        except KeyboardInterrupt:
            done = sum(store.is_finished(p.key) for p in planned)
            console.print(f"[red]interrupted[/red]: {done}/{len(planned)} cells are in the store;"
                          " rerun the same command to finish the rest")
            return 130
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
    for column in ("model", "backend", "L", "batch", "status", "ms/step", "tokens/s",
                   "peak MiB", "params", "speed×vanilla", "mem×vanilla"):
        table.add_column(column, justify="right" if column[0].islower() is False else "left")
    for _, row in frame.iterrows():
        ok = row["status"] == "ok"
        table.add_row(
            str(row["model"]), str(row["backend"] or ""), str(row["seq_len"]), str(row["batch"]),
            str(row["status"]),
            f"{row['ms_median']:.1f}" if ok else "-",
            f"{row['tokens_per_s']:,.0f}" if ok else "-",
            f"{row['peak_mem_mib']:.1f}" if ok else "-",
            f"{int(row['params']):,}" if ok else "-",
            f"{row['speed_x_vanilla']:.2f}" if ok and row["speed_x_vanilla"] == row[
                "speed_x_vanilla"] else "-",
            f"{row['mem_x_vanilla']:.2f}" if ok and row["mem_x_vanilla"] == row[
                "mem_x_vanilla"] else "-",
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


# -- report -------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from harness.report import build_report
    from harness.store import Store

    path = Path(args.store)
    if "://" not in str(args.store) and not path.exists():
        raise UsageError(f"--store {str(path)!r} does not exist; run `efficiency` first")
    store = Store(args.store)
    report = build_report(store, Path(args.out))
    console.print(f"wrote {report}")
    return 0


# -- kernels ------------------------------------------------------------------------------------
def cmd_kernels(args: argparse.Namespace, console: Console) -> int:
    import pandas as pd
    import torch

    from harness.kernels import IMPLS, OpShape, benchmark, rows_as_dicts
    from harness.measure import DTYPES
    from harness.provenance import provenance

    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    for name in impls:
        if name not in IMPLS:
            raise UsageError(f"--impls: unknown implementation {name!r}; known: "
                             f"{', '.join(IMPLS)}")
    lengths = parse_int_list(args.lengths, "--lengths")
    device = resolve_device(args.device)
    if args.attn_fn not in ("softmax", "laplace"):
        raise UsageError(f"--attn-fn: {args.attn_fn!r}; choose softmax or laplace")
    shape = OpShape(batch=args.batch, heads=args.heads, dim=args.dim, value_dim=args.dim,
                    codebook_size=args.codebook_size, window=args.window,
                    attn_fn=args.attn_fn, causal=args.causal, local_bias=not args.no_bias)
    dtype = DTYPES[resolve_dtype(args.dtype, device)]
    prov = provenance(torch.device(device))
    mode = "fwd+bwd" if args.backward else "fwd"
    console.print(f"[bold]kernels[/bold]: vq_attention {mode} on {prov['device']}, {shape}")

    def on_row(row) -> None:
        ms = f"{row.ms_median:.2f} ms" if row.ms_median is not None else row.status
        growth = f" (x{row.growth:.2f} vs L/2)" if row.growth else ""
        console.print(f"  {row.impl:>7} L={row.seq_len:>6}: {ms}{growth}")

    rows = benchmark(impls, lengths, shape, device, dtype, args.backward, args.warmup,
                     args.repeats, on_row=on_row)
    table = Table(title=f"vq_attention {mode} time vs L ({prov['device']})")
    for column in ("impl", "L", "status", "ms (median)", "growth per doubling", "rel err"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.impl, str(row.seq_len), row.status,
                      f"{row.ms_median:.2f}" if row.ms_median is not None else "-",
                      f"{row.growth:.2f}" if row.growth else "-", f"{row.rel_err_vs_naive:.1e}")
    console.print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        extra = {"mode": mode, "dtype": str(dtype).removeprefix("torch."), **prov}
        frame = pd.DataFrame(rows_as_dicts(rows, shape, extra))
        frame.to_csv(out / "kernels.csv", index=False)
        lines = [f"# vq_attention {mode}: time vs sequence length", "",
                 f"Device `{prov['device']}`, torch {prov['torch']}, dtype {extra['dtype']}, "
                 f"commit {prov['git_commit']}, {prov['timestamp']}. Shape: {shape}. "
                 f"Median of {args.repeats} runs after {args.warmup} warm-up runs.", "",
                 "| impl | L | status | ms (median) | growth per doubling | rel err vs naive |",
                 "|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row.impl} | {row.seq_len} | {row.status} | "
                         f"{'-' if row.ms_median is None else f'{row.ms_median:.2f}'} | "
                         f"{'-' if not row.growth else f'{row.growth:.2f}'} | "
                         f"{row.rel_err_vs_naive:.1e} |")
        lines += ["", "Command: `python run_bench.py " + " ".join(sys.argv[1:]) + "`", ""]
        (out / "kernels.md").write_text("\n".join(lines))
        console.print(f"wrote {out / 'kernels.csv'}, {out / 'kernels.md'}")
    return 0


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="run_bench.py",
        description="longvq-bench: efficiency and ablation benchmarks for LongVQ and baselines.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    common = OneLineParser(add_help=False)
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (auto: cuda when available, else cpu)")
    common.add_argument("--store", default=str(DEFAULT_STORE),
                        help="results store: a SQLite file path or a database URL "
                             "(default: results/bench.db)")
    common.add_argument("--seed", type=int, default=0, help="seed for data and initialisation")

    p_list = sub.add_parser("list", parents=[common], help="list registered models",
                            description="Table of registry entries: family, backend that runs "
                                        "on this device, parameter count at default size, modes.")
    p_list.set_defaults(func=cmd_list)

    p_eff = sub.add_parser(
        "efficiency", parents=[common], help="time and memory of training steps vs length",
        description="Sweep models x lengths x batch sizes; each cell times training steps "
                    "(forward + backward + AdamW) and records peak memory into the store. Cells "
                    "already in the store with a final status (ok/oom/diverged) are skipped, so "
                    "a rerun resumes; error/interrupted cells are run again.")
    p_eff.add_argument("--models", default="all",
                       help="comma-separated registry names, or 'all' (default)")
    p_eff.add_argument("--lengths", default="1024,2048,4096",
                       help="comma-separated sequence lengths (1k = 1024), default 1024,2048,4096")
    p_eff.add_argument("--batch", default="4", help="comma-separated batch sizes (default 4)")
    p_eff.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast dtype (auto: bf16 on cuda, fp32 on cpu)")
    p_eff.add_argument("--set", nargs="*", metavar="FIELD=VALUE",
                       help="config overrides for every model that has the field, e.g. "
                            "--set d_model=256 n_layers=4 codebook_size=512")
    p_eff.add_argument("--quick", action="store_true",
                       help="small backbone (d_model=64, 2 layers, FFN 128, 4 heads) and 3 "
                            "timed steps: a CPU smoke run")
    p_eff.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (3)")
    p_eff.add_argument("--steps", type=int, default=None,
                       help="timed steps per cell (10; 3 with --quick)")
    p_eff.add_argument("--force", action="store_true",
                       help="re-measure cells even when the store already has them")
    p_eff.add_argument("--out", default=None,
                       help="folder for efficiency.csv and time/memory-vs-length PNG plots")
    p_eff.set_defaults(func=cmd_efficiency)

    p_ker = sub.add_parser(
        "kernels", parents=[common], help="time of the VQ-attention ops vs length",
        description="Time the VQ-attention implementations (naive L x L oracle, linear-time) "
                    "over sequence lengths and print the growth per doubling of L. Each "
                    "implementation is first checked against the naive oracle on this device; "
                    "a wrong one is not timed.")
    p_ker.add_argument("--impls", default="naive,linear",
                       help="comma-separated implementations (naive, linear)")
    p_ker.add_argument("--lengths", default="2k,4k,8k,16k", help="sequence lengths (1k = 1024)")
    p_ker.add_argument("--batch", type=int, default=1, help="batch size (1)")
    p_ker.add_argument("--heads", type=int, default=1, help="heads (1: LongVQ is single-head)")
    p_ker.add_argument("--dim", type=int, default=64, help="head dim of q/k and v (64)")
    p_ker.add_argument("--codebook-size", type=int, default=256, help="codes S (256)")
    p_ker.add_argument("--window", type=int, default=128, help="local window W (128)")
    p_ker.add_argument("--attn-fn", default="softmax", help="softmax or laplace")
    p_ker.add_argument("--causal", action="store_true", help="causal (default bidirectional)")
    p_ker.add_argument("--no-bias", action="store_true", help="no local bias")
    p_ker.add_argument("--backward", action="store_true", help="time forward + backward")
    p_ker.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="input dtype (auto: bf16 on cuda, fp32 on cpu)")
    p_ker.add_argument("--warmup", type=int, default=2, help="untimed runs per cell (2)")
    p_ker.add_argument("--repeats", type=int, default=5, help="timed runs per cell (5)")
    p_ker.add_argument("--out", default=None, help="folder for kernels.csv and kernels.md")
    p_ker.set_defaults(func=cmd_kernels)

    p_rep = sub.add_parser("report", parents=[common], help="write results/REPORT.md",
                           description="Build REPORT.md (tables, ratios, plots, provenance) "
                                       "from the store.")
    p_rep.add_argument("--out", default=str(REPO_ROOT / "results"),
                       help="folder for REPORT.md and plots/ (default: results/)")
    p_rep.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_glibc_malloc()
    # rich wraps at 80 columns when stdout is not a terminal (CI logs, pipes): tables need more
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        return int(args.func(args, console) or 0)
    except (UsageError, RegistryError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"run_bench.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
