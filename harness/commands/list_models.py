"""`list`: the registry entries with backend, params, modes and the longest L measured."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.cli_args import (
    resolve_device,
)
from harness.registry import REGISTRY


def max_tested_lengths(store_arg: str) -> dict[str, str] | None:
    """Per entry, the longest L of an ``ok`` efficiency or training row in the store, with its
    device ("65,536 on NVIDIA H200"); None when there is no store (list never creates one)."""
    import pandas as pd

    from harness.store import Store

    if "://" not in store_arg and not Path(store_arg).exists():
        return None
    with Store(store_arg) as store:
        frame = store.dataframe()
    if frame.empty or "seq_len" not in frame:
        return {}
    frame = frame[(frame["status"] == "ok") & frame["seq_len"].notna()].copy()
    frame["entry"] = frame["model"].astype(str).str.split("[").str[0]  # variants: their entry
    frame["seq_len"] = pd.to_numeric(frame["seq_len"])
    out = {}
    for entry, rows in frame.groupby("entry"):
        top = rows.loc[rows["seq_len"].idxmax()]
        device = top.get("device") if isinstance(top.get("device"), str) else "?"
        out[entry] = f"{int(top['seq_len']):,} on {device}"
    return out


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    device = resolve_device(args.device)
    tested = max_tested_lengths(args.store)
    table = Table(title=f"registered models (backend on {device}, default size)")
    for column in ("name", "family", "backend", "params", "modes", "max tested L",
                   "description"):
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
        table.add_row(entry.name, entry.family, backend, params, modes,
                      (tested or {}).get(entry.name, "-"), entry.description)
    console.print(table)
    if tested is None:
        console.print(f"max tested L: no store at {args.store} (the longest L each model ran "
                      "at, from the store's ok rows)", markup=False)
    for module, error in REGISTRY.import_errors().items():
        console.print(f"[red]module {module} failed to import:[/red] {error}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p_list = sub.add_parser(
        "list",
        parents=[common],
        help="list registered models",
        description="Table of registry entries: family, backend that runs "
        "on this device, parameter count at default size, modes, and the longest sequence "
        "length each ran at (an ok efficiency or training row in --store, with its device).",
    )
    p_list.add_argument("--quick", action="store_true",
                        help="accepted as by every command; list is quick already (no effect)")
    p_list.set_defaults(func=run)
