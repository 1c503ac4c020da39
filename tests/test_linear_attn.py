"""Linear attention: the chunked / KᵀV torch path and fla's kernel against the L × L oracle.

Every comparison covers the output and the gradients wrt q, k, v (through φ = elu + 1) under a
random upstream gradient, at lengths that are not multiples of the chunk.
"""

from __future__ import annotations

import pytest
import torch

from baselines.linear_attn import (
    LinearAttention,
    feature_map,
    linear_attn_chunked,
    linear_attn_fla,
    linear_attn_naive,
)
from harness.registry import REGISTRY
from tests.conftest import assert_close, requires_cuda


def qkv(length: int, heads: int = 3, dim: int = 8, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed + length)
    return [torch.randn(2, heads, length, dim, generator=g).to(device) for _ in range(3)]


def compare(fast, inputs, dtype, tol, causal: bool) -> None:
    """``fast`` (on φ(q), φ(k), v in ``dtype``) vs the float64 oracle: output and dq, dk, dv."""
    ref_in = [t.detach().double().clone().requires_grad_() for t in inputs]
    fast_in = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
    q, k, v = ref_in
    out_ref = linear_attn_naive(feature_map(q), feature_map(k), v, causal)
    q, k, v = fast_in
    out = fast(feature_map(q), feature_map(k), v)
    assert out.dtype == dtype
    assert_close("o", out_ref, out, tol)
    upstream = torch.randn_like(out_ref)  # random upstream gradient, not .sum()
    out_ref.backward(upstream)
    out.backward(upstream.to(dtype))
    for name, a, b in zip(("dq", "dk", "dv"), ref_in, fast_in, strict=True):
        assert_close(name, a.grad, b.grad, 10 * tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-8), (torch.float32, 1e-4)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("length", "chunk"), [(63, 16), (100, 16), (63, 64), (5, 1)])
def test_chunked_matches_naive(length, chunk, causal, dtype, tol):
    def chunked(q, k, v):
        return linear_attn_chunked(q, k, v, causal, eps=1e-6, chunk_size=chunk)

    compare(chunked, qkv(length), dtype, tol, causal)


def test_naive_is_the_katharopoulos_formula():
    q, k, v = (t.double() for t in qkv(7, heads=1, dim=4))
    fq, fk = feature_map(q)[0, 0], feature_map(k)[0, 0]
    out = linear_attn_naive(feature_map(q), feature_map(k), v, causal=True, eps=0.0)[0, 0]
    for i in range(7):
        weights = fk[: i + 1] @ fq[i]  # φ(q_i)·φ(k_j), j ≤ i
        torch.testing.assert_close(out[i], weights @ v[0, 0, : i + 1] / weights.sum())
    assert (feature_map(torch.tensor([-5.0, 0.0, 3.0])) > 0).all()


@pytest.mark.parametrize("head", ["cls", "lm"])
def test_module_core_matches_naive_and_records_backend(head):
    entry = REGISTRY.get("linear_attn")
    cfg = entry.make_config(d_model=24, n_heads=3, head=head, chunk_size=16, use_fla=False)
    layer = LinearAttention(cfg).double()
    q, k, v = (t.double() for t in qkv(50))
    out = layer.core(q, k, v)
    torch.testing.assert_close(out, linear_attn_naive(feature_map(q), feature_map(k), v,
                                                      cfg.causal, cfg.eps))
    assert layer.backend == ("torch-chunked" if head == "lm" else "torch-kv")


def test_lm_head_is_causal():
    entry = REGISTRY.get("linear_attn")
    torch.manual_seed(0)
    model = entry.build(d_model=32, n_heads=2, n_layers=2, head="lm", chunk_size=8).double()
    tokens = torch.randint(0, 256, (2, 40))
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    out, out_changed = model(tokens), model(changed)
    torch.testing.assert_close(out[:, :25], out_changed[:, :25])
    assert not torch.allclose(out[:, 25:], out_changed[:, 25:])


def test_autocast_keeps_the_torch_core_in_float32():
    entry = REGISTRY.get("linear_attn")
    cfg = entry.make_config(d_model=16, n_heads=2, head="lm", chunk_size=8)
    layer = LinearAttention(cfg)
    q, k, v = qkv(20, heads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.core(q, k, v)
    assert out.dtype == torch.float32
    assert_close("o", linear_attn_naive(feature_map(q), feature_map(k), v, True), out, 1e-5)


def fake_fla_kernel(q, k, v, scale=None, normalize=True):
    """fla's ``naive_recurrent_linear_attn`` semantics: (B, T, H, D) layout, S += k vᵀ, o = S q."""
    assert normalize is False and scale == 1.0
    state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    outs = []
    for t in range(q.shape[1]):
        state = state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t] * scale))
    return torch.stack(outs, dim=1), None


def test_fla_wrapper_layout_and_normaliser_with_a_cpu_stand_in():
    def fla_path(q, k, v):
        return linear_attn_fla(q, k, v, eps=1e-6, kernel=fake_fla_kernel)

    compare(fla_path, qkv(37), torch.float64, 1e-10, causal=True)


# -- CUDA: fla's chunk kernel -------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("length", [63, 100, 300])
def test_fla_chunk_matches_naive_on_cuda(length):
    pytest.importorskip("fla")
    compare(linear_attn_fla, qkv(length, heads=4, dim=32, device="cuda"), torch.float32, 2e-3,
            causal=True)


@requires_cuda
def test_registry_model_uses_fla_on_cuda():
    pytest.importorskip("fla")
    entry = REGISTRY.get("linear_attn")
    model = entry.build(d_model=64, n_heads=4, n_layers=2, head="lm").cuda()
    model(torch.randint(0, 256, (2, 128), device="cuda")).sum().backward()
    assert model.backend == "fla-chunk"
