"""Evaluation of a model on a split: mean cross-entropy, accuracy and, for LM heads, the summed
loss and target count at every position (what bits per byte by position is computed from)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harness.measure import DTYPES
from harness.tasks import IGNORE_INDEX, Batch, Task


def correct_and_count(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(number of correct argmax predictions, number of scored targets) for either head."""
    if logits.dim() == 3:  # lm: (B, L, V) against (B, L)
        logits, targets = logits.flatten(0, 1), targets.flatten()
    scored = targets != IGNORE_INDEX
    return ((logits.argmax(-1) == targets) & scored).sum(), scored.sum()


def autocast_for(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _add_padded(total: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """total + values, the shorter zero-padded (lm batches may differ in length)."""
    if total is None:
        return values
    if len(values) > len(total):
        total, values = values, total
    total[:len(values)] += values
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterator[Batch], max_batches: int,
             device: torch.device, dtype: str) -> dict[str, Any]:
    """Mean cross-entropy (no aux loss) and accuracy over up to ``max_batches`` (0: all);
    lm heads add ``position_loss``/``position_count``: (L,) float64 arrays, the summed nats and
    the number of scored targets at each position."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    position_loss: torch.Tensor | None = None
    position_count: torch.Tensor | None = None
    n_batches = 0
    try:
        for tokens, targets in batches:
            tokens, targets = tokens.to(device), targets.to(device)
            with autocast_for(device, dtype):
                logits = model(tokens)
            logits = logits.float()
            if logits.dim() == 3:  # lm: score every position, summing per position too
                per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="none")
                per_token = per_token.view(targets.shape).double()
                loss_sum += per_token.sum()
                position_loss = _add_padded(position_loss, per_token.sum(0))
                position_count = _add_padded(position_count,
                                             (targets != IGNORE_INDEX).sum(0).double())
            else:
                loss_sum += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                            reduction="sum")
            hits, scored = correct_and_count(logits, targets)
            correct += hits
            count += scored
            n_batches += 1
            if max_batches and n_batches >= max_batches:
                break
    finally:
        model.train(was_training)
    total = int(count.item())
    if total == 0:
        raise ValueError("evaluation split yielded no targets")
    result: dict[str, Any] = {"loss": loss_sum.item() / total, "acc": correct.item() / total,
                              "targets": total}
    if position_loss is not None and position_count is not None:
        result.update(position_loss=position_loss.cpu().numpy(),
                      position_count=position_count.cpu().numpy())
    return result


def task_scores(task: Task, result: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The task's ``position_metrics`` of an evaluation, keys prefixed (none for cls heads)."""
    if "position_loss" not in result:
        return {}
    scores = task.position_metrics(np.asarray(result["position_loss"]),
                                   np.asarray(result["position_count"]))
    return {f"{prefix}{k}": v for k, v in scores.items()}
