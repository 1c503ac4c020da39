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

The split/batching helpers all offline tasks share live in ``harness/tasks/_common.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from harness.tasks import IGNORE_INDEX, Task, TaskConfig, register_task
from harness.tasks._common import ArrayTask, parse_options, token_dtype


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
