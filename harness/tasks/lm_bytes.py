"""Byte-level causal language modelling on a real corpus read from disk (no download).

Corpus: by default the Python standard library of the running interpreter
(``sysconfig.get_paths()["stdlib"]``: every ``.py`` file under it, about 30 MB on CPython 3.11,
``site-packages``/``dist-packages``/``__pycache__`` and hidden folders skipped; the ``test``
package is kept, so a distribution that ships it separately has a smaller corpus, recorded in
``task_corpus_bytes``). ``options["corpus"]`` names any other folder of text files (every
non-empty file under it, or those with a suffix in ``options["extensions"]``).

Split by file, never by window: files ranked by sha1 of their corpus-relative path
(``harness/tasks/text.py``'s ``split_by_hash``): the first 15 % (>= 1 file) are ``test``, the
next 15 % ``val``, the rest ``train``, the same on every run and machine. A split is one uint8
buffer: its files in that order, each followed by the separator byte ``SEPARATOR`` (ASCII FS,
"file separator", absent from text files), so the model sees where a file ends and a new one
begins and there is no special token: vocab_size = 256.

An example is a window of seq_len + 1 bytes at offset s: tokens = buf[s : s+L],
targets = buf[s+1 : s+L+1], every position scored. train: batches forever, each window at a
uniform offset drawn from the run seed's stream (``n_train`` does not apply: the split is used
whole). val/test: k = min(n_val or n_test, floor((len - 1) / L)) non-overlapping windows with
offsets evenly spread over the split (round(i (len - 1 - L) / (k - 1))), the same for every seed.

Metrics (from harness/train.py's per-position losses, see :meth:`LMBytesTask.position_metrics`):
one token per byte, so with l_t the summed cross-entropy (nats) at window position t over n_t
scored bytes,

    bpb                = sum_t l_t / (ln 2 * sum_t n_t)             bits per byte
    bpb over [a, b)    = sum_{a<=t<b} l_t / (ln 2 * sum_{a<=t<b} n_t)   buckets 0-1K, 1K-4K,
                                                                    4K-16K, 16K-64K, 64K+
                                                                    (those the length reaches)

and a loss-vs-position profile over log-spaced position bins (``PROFILE_BINS_PER_OCTAVE``).
Uniform logits give exactly log2(256) = 8 bits per byte.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.tasks import Batch, Task, TaskConfig, register_task
from harness.tasks._common import check_split, parse_options, set_rng, to_batch
from harness.tasks.text import MIN_FILES, split_by_hash, stdlib_dir

NAME = "lm-bytes"
VOCAB_SIZE = 256
SEPARATOR = 0x1C  # ASCII FS ("file separator") after every file of a split
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
STDLIB_EXTENSIONS = ".py"
# position buckets of the bits-per-byte breakdown: [lo, hi) in window positions
BUCKETS: tuple[tuple[str, int, float], ...] = (
    ("0-1K", 0, 1024), ("1K-4K", 1024, 4096), ("4K-16K", 4096, 16384),
    ("16K-64K", 16384, 65536), ("64K+", 65536, math.inf))
PROFILE_BINS_PER_OCTAVE = 4


# -- metrics (pure functions of per-position summed losses) ---------------------------------------
def bits_per_byte(loss_nats: float, n_bytes: float) -> float:
    """Summed cross-entropy in nats over ``n_bytes`` predicted bytes -> bits per byte."""
    if n_bytes <= 0:
        return math.nan
    return float(loss_nats) / (math.log(2.0) * float(n_bytes))


def bucket_bpb(position_loss: np.ndarray, position_count: np.ndarray) -> dict[str, float]:
    """Bits per byte per position bucket (``BUCKETS``), only the buckets the length reaches."""
    loss, count = np.asarray(position_loss, np.float64), np.asarray(position_count, np.float64)
    out: dict[str, float] = {}
    for label, lo, hi in BUCKETS:
        if lo >= len(loss):
            break
        end = len(loss) if math.isinf(hi) else int(min(hi, len(loss)))
        out[label] = bits_per_byte(loss[lo:end].sum(), count[lo:end].sum())
    return out


def profile_edges(length: int, per_octave: int = PROFILE_BINS_PER_OCTAVE) -> list[int]:
    """Bin edges 0, 1, 2, ... growing by 2^(1/per_octave) (distinct integers), ending at length."""
    edges = {0, length}
    steps = math.ceil(per_octave * math.log2(max(length, 2))) + 1
    edges.update(min(length, round(2 ** (i / per_octave))) for i in range(steps))
    return sorted(edges)


def position_profile(position_loss: np.ndarray, position_count: np.ndarray) -> list[list[float]]:
    """[[first position, end position (exclusive), bpb], ...] over log-spaced position bins."""
    loss, count = np.asarray(position_loss, np.float64), np.asarray(position_count, np.float64)
    edges = profile_edges(len(loss))
    return [[lo, hi, bits_per_byte(loss[lo:hi].sum(), count[lo:hi].sum())]
            for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


# -- the corpus -----------------------------------------------------------------------------------
@dataclass
class LMBytesOptions:
    corpus: str = ""  # a folder of text files; "" = the running interpreter's standard library
    extensions: str = ""  # comma-separated suffixes; "" = .py for the stdlib, any file otherwise


def suffixes(value: str | list[str]) -> tuple[str, ...]:
    """``".py,.txt"`` (CLI) or ``[".py", ".txt"]`` (sweep file) -> (".py", ".txt")."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


