"""`list`: the registry entries with backend, params and modes."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from harness.cli_args import (
    resolve_device,
)
from harness.registry import REGISTRY


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    device = resolve_device(args.device)
    table = Table(title=f"registered models (backend on {device}, default size)")
    for column in ("name", "family", "backend", "params", "modes", "description"):
        table.add_column(column)
    for entry in REGISTRY.entries():
        modes = "/".join(
            m for m, ok in (("causal", entry.causal), ("bidirectional", entry.bidirectional)) if ok
        )
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


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p_list = sub.add_parser(
        "list",
        parents=[common],
        help="list registered models",
        description="Table of registry entries: family, backend that runs "
        "on this device, parameter count at default size, modes.",
    )
    p_list.set_defaults(func=run)
