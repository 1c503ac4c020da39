"""Multi-query associative recall (MQAR), as in Zoology (Arora, Eyuboglu et al., 2023).

Mirrors ``zoology/data/multiquery_ar.py`` (HazyResearch/zoology). With V = vocab_size,
n = n_pairs, L = seq_len and C = 2n context tokens, one example is

    keys   k_1..k_n  distinct, uniform from [1, V/2)        values v_1..v_n distinct, from [V/2, V)
    inputs[0:C]      = k_1 v_1 k_2 v_2 ... k_n v_n
    gaps g_1..g_n    distinct, from [0, S) with S = (L - C) / 2, drawn without replacement with
                     P(g) ∝ (g + 1)^(a - 1)  (a = power_a: a power law, small gaps likely)
    inputs[C + 2 g_j]  = k_j   (the query)   targets[C + 2 g_j] = v_j   (IGNORE_INDEX elsewhere)
    other positions  = 0, then (random_non_queries) replaced by uniform tokens from [0, V)

Zoology builds labels one step ahead and shifts them (``labels[:, 1:]``), so the target sits at
the query key's own position: the causal model reads k_j and must emit v_j next. Every key is
queried exactly once, so n of the L positions carry a target.

Differences from Zoology, on purpose: a seeded ``numpy.random.Generator`` instead of the global
``np.random.seed``; sampling without replacement is vectorised (Gumbel top-k, the same
distribution as ``np.random.choice(replace=False, p=...)``'s successive draws); Zoology's
``vocab_size > input_seq_len`` assertion is dropped (nothing in the construction needs it) and
the default vocabulary is 256 so the task trains fast on CPU (Zoology's paper setting: 8192).

This module also holds the split/batching helpers the other offline tasks share
(:func:`index_batches`, :class:`ArrayTask`, :func:`parse_options`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from harness.config import apply_overrides
from harness.tasks import IGNORE_INDEX, Batch, Task, TaskConfig, register_task

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


def sample_without_replacement(rng: np.random.Generator, rows: int, n_choices: int, k: int,
                               log_weights: np.ndarray | None = None) -> np.ndarray:
    """(rows, k) distinct indices in [0, n_choices), in draw order. Gumbel top-k: the k largest
    of log w + Gumbel noise, sorted, are distributed as k successive weighted draws."""
    if log_weights is None:  # uniform: any iid continuous scores will do, and uniforms are cheap
        scores = rng.random((rows, n_choices))
    else:
        scores = rng.gumbel(size=(rows, n_choices)) + log_weights
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


@dataclass
class MQAROptions:
    n_pairs: int = 8  # Zoology num_kv_pairs
    vocab_size: int = 256  # Zoology's paper uses 8192; keys [1, V/2), values [V/2, V)
    power_a: float = 0.01  # query-gap power law; 1.0 = uniform gaps
    random_non_queries: bool = True  # fill non-key/value/query slots with random tokens

    def validate(self) -> None:
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if self.vocab_size // 2 - 1 < self.n_pairs:
            raise ValueError(f"vocab_size {self.vocab_size} has {self.vocab_size // 2 - 1} "
                             f"keys, fewer than n_pairs {self.n_pairs}")
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


class MQARTask(ArrayTask):
    name = "mqar"
    head = "lm"

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.options = parse_options(MQAROptions(), config.options, self.name)
        seq_len, n = config.seq_len, self.options.n_pairs
        if seq_len % 2:
            raise ValueError(f"task 'mqar': seq_len must be even, got {seq_len}")
        if 4 * n > seq_len:  # Zoology: num_kv_pairs * 4 <= input_seq_len
            raise ValueError(f"task 'mqar': seq_len {seq_len} is too short for n_pairs {n} "
                             f"(needs seq_len >= 4 * n_pairs = {4 * n})")
        self.vocab_size = self.options.vocab_size
        self.n_classes = self.vocab_size

    def generate(self, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        opts, seq_len = self.options, self.config.seq_len
        pairs, vocab = opts.n_pairs, opts.vocab_size
        context = 2 * pairs
        half = vocab // 2
        keys = 1 + sample_without_replacement(rng, n, half - 1, pairs)
        values = half + sample_without_replacement(rng, n, vocab - half, pairs)
        space = (seq_len - context) // 2
        log_p = (opts.power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
        gaps = sample_without_replacement(rng, n, space, pairs, log_weights=log_p)

        tokens = np.zeros((n, seq_len), dtype=np.int64)
        tokens[:, 0:context:2] = keys
        tokens[:, 1:context:2] = values
        query_pos = context + 2 * gaps
        np.put_along_axis(tokens, query_pos, keys, axis=1)
        targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
        np.put_along_axis(targets, query_pos, values, axis=1)
        if opts.random_non_queries:
            empty = tokens == 0  # keys >= 1 and values >= V/2, so 0 marks exactly the free slots
            tokens[empty] = rng.integers(0, vocab, size=int(empty.sum()))
        dtype = token_dtype(vocab)
        return tokens.astype(dtype), targets.astype(dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                **{f"task_{k}": v for k, v in asdict(self.options).items()}}


@register_task("mqar")
def build_mqar(config: TaskConfig) -> Task:
    return MQARTask(config)
