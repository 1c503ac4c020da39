"""Split and batching helpers shared by the offline tasks (splits, seeded RNGs, array tasks).

Val and test are fixed sets drawn with their own RNG keys (the same for every training seed);
train is a fixed set of ``n_train`` examples reshuffled each epoch by the run seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from harness.config import apply_overrides
from harness.tasks import Batch, Task, TaskConfig

SPLITS = ("train", "val", "test")
_SPLIT_TAG = {"train": 0, "val": 1, "test": 2}
_SHUFFLE_TAG = 3

_CHUNK = 1024  # examples generated per call: bounds the (chunk, vocab) scratch arrays

OptionsT = TypeVar("OptionsT")


def parse_options(defaults: OptionsT, options: dict[str, Any], task: str) -> OptionsT:
    """``defaults`` with ``options`` applied (CLI strings coerced); bad key or value: ValueError."""
    try:
        return apply_overrides(defaults, dict(options))  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"task {task!r}: {err}") from None


def make_rng(*key: int) -> np.random.Generator:
    """An independent stream per key tuple; no global RNG state is read or written."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def set_rng(split: str, seed: int) -> np.random.Generator:
    """The stream that generates a split. val/test do not depend on the run seed, so runs with
    different seeds are scored on the same examples; train does."""
    return make_rng(_SPLIT_TAG[split], seed if split == "train" else 0)


def check_split(split: str, batch_size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def index_batches(n: int, split: str, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Example indices per batch: val/test once in order (last batch may be short); train
    forever, each epoch a fresh permutation keyed by (seed, epoch), batches crossing epochs."""
    check_split(split, batch_size)
    if n < 1:
        raise ValueError(f"split {split!r} has no examples")
    if split != "train":
        for start in range(0, n, batch_size):
            yield np.arange(start, min(start + batch_size, n))
        return
    pending = np.empty(0, dtype=np.int64)
    epoch = 0
    while True:
        while len(pending) < batch_size:
            perm = make_rng(_SHUFFLE_TAG, seed, epoch).permutation(n)
            pending = np.concatenate([pending, perm])
            epoch += 1
        yield pending[:batch_size]
        pending = pending[batch_size:]


def token_dtype(vocab_size: int) -> type[np.signedinteger]:
    """Smallest dtype holding tokens and IGNORE_INDEX (keeps fixed train sets small in RAM)."""
    return np.int16 if vocab_size <= np.iinfo(np.int16).max else np.int32


def to_batch(tokens: np.ndarray, targets: np.ndarray) -> Batch:
    return (torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(targets.astype(np.int64)))


class ArrayTask(Task):
    """A task whose splits are fixed arrays made by :meth:`generate` (train: ``n_train``
    examples from the run seed; val/test: ``n_val``/``n_test`` examples, seed-independent)."""

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self._cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def generate(self, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def split_size(self, split: str) -> int:
        return {"train": self.config.n_train, "val": self.config.n_val,
                "test": self.config.n_test}[split]

    def arrays(self, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (N, L), targets) of one split, generated once per (split, seed)."""
        check_split(split, 1)
        key = (split, seed if split == "train" else 0)
        if key not in self._cache:
            rng, n = set_rng(split, seed), self.split_size(split)
            parts = [self.generate(split, min(_CHUNK, n - s), rng) for s in range(0, n, _CHUNK)]
            if not parts:
                raise ValueError(f"task {self.name!r}: split {split!r} has 0 examples")
            self._cache[key] = (np.concatenate([p[0] for p in parts]),
                                np.concatenate([p[1] for p in parts]))
        return self._cache[key]

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        check_split(split, batch_size)
        tokens, targets = self.arrays(split, seed)
        for idx in index_batches(len(tokens), split, batch_size, seed):
            yield to_batch(tokens[idx], targets[idx])
