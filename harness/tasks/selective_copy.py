"""Selective copying (Mamba, Gu & Dao 2023, Sec. 3.1 / App. E.1).

The Mamba paper runs the S4 repository's copying generator with ``variable=True``
(state-spaces/s4 ``src/dataloaders/datasets/copying.py``, ``torch_copying_data``). With
V = vocab_size, M = n_tokens and L = seq_len (the whole sequence), one example is

    data    d_1..d_M   uniform from [1, V - 2]   (with repetition, like S4's ``randint(1, A-1)``)
    slots   p_1 < ... < p_M   a uniform M-subset of [0, L - M), sorted
    inputs[0 : L - M]  = 0 (noise) except inputs[p_i] = d_i
    inputs[L - M : L]  = V - 1 (marker), M times
    targets[L - M + i] = d_i          (IGNORE_INDEX at every other position)

S4 reads the model's last M outputs as the copy; with an ``lm`` head that is the target at each
marker position, so a causal model must emit the data tokens in order while reading the markers.
The paper's setting is L = 4096, V = 16, M = 16 (so 4096 - 32 noise tokens); L is taken from
``TaskConfig.seq_len`` and the defaults below are the paper's V and M.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from harness.tasks import IGNORE_INDEX, Task, TaskConfig, register_task
from harness.tasks._common import ArrayTask, parse_options, token_dtype

NOISE = 0


@dataclass
class SelectiveCopyOptions:
    n_tokens: int = 16  # data tokens to memorise (S4's M)
    vocab_size: int = 16  # noise 0, data 1..V-2, marker V-1 (S4's A)

    def validate(self) -> None:
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {self.n_tokens}")
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (noise, a data token, marker), "
                             f"got {self.vocab_size}")


class SelectiveCopyTask(ArrayTask):
    name = "selective_copy"
    head = "lm"

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.options = parse_options(SelectiveCopyOptions(), config.options, self.name)
        m = self.options.n_tokens
        if config.seq_len < 2 * m:
            raise ValueError(f"task 'selective_copy': seq_len {config.seq_len} is too short for "
                             f"n_tokens {m} (needs seq_len >= 2 * n_tokens = {2 * m})")
        self.vocab_size = self.options.vocab_size
        self.n_classes = self.vocab_size
        self.marker = self.vocab_size - 1

    def generate(self, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        m, seq_len = self.options.n_tokens, self.config.seq_len
        body = seq_len - m  # noise + data part
        data = rng.integers(1, self.vocab_size - 1, size=(n, m))
        # a uniform m-subset per row: the m smallest of iid uniforms, then sorted by position
        slots = np.sort(np.argpartition(rng.random((n, body)), m - 1, axis=1)[:, :m], axis=1)
        tokens = np.full((n, seq_len), NOISE, dtype=np.int64)
        np.put_along_axis(tokens, slots, data, axis=1)
        tokens[:, body:] = self.marker
        targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
        targets[:, body:] = data
        dtype = token_dtype(self.vocab_size)
        return tokens.astype(dtype), targets.astype(dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                **{f"task_{k}": v for k, v in asdict(self.options).items()}}


@register_task("selective_copy")
def build_selective_copy(config: TaskConfig) -> Task:
    return SelectiveCopyTask(config)