def corpus_files(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Non-empty regular files under ``root`` (suffix in ``extensions`` unless empty), skipping
    hidden and cache/package folders."""
    found = []
    for folder, dirs, names in os.walk(root):
        # pruned in place, so os.walk never enters site-packages (most of the stdlib folder)
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if name.startswith(".") or (extensions and path.suffix not in extensions):
                continue
            if path.is_file() and path.stat().st_size > 0:
                found.append(path)
    return sorted(found)


def read_split(files: list[Path]) -> np.ndarray:
    """The files' bytes, each followed by SEPARATOR, as one read-only uint8 array."""
    parts: list[bytes] = []
    for path in files:
        try:
            parts.append(path.read_bytes())
        except OSError as err:
            raise ValueError(f"task {NAME!r}: cannot read corpus file {path}: "
                             f"{err.strerror}") from None
        parts.append(bytes([SEPARATOR]))
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


class LMBytesTask(Task):
    """Next-byte prediction over windows of a corpus split (see the module docstring)."""

    name = NAME
    head = "lm"
    vocab_size = VOCAB_SIZE
    n_classes = VOCAB_SIZE
    select_by = "loss"  # bits per byte is the metric: test the weights with the lowest val loss

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.options = parse_options(LMBytesOptions(), config.options, NAME)
        custom = bool(self.options.corpus)
        self.root = Path(self.options.corpus).expanduser() if custom else stdlib_dir()
        extensions = suffixes(self.options.extensions or ("" if custom else STDLIB_EXTENSIONS))
        what = f"a folder of text files{' (' + '/'.join(extensions) + ')' if extensions else ''}"
        if not self.root.is_dir():
            raise ValueError(f"task {NAME!r}: corpus {str(self.root)!r} is not a folder; "
                             f"expected {what}")
        files = corpus_files(self.root, extensions)
        if len(files) < MIN_FILES:
            raise ValueError(f"task {NAME!r}: corpus {str(self.root)!r} has {len(files)} "
                             f"non-empty files; expected {what} with >= {MIN_FILES} files "
                             "(one per split)")
        unreadable = [p for p in files if not os.access(p, os.R_OK)]
        if unreadable:
            raise ValueError(f"task {NAME!r}: corpus file {unreadable[0]} is not readable"
                             + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1
                                else ""))
        self.split_files = split_by_hash(self.root, files)
        self.split_bytes = {split: sum(p.stat().st_size + 1 for p in chosen)
                            for split, chosen in self.split_files.items()}
        need = config.seq_len + 1
        for split, size in self.split_bytes.items():
            if size < need:
                raise ValueError(f"task {NAME!r}: the {split} split of corpus "
                                 f"{str(self.root)!r} has {size} bytes, fewer than seq_len + 1 "
                                 f"= {need}; use a larger corpus or a shorter seq_len")
        self._buffers: dict[str, np.ndarray] = {}

    def buffer(self, split: str) -> np.ndarray:
        """The split's bytes (read once, on first use)."""
        if split not in self._buffers:
            self._buffers[split] = read_split(self.split_files[split])
        return self._buffers[split]

    def eval_offsets(self, split: str) -> np.ndarray:
        """Window offsets of val/test: non-overlapping, evenly spread (module docstring)."""
        length, size = self.config.seq_len, len(self.buffer(split))
        wanted = self.config.n_val if split == "val" else self.config.n_test
        k = min(wanted, (size - 1) // length)
        if k < 1:
            raise ValueError(f"task {NAME!r}: split {split!r} has 0 windows (n_{split}="
                             f"{wanted})")
        if k == 1:
            return np.zeros(1, dtype=np.int64)
        return np.round(np.arange(k) * ((size - 1 - length) / (k - 1))).astype(np.int64)

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        check_split(split, batch_size)
        buf, length = self.buffer(split), self.config.seq_len
        windows = np.lib.stride_tricks.sliding_window_view(buf, length + 1)  # a view, no copy
        if split == "train":
            rng = set_rng("train", seed)
            while True:
                rows = windows[rng.integers(0, len(windows), size=batch_size)]
                yield to_batch(rows[:, :-1], rows[:, 1:])
        offsets = self.eval_offsets(split)
        for start in range(0, len(offsets), batch_size):
            rows = windows[offsets[start:start + batch_size]]
            yield to_batch(rows[:, :-1], rows[:, 1:])

    def position_metrics(self, position_loss: np.ndarray,
                         position_count: np.ndarray) -> dict[str, Any]:
        return {"bpb": bits_per_byte(position_loss.sum(), position_count.sum()),
                "bpb_buckets": bucket_bpb(position_loss, position_count),
                "bpb_profile": position_profile(position_loss, position_count)}

    def describe(self) -> dict[str, Any]:
        corpus = (str(self.root) if self.options.corpus else
                  f"cpython-{'.'.join(map(str, sys.version_info[:3]))}-stdlib")
        return {**super().describe(), "task_corpus": corpus,
                "task_corpus_bytes": sum(self.split_bytes.values()),
                **{f"task_{s}_files": len(f) for s, f in self.split_files.items()}}


@register_task(NAME, no_data_dir_hint="give the corpus folder as the task option "
                                         "corpus=DIR, not data_dir")
def build_lm_bytes(config: TaskConfig) -> Task:
    return LMBytesTask(config)
