"""`report`: REPORT.md and a self-contained report.html from the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from harness.cli_args import UsageError
from harness.provenance import REPO_ROOT


def run(args: argparse.Namespace, console: Console) -> int:
    from harness.report import build_report
    from harness.store import Store

    path = Path(args.store)
    if "://" not in str(args.store) and not path.exists():
        raise UsageError(f"--store {str(path)!r} does not exist; run `efficiency`, `train` or "
                         "`sweep` first")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder")
    with Store(args.store) as store, console.status("building the report"):
        report = build_report(store, out)
    console.print(f"wrote {report} and {report.parent / 'report.html'}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p_rep = sub.add_parser(
        "report",
        parents=[common],
        help="write results/REPORT.md and results/report.html",
        description="Build REPORT.md and a self-contained report.html (efficiency, training "
        "results, ablation sweeps, optuna studies, plots, provenance) from the store.",
    )
    p_rep.add_argument(
        "--out",
        default=str(REPO_ROOT / "results"),
        help="folder for REPORT.md, report.html and plots/ (default: results/)",
    )
    p_rep.add_argument("--quick", action="store_true",
                       help="accepted as by every command; the report only reads the store (no "
                       "effect)")
    p_rep.set_defaults(func=run)
