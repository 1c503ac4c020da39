"""Optional dependencies (triton, and our kernels built on it): whether they import, and
whether Triton runs as its CPU interpreter."""

from __future__ import annotations

import importlib
import os

import torch

_IMPORTABLE: dict[str, bool] = {}  # module -> whether it imported (asked once per process)


# A constant to dynamo: a compiled model evaluates it once while tracing, and the answer cannot
# change within a process. (Cached in a dict: dynamo warns when it meets a functools cache.)
@torch.compiler.assume_constant_result
def importable(module: str) -> bool:
    """Whether ``module`` imports: the package it needs is installed and its build works."""
    if module not in _IMPORTABLE:
        try:
            importlib.import_module(module)
            _IMPORTABLE[module] = True
        except Exception:  # noqa: BLE001 - missing package or broken install alike
            _IMPORTABLE[module] = False
    return _IMPORTABLE[module]


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1), where CPU tensors are allowed."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
