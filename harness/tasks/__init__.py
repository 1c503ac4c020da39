"""Tasks: offline data for training and evaluation (no downloads at run time).

A task module in this package defines a :class:`Task` subclass and registers a factory with
``@register_task("name")``. The factory takes a :class:`TaskConfig` and returns the task.
A task that reads data files from ``TaskConfig.data_dir`` says so
(``@register_task("name", data_dir="what the folder holds")``); every other task is refused a
``data_dir`` when it is built, so the option is never silently ignored. Task-specific
``options`` are checked by each task (``_common.parse_options``: unknown keys are errors).

Contract (what harness/train.py relies on):
- ``task.head`` is ``"cls"`` (one label per sequence: targets (B,)) or ``"lm"`` (a target per
  position: targets (B, L), ``IGNORE_INDEX`` where nothing is predicted — MQAR, selective copy,
  byte LM). Models are built with this head.
- ``task.vocab_size`` tokens in [0, vocab_size); ``task.n_classes`` labels for ``cls`` heads
  (for ``lm`` heads the model predicts over the vocabulary).
- ``task.batches(split, batch_size, seed)`` yields (tokens LongTensor (B, L), targets) forever
  for ``train`` and once over a fixed set for ``val``/``test``; the same seed gives the same data.
- Sequences of one batch have the same length L <= ``config.seq_len``; the token
  ``task.pad_id`` (if not None) pads shorter sequences.
- ``task.select_by``: ``"acc"`` (default) or ``"loss"``, the val metric that selects the weights
  scored on the test split.
- ``task.position_metrics(position_loss, position_count)`` (``lm`` heads, optional): extra
  metrics of one evaluation from the summed cross-entropy (nats) and the number of scored
  targets at each window position, both (L,) float64 arrays — e.g. bits per byte by position
  for the byte LM. harness/train.py stores them prefixed ``val_``/``test_``.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TaskConfig:
    """Common task knobs; task-specific options go in ``options`` (e.g. n_pairs for MQAR)."""

    seq_len: int = 512
    n_train: int = 10_000  # examples in the train split (generated tasks: per epoch)
    n_val: int = 500
    n_test: int = 500
    data_dir: str | None = None  # official release files (LRA TSVs, IMDB bytes), when given
    options: dict[str, Any] = field(default_factory=dict)


class Task:
    name: str = ""
    head: str = "cls"
    vocab_size: int = 256
    n_classes: int = 2
    pad_id: int | None = None
    select_by: str = "acc"  # val metric picking the tested weights: "acc" (max) | "loss" (min)

    def __init__(self, config: TaskConfig) -> None:
        self.config = config

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        raise NotImplementedError

    def position_metrics(self, position_loss: np.ndarray,
                         position_count: np.ndarray) -> dict[str, Any]:
        """Task-specific metrics of an lm-head evaluation (see the module docstring); none."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What the store records about the task (name, head, sizes, options)."""
        return {"task": self.name, "task_head": self.head, "task_vocab": self.vocab_size,
                "task_classes": self.n_classes, "task_seq_len": self.config.seq_len,
                **{f"task_{k}": v for k, v in self.config.options.items()}}


TaskFactory = Callable[[TaskConfig], Task]


class TaskRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, TaskFactory] = {}
        self._data_dirs: dict[str, str] = {}  # task -> what its data_dir holds (readers only)
        self._no_data_dir_hints: dict[str, str] = {}  # task -> where its files go instead
        self._discovered = False

    def register(self, name: str, data_dir: str = "",
                 no_data_dir_hint: str = "") -> Callable[[TaskFactory], TaskFactory]:
        """``data_dir``: what the task reads from ``TaskConfig.data_dir`` ("" = it reads none);
        ``no_data_dir_hint``: for a task that reads none, what to give instead."""
        def decorator(factory: TaskFactory) -> TaskFactory:
            if name in self._factories and self._factories[name] is not factory:
                raise KeyError(f"task name {name!r} is registered twice")
            self._factories[name] = factory
            if data_dir:
                self._data_dirs[name] = data_dir
            if no_data_dir_hint:
                self._no_data_dir_hints[name] = no_data_dir_hint
            return factory

        return decorator

    def discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._factories)

    def build(self, name: str, config: TaskConfig) -> Task:
        self.discover()
        if name not in self._factories:
            close = difflib.get_close_matches(name, list(self._factories), n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown task {name!r}.{hint} Known: "
                             f"{', '.join(sorted(self._factories))}")
        if config.data_dir and name not in self._data_dirs:
            readers = ", ".join(f"{task} ({what})"
                                for task, what in sorted(self._data_dirs.items()))
            hint = self._no_data_dir_hints.get(name, f"tasks that read one: {readers}")
            raise ValueError(f"task {name!r} reads no data_dir, got data_dir="
                             f"{config.data_dir!r}; {hint}")
        return self._factories[name](config)


TASKS = TaskRegistry()


def register_task(name: str, data_dir: str = "",
                  no_data_dir_hint: str = "") -> Callable[[TaskFactory], TaskFactory]:
    return TASKS.register(name, data_dir, no_data_dir_hint)
