"""LongVQ and Transformer-VQ on CUDA (skipped without it): the linear op matches the naive oracle
on the device, and a bf16-autocast training step at long L is finite."""

from __future__ import annotations

import pytest
import torch

from harness.backbone import task_loss
from harness.registry import REGISTRY
from models.vq_attention import vq_attention_linear, vq_attention_naive
from tests.conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.gpu]


def rel(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref.float() - other.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_linear_op_matches_naive_on_cuda(causal, attn_fn):
    torch.manual_seed(0)
    batch, heads, length, dim, size, window = 2, 2, 1000, 64, 128, 64
    q = torch.randn(batch, heads, length, dim, device="cuda", requires_grad=True)
    codebook = torch.randn(heads, size, dim, device="cuda")
    codes = torch.randint(0, size, (batch, heads, length), device="cuda")
    k = torch.randn(batch, heads, length, dim, device="cuda", requires_grad=True)
    chosen = torch.gather(codebook.expand(batch, -1, -1, -1), 2,
                          codes[..., None].expand(-1, -1, -1, dim))
    v = torch.randn(batch, heads, length, dim, device="cuda", requires_grad=True)
    bias = (0.1 * torch.randn(2 * window - 1, device="cuda")).requires_grad_()
    grads = []
    outs = []
    for op in (vq_attention_naive, vq_attention_linear):
        k_hat = chosen + (k - k.detach())
        out = op(q, k_hat, v, codebook, codes, bias, attn_fn=attn_fn, causal=causal,
                 window=window)
        torch.manual_seed(1)  # the same random upstream gradient for both
        upstream = torch.randn_like(out)
        grads.append(torch.autograd.grad(out, (q, k, v, bias), upstream))
        outs.append(out.detach())
    # TF32 may be on for matmuls on Hopper: float32 tolerance 1e-3
    assert rel(outs[0], outs[1]) < 1e-3
    for name, ref, fast in zip(("dq", "dk", "dv", "dbias"), grads[0], grads[1], strict=True):
        assert rel(ref, fast) < 2e-3, name


@pytest.mark.parametrize("model", ["longvq", "transformer_vq"])
@pytest.mark.parametrize("head", ["cls", "lm"])
def test_bf16_training_step_at_long_length(model, head):
    entry = REGISTRY.get(model)
    torch.manual_seed(0)
    net = entry.build(entry.make_config(d_model=128, n_layers=2, head=head)).cuda()
    tokens = torch.randint(0, 256, (2, 8192), device="cuda")
    targets = torch.roll(tokens, -1, 1) if head == "lm" else torch.zeros(2, dtype=torch.long,
                                                                         device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = task_loss(net, net(tokens), targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("model", ["longvq[key_grad=window]", "transformer_sdpa"])
def test_cuda_graph_step_trains_like_eager_steps(monkeypatch, model):
    """--cuda-graph: the first graphed call is 2 eager steps plus a captured one (replayed), so
    its loss is eager step 3's; every later replay is one more step, same losses."""
    from harness.measure import EfficiencyCell, build_step
    from harness.registry import parse_model_spec

    monkeypatch.setenv("LONGVQ_TRITON_AUTOTUNE", "0")
    spec = parse_model_spec(model)
    config = spec.entry.make_config(d_model=64, n_layers=2, n_heads=2, d_ffn=128,
                                    **dict(spec.overrides))
    losses = {}
    for graph in (False, True):
        cell = EfficiencyCell(spec.label, 512, 2, "cuda", "fp32", seed=3, cuda_graph=graph)
        step = build_step(spec.entry, config, cell, torch.device("cuda")).step
        runs = [step() for _ in range(2 if graph else 4)]
        losses[graph] = torch.stack([x.float() for x in runs]).cpu()
    torch.testing.assert_close(losses[True], losses[False][2:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["longvq[key_grad=window]", "transformer_vq",
                                   "longvq[key_grad=window;ssm_conv=chunked]"])
def test_compiled_graphed_step_trains_like_eager_steps(monkeypatch, model):
    """--compile --cuda-graph (inductor, the Triton VQ op as custom ops inside its graph, the
    codebook snapshot and update eager around it; the whole step in one CUDA graph): the same
    losses as eager steps 3-4, to inductor's float32 reordering."""
    from harness.measure import EfficiencyCell, build_step
    from harness.registry import parse_model_spec

    monkeypatch.setenv("LONGVQ_TRITON_AUTOTUNE", "0")
    spec = parse_model_spec(model)
    config = spec.entry.make_config(d_model=64, n_layers=2, n_heads=2, d_ffn=128,
                                    **dict(spec.overrides))
    losses = {}
    for fast in (False, True):
        cell = EfficiencyCell(spec.label, 512, 2, "cuda", "fp32", seed=3, compile=fast,
                              cuda_graph=fast)
        step = build_step(spec.entry, config, cell, torch.device("cuda")).step
        runs = [step() for _ in range(2 if fast else 4)]
        losses[fast] = torch.stack([x.float() for x in runs]).cpu()
    torch.testing.assert_close(losses[True], losses[False][2:], rtol=1e-3, atol=1e-4)


def test_cuda_graph_cell_reports_the_memory_of_its_step():
    """A graph allocates its memory when it is captured, not when it is replayed: the peak of a
    --cuda-graph cell must still cover the step (at least ~the eager cell's peak), and, counted
    from the capture on, not the eager warm-up's buffers (at most ~25 % above eager)."""
    from harness.measure import EfficiencyCell, measure

    entry = REGISTRY.get("transformer_vanilla")
    config = entry.make_config(d_model=64, n_layers=2, n_heads=2, d_ffn=128)
    peaks = {}
    for graph in (False, True):
        cell = EfficiencyCell("transformer_vanilla", 2048, 4, "cuda", "bf16", warmup=3, steps=2,
                              cuda_graph=graph)
        outcome = measure(entry, config, cell)
        assert outcome.status == "ok", outcome.message
        peaks[graph] = outcome.metrics["peak_mem_mib"]
    assert 0.9 * peaks[False] <= peaks[True] <= 1.25 * peaks[False], peaks
    assert "capture" in outcome.metrics["peak_mem_method"]
