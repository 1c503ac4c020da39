"""Command line: ``python run_bench.py {list,efficiency,kernels,report,...} --help``.

Subcommands live in harness/commands/ (one module each). User errors (unknown model, bad value,
missing path) print one line naming the bad value and exit with code 2; ``--debug`` shows the
traceback instead. SIGTERM (a batch scheduler, ``kill``) is handled like Ctrl-C: the running cell is
stored as ``interrupted``, finished cells stay, and the command exits with code 130.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from harness.cli_args import DEFAULT_STORE, OneLineParser, UsageError
from harness.commands import COMMANDS
from harness.cpu_alloc import tune_glibc_malloc
from harness.registry import RegistryError
from models.triton_precompile import for_every_autotuner


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="run_bench.py",
        description="longvq-bench: efficiency and ablation benchmarks for LongVQ and baselines.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    common = OneLineParser(add_help=False)
    common.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run (auto: cuda when available, else cpu)",
    )
    common.add_argument(
        "--store",
        default=str(DEFAULT_STORE),
        help="results store: a SQLite file path or a database URL (default: results/bench.db)",
    )
    common.add_argument("--seed", type=int, default=0, help="seed for data and initialisation")
    for name in COMMANDS:
        importlib.import_module(f"harness.commands.{name}").add_parser(sub, common)
    return parser


def _terminate_as_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    # signal handlers can only be installed from the main thread (in-process callers may not be)
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_out_folder(out: str | None) -> None:
    """--out names a folder to create or fill: refuse a file there before any work is done
    (not after an hour of measurements)."""
    if out and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_glibc_malloc()
    # rich wraps at 80 columns when stdout is not a terminal (CI logs, pipes): tables need more
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        check_out_folder(getattr(args, "out", None))
        # every autotuned Triton kernel (ours, mamba-ssm's, fla's) compiles its configs in
        # parallel threads before tuning: cold first calls cost minutes of serial compiles
        with for_every_autotuner():
            return int(args.func(args, console) or 0)
    except (UsageError, RegistryError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"run_bench.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a command's own handler (planning, opening the store)
        if args.debug:
            raise
        print(f"run_bench.py {args.command}: interrupted", file=sys.stderr)
        return 130
