"""On-disk cache of generated task splits (tokenised), so that slow generators run once per machine.

ListOps trees of 500-2000 tokens are drawn by rejection in pure Python: a 10k-example train split
takes about a minute, and a sweep of many cells (or several workers) would otherwise pay that per
cell. The cache stores exactly what the generator returned -- variable-length uint8 token rows and
int64 targets -- under a hash of everything the split depends on, so it never changes results:
a hit returns the same arrays a rebuild would (tests/test_task_cache.py checks this).

Location: ``$LONGVQ_CACHE_DIR`` (``off`` disables caching), else ``~/.cache/longvq-bench``.
Writes go to a temporary file renamed into place, so concurrent workers never read half a file;
an unreadable entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
Rows = tuple[list[np.ndarray], np.ndarray]


def cache_dir() -> Path | None:
    """The cache folder, or None when ``LONGVQ_CACHE_DIR=off``."""
    configured = os.environ.get("LONGVQ_CACHE_DIR", "")
    if configured.lower() == "off":
        return None
    return Path(configured) if configured else Path.home() / ".cache" / "longvq-bench"


def cache_key(params: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load(path: Path) -> Rows | None:
    try:
        with np.load(path) as data:
            flat, offsets, targets = data["tokens"], data["offsets"], data["targets"]
    except (OSError, ValueError, KeyError):
        return None
    rows = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return rows, targets


def _save(path: Path, rows: Rows) -> None:
    tokens, targets = rows
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(t) for t in tokens])
    flat = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, tokens=flat, offsets=offsets, targets=targets)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk only costs the speed-up
        Path(tmp).unlink(missing_ok=True)


def load_or_build(params: dict[str, Any], build: Callable[[], Rows]) -> Rows:
    """The split described by ``params`` (JSON-able: task, options, split, seed, sizes): from
    the cache when present, else ``build()`` and store it."""
    folder = cache_dir()
    if folder is None:
        return build()
    path = folder / "tasks" / f"{params.get('task', 'task')}-{cache_key(params)}.npz"
    if path.is_file():
        cached = _load(path)
        if cached is not None:
            return cached
    rows = build()
    _save(path, rows)
    return rows
