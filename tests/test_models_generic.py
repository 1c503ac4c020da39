"""Run for every registry entry automatically: a new model file is tested with no other change.

Each entry, in each head it supports (``cls`` when bidirectional, ``lm`` when causal): builds,
forward shape, finite outputs, finite gradients reaching the parameters, one optimizer step
lowers the loss on a fixed batch, and an efficiency smoke cell on CPU ends ``ok``.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.backbone import task_loss
from harness.measure import EfficiencyCell, measure
from harness.optim import build_optimizer
from tests.conftest import TINY_BACKBONE, entry_head_params

LENGTH = 48
BATCH = 3


def build_tiny(entry, head: str):
    torch.manual_seed(0)
    cfg = entry.make_config(**TINY_BACKBONE, head=head)
    return cfg, entry.build(cfg)


def fixed_batch(cfg, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, LENGTH), generator=generator)
    if cfg.head == "lm":
        return tokens, torch.roll(tokens, -1, dims=1)
    return tokens, torch.randint(0, cfg.n_classes, (BATCH,), generator=generator)


@pytest.mark.parametrize(("entry", "head"), entry_head_params())
def test_forward_shape_and_finite(entry, head):
    cfg, model = build_tiny(entry, head)
    tokens, _ = fixed_batch(cfg)
    logits = model(tokens)
    expected = (BATCH, LENGTH, cfg.vocab_size) if head == "lm" else (BATCH, cfg.n_classes)
    assert tuple(logits.shape) == expected
    assert torch.isfinite(logits).all()
    assert isinstance(model.backend, str) and model.backend
    assert model.num_params() > 0


@pytest.mark.parametrize(("entry", "head"), entry_head_params())
def test_backward_gives_finite_grads(entry, head):
    cfg, model = build_tiny(entry, head)
    tokens, targets = fixed_batch(cfg)
    task_loss(model, model(tokens), targets).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with_grad = [(n, p) for n, p in params if p.grad is not None]
    # every parameter that received a gradient has a finite one, and most parameters get one
    for name, param in with_grad:
        assert torch.isfinite(param.grad).all(), name
    assert len(with_grad) >= 0.8 * len(params), [n for n, p in params if p.grad is None]
    assert model.embed.weight.grad is not None and model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("entry", "head"), entry_head_params())
def test_one_step_lowers_loss(entry, head):
    cfg, model = build_tiny(entry, head)
    tokens, targets = fixed_batch(cfg)
    optimizer, _ = build_optimizer(model, lr=1e-3, weight_decay=0.0)

    def eval_loss() -> float:
        model.eval()  # eval: no codebook update, no dropout — the same function before and after
        with torch.no_grad():
            loss = task_loss(model, model(tokens), targets).item()
        model.train()
        return loss

    before = eval_loss()
    optimizer.zero_grad()
    task_loss(model, model(tokens), targets).backward()
    optimizer.step()
    after = eval_loss()
    assert math.isfinite(after) and after < before, (before, after)


@pytest.mark.parametrize(("entry", "head"), entry_head_params())
def test_efficiency_smoke_cell_on_cpu(entry, head):
    cfg = entry.make_config(**TINY_BACKBONE, head=head)
    cell = EfficiencyCell(entry.name, seq_len=64, batch=2, device="cpu", dtype="fp32",
                          warmup=1, steps=2)
    outcome = measure(entry, cfg, cell)
    assert outcome.status == "ok", outcome.message
    metrics = outcome.metrics
    assert metrics["ms_median"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["peak_mem_mib"] > 0 and metrics["params"] > 0
    assert metrics["ms_p20"] <= metrics["ms_median"] <= metrics["ms_p80"]
