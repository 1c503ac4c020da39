"""Shared command-line pieces: the one-line error parser and value parsers.

Every parse error names the bad value; the CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from harness.provenance import REPO_ROOT

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


def progress_bar(console, with_eta: bool = False):
    """The rich progress bar every long command uses (description, bar, n/total, times)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    if with_eta:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False)


def parse_task_options(items: list[str]) -> dict[str, Any]:
    """key=value pairs; values become int, float or bool (on/off, true/false) when they parse."""
    options: dict[str, Any] = {}
    for name, text in parse_assignments(items, "--task-opt").items():
        lowered = text.lower()
        value: Any = text
        if lowered in {"true", "on", "yes"} or lowered in {"false", "off", "no"}:
            value = lowered in {"true", "on", "yes"}
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        options[name] = value
    return options


def fixed_values(args) -> dict:
    """``--set`` and ``--task-opt`` of a sweep/tune command as one routed dict (task.<name>)."""
    values: dict = dict(parse_assignments(args.set or [], "--set"))
    values.update({f"task.{k}": v for k, v in parse_task_options(args.task_opt or []).items()})
    return values


def fixed_flag(key: str) -> str:
    """The flag a ``fixed_values`` key came from (--task-opt keys are routed as task.<name>)."""
    return "--task-opt" if key.startswith("task.") else "--set"
