"""vq_attention_linear against the quadratic oracle vq_attention_naive: outputs and gradients.

Keys are straight-through quantised, k_hat = codebook[codes] + (k - k.detach()), so the naive
path's autograd gives dL/dk for every key; the linear path must give the same through its custom
backward. Upstream gradients are random (never .sum()).
"""

from __future__ import annotations

import pytest
import torch

import models.vq_attention.linear as linear_module
from models.vq_attention import vq_attention, vq_attention_linear, vq_attention_naive

B, H, D, DV, S = 2, 2, 16, 8, 7
TOL = {torch.float64: 1e-5, torch.float32: 1e-3}


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float) -> None:
    """Relative error ||ref - tri|| / ||ref||, printed, must be <= ratio."""
    err = ((ref.double() - tri.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    print(f"{name:>4} rel err {err:.2e}")
    assert torch.isfinite(tri).all(), f"{name}: non-finite values"
    assert err <= ratio, f"{name}: relative error {err:.2e} > {ratio}"


def make_inputs(length, window, dtype, attn_fn, use_bias, seed=0, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    if attn_fn == "laplace":  # Mega divides by n ~ L: scale q so that the logits are O(1)
        q_scale *= length / D**0.5
    codes = torch.randint(0, S - 1, (B, H, length), generator=gen)  # code S - 1 is never used
    leaves = {
        "q": torch.randn(B, H, length, D, generator=gen, dtype=dtype) * q_scale,
        "k": torch.randn(B, H, length, D, generator=gen, dtype=dtype),
        "v": torch.randn(B, H, length, DV, generator=gen, dtype=dtype),
    }
    if use_bias:
        leaves["bias"] = torch.randn(2 * window - 1, generator=gen, dtype=dtype)
    for x in leaves.values():
        x.requires_grad_()
    codebook = torch.randn(H, S, D, generator=gen, dtype=dtype)
    return leaves, codebook, codes


def run(fn, leaves, codebook, codes, *, attn_fn, causal, window, grad_out=None):
    """Output and the gradients wrt every leaf (q, k through the STE, v, bias)."""
    k_hat = codebook[torch.arange(H)[None, :, None], codes] + (leaves["k"] - leaves["k"].detach())
    out = fn(
        leaves["q"], k_hat, leaves["v"], codebook, codes, leaves.get("bias"),
        attn_fn=attn_fn, causal=causal, window=window,
    )  # fmt: skip
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out, dict(zip(leaves, grads, strict=True)), grad_out


def compare(leaves, codebook, codes, ratio, **options):
    ref_o, ref_g, grad_out = run(vq_attention_naive, leaves, codebook, codes, **options)
    tri_o, tri_g, _ = run(
        vq_attention_linear, leaves, codebook, codes, grad_out=grad_out, **options
    )
    assert tri_o.dtype == ref_o.dtype
    assert_close("o", ref_o, tri_o, ratio)
    for name in ref_g:
        assert_close(f"d{name}", ref_g[name], tri_g[name], ratio)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [5, 63, 100])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_linear_matches_naive(attn_fn, causal, use_bias, length, dtype):
    leaves, codebook, codes = make_inputs(length, 16, dtype, attn_fn, use_bias)
    compare(leaves, codebook, codes, TOL[dtype], attn_fn=attn_fn, causal=causal, window=16)


@pytest.mark.parametrize("window", [1, 5])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_other_windows(attn_fn, causal, window):
    leaves, codebook, codes = make_inputs(37, window, torch.float64, attn_fn, True, seed=1)
    compare(leaves, codebook, codes, 1e-5, attn_fn=attn_fn, causal=causal, window=window)


@pytest.mark.parametrize("blocks_per_chunk", [1, 3])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_chunked_key_grad(monkeypatch, attn_fn, causal, use_bias, blocks_per_chunk):
    """The memory-bounded scan over chunks of blocks gives the same gradients."""
    monkeypatch.setattr(linear_module, "STATE_ELEMS", blocks_per_chunk * B * H * S * D * DV)
    leaves, codebook, codes = make_inputs(100, 8, torch.float64, attn_fn, use_bias, seed=2)
    compare(leaves, codebook, codes, 1e-5, attn_fn=attn_fn, causal=causal, window=8)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_straight_through_reaches_far_keys(attn_fn, causal):
    """Only one query gets an upstream gradient; keys far outside its window (seen only through
    their codes) still get the exact straight-through gradient."""
    length, window = 100, 8
    leaves, codebook, codes = make_inputs(length, window, torch.float64, attn_fn, True, seed=3)
    query = length - 1 if causal else 0
    far = slice(0, length - 1 - 2 * window) if causal else slice(2 * window, length)
    grad_out = torch.zeros(B, H, length, DV, dtype=torch.float64)
    grad_out[:, :, query] = torch.randn(B, H, DV, dtype=torch.float64)
    options = dict(attn_fn=attn_fn, causal=causal, window=window, grad_out=grad_out)
    _, ref_g, _ = run(vq_attention_naive, leaves, codebook, codes, **options)
    _, tri_g, _ = run(vq_attention_linear, leaves, codebook, codes, **options)
    assert (tri_g["k"][:, :, far].norm(dim=-1) > 0).all()
    assert_close("dk_far", ref_g["k"][:, :, far], tri_g["k"][:, :, far], 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_large_logits_stable(causal):
    leaves, codebook, codes = make_inputs(63, 16, torch.float64, "softmax", True, q_scale=100.0)
    compare(leaves, codebook, codes, 1e-5, attn_fn="softmax", causal=causal, window=16)
    leaves32, codebook32, codes = make_inputs(63, 16, torch.float32, "softmax", True, q_scale=100.0)
    out, grads, _ = run(
        vq_attention_linear,
        leaves32,
        codebook32,
        codes,
        attn_fn="softmax",
        causal=causal,
        window=16,
    )
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("length", [10, 40])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_strong_negative_bias(causal, length):
    """Rows that lie mostly inside the window with a bias of -20: no cancellation (a codes-for-
    all-keys form with a window correction gives NaN here in float32)."""
    leaves, codebook, codes = make_inputs(length, 16, torch.float32, "softmax", True, seed=6)
    with torch.no_grad():
        leaves["bias"].fill_(-20.0)
    compare(leaves, codebook, codes, 1e-3, attn_fn="softmax", causal=causal, window=16)


@pytest.mark.parametrize("impl", ["linear", "naive"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_bias_none_equals_zero_bias(attn_fn, causal, impl):
    leaves, codebook, codes = make_inputs(45, 8, torch.float64, attn_fn, True, seed=4)
    with torch.no_grad():
        leaves["bias"].zero_()

    def fn(*args, **kwargs):
        return vq_attention(*args, **kwargs, impl=impl)

    options = dict(attn_fn=attn_fn, causal=causal, window=8)
    zero_o, zero_g, grad_out = run(fn, leaves, codebook, codes, **options)
    del leaves["bias"]
    none_o, none_g, _ = run(fn, leaves, codebook, codes, grad_out=grad_out, **options)
    assert_close("o", zero_o, none_o, 1e-12)
    for name in none_g:
        assert_close(f"d{name}", zero_g[name], none_g[name], 1e-12)


def test_codebook_and_codes_get_no_gradient_and_shared_codebook():
    leaves, codebook, codes = make_inputs(40, 8, torch.float32, "softmax", True, seed=5)
    shared = codebook[:1].clone().requires_grad_()
    codes = codes.clone()
    k = leaves["k"]
    k_hat = k + (shared[0][codes] - k).detach()  # STVQ: no path to the codebook through k_hat
    args = (leaves["q"], k_hat, leaves["v"], shared, codes, leaves["bias"])
    out = vq_attention_linear(*args, attn_fn="softmax", causal=True, window=8)
    ref = vq_attention_naive(*args, attn_fn="softmax", causal=True, window=8)
    assert_close("o", ref, out, 1e-4)
    out.backward(torch.randn_like(out))
    assert shared.grad is None and leaves["k"].grad is not None


def test_dtype_and_argument_errors():
    leaves, codebook, codes = make_inputs(20, 4, torch.float32, "softmax", False)
    q, k, v = (leaves[n].detach().bfloat16() for n in ("q", "k", "v"))
    k_hat = codebook.bfloat16()[torch.arange(H)[None, :, None], codes]
    out = vq_attention(q, k_hat, v, codebook, codes, None, attn_fn="softmax", causal=True, window=4)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="impl"):
        vq_attention(q, k_hat, v, codebook, codes, None, attn_fn="softmax", causal=True, window=4,
                     impl="triton")  # fmt: skip
    with pytest.raises(ValueError, match="attn_fn"):
        vq_attention_linear(q, k_hat, v, codebook, codes, None, attn_fn="relu", causal=True,
                            window=4)  # fmt: skip
    with pytest.raises(ValueError, match="bias"):
        vq_attention_naive(q, k_hat, v, codebook, codes, torch.zeros(3), attn_fn="softmax",
                           causal=True, window=4)  # fmt: skip
