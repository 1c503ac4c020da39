"""vq_attention_linear against the quadratic oracle vq_attention_naive: outputs and gradients.

Keys are straight-through quantised, k_hat = codebook[codes] + (k - k.detach()), so the naive
path's autograd gives dL/dk for every key; the linear path must give the same through its custom
backward, with either far-key gradient strategy ("codes": per-code states, "dense": chunked
tiles), and the same for key_grad="window". Upstream gradients are random (never .sum()).
"""

from __future__ import annotations

import pytest
import torch

import models.vq_attention._key_grad as key_grad_module
from models.vq_attention import vq_attention, vq_attention_linear, vq_attention_naive
from models.vq_attention._key_grad import choose_strategy
from models.vq_attention._local import Blocks
from tests.conftest import assert_close

B, H, D, DV, S = 2, 2, 16, 8, 7
STRATEGIES = ["codes", "dense"]
TOL = {torch.float64: 1e-5, torch.float32: 1e-3}



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


def run(fn, leaves, codebook, codes, grad_out=None, **options):
    """Output and the gradients wrt every leaf (q, k through the STE, v, bias)."""
    heads = torch.arange(H, device=codes.device)[None, :, None]
    k_hat = codebook[heads, codes] + (leaves["k"] - leaves["k"].detach())
    out = fn(leaves["q"], k_hat, leaves["v"], codebook, codes, leaves.get("bias"), **options)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out, dict(zip(leaves, grads, strict=True)), grad_out


def compare(leaves, codebook, codes, ratio, strategy="auto", **options):
    ref_o, ref_g, grad_out = run(vq_attention_naive, leaves, codebook, codes, **options)
    tri_o, tri_g, _ = run(
        vq_attention_linear, leaves, codebook, codes, grad_out, key_grad_strategy=strategy,
        **options,
    )
    assert tri_o.dtype == ref_o.dtype
    assert_close("o", ref_o, tri_o, ratio)
    for name in ref_g:
        assert_close(f"d{name}", ref_g[name], tri_g[name], ratio)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [5, 63, 100])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_linear_matches_naive(attn_fn, causal, use_bias, length, dtype, strategy):
    leaves, codebook, codes = make_inputs(length, 16, dtype, attn_fn, use_bias)
    compare(leaves, codebook, codes, TOL[dtype], strategy, attn_fn=attn_fn, causal=causal,
            window=16)  # fmt: skip


@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES])
@pytest.mark.parametrize("window", [1, 5])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_other_windows(attn_fn, causal, window, strategy):
    leaves, codebook, codes = make_inputs(37, window, torch.float64, attn_fn, True, seed=1)
    compare(leaves, codebook, codes, 1e-5, strategy, attn_fn=attn_fn, causal=causal,
            window=window)  # fmt: skip


@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES])
@pytest.mark.parametrize("length", [5, 150])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_no_window(attn_fn, causal, length, strategy):
    """W = 0, no local part: the linear path (blocks of NO_WINDOW_BLOCK, three at L = 150) against
    the oracle; and the oracle at W = 0 is VQ attention without bias at any window."""
    leaves, codebook, codes = make_inputs(length, 0, torch.float64, attn_fn, False, seed=9)
    compare(leaves, codebook, codes, 1e-5, strategy, attn_fn=attn_fn, causal=causal, window=0)
    options = dict(attn_fn=attn_fn, causal=causal)
    none_o, none_g, grad_out = run(vq_attention_naive, leaves, codebook, codes, window=0,
                                   **options)
    other_o, other_g, _ = run(vq_attention_naive, leaves, codebook, codes, grad_out, window=7,
                              **options)
    assert_close("o", other_o, none_o, 1e-12)
    for name in none_g:
        assert_close(f"d{name}", other_g[name], none_g[name], 1e-12)


@pytest.mark.parametrize("impl", ["linear", "naive"])
def test_no_window_errors(impl):
    """W = 0 has no bias and no exact local blocks (key_grad="window" would train no key); a
    negative window is refused. Each error names the value and the fix."""
    leaves, codebook, codes = make_inputs(20, 0, torch.float32, "softmax", False)
    args = (leaves["q"], codebook[torch.arange(H)[None, :, None], codes], leaves["v"], codebook,
            codes)
    options = dict(attn_fn="softmax", causal=True, impl=impl)
    with pytest.raises(ValueError, match="window=0 has no local part.*bias"):
        vq_attention(*args, torch.zeros(1), window=0, **options)
    with pytest.raises(ValueError, match="key_grad='ste'"):
        vq_attention(*args, None, window=0, key_grad="window", **options)
    with pytest.raises(ValueError, match="window must be an int >= 0, got -1"):
        vq_attention(*args, None, window=-1, **options)


@pytest.mark.parametrize(("strategy", "pieces"), [("codes", 1), ("codes", 3), ("dense", 1),
                                                  ("dense", 3)])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_chunked_key_grad(monkeypatch, attn_fn, causal, use_bias, strategy, pieces):
    """Memory bounds that split the work into many pieces give the same gradients: "codes" scans
    chunks of 1-2 blocks (causal: carry + in-chunk dense tile) and sums/applies the total state in
    row chunks (bidirectional); "dense" runs tiles of `pieces` x W positions (full, partial and
    skipped tiles)."""
    window, e_dim = 8, DV + (attn_fn == "softmax")
    monkeypatch.setattr(key_grad_module, "STATE_ELEMS", pieces * B * H * S * D * e_dim)
    monkeypatch.setattr(key_grad_module, "TILE_ELEMS", B * H * (pieces * window) ** 2)
    leaves, codebook, codes = make_inputs(100, window, torch.float64, attn_fn, use_bias, seed=2)
    compare(leaves, codebook, codes, 1e-5, strategy, attn_fn=attn_fn, causal=causal,
            window=window)  # fmt: skip


def test_auto_strategy_follows_the_cost_estimate():
    """Dense tiles for short sequences, per-code states for long ones (S D Dv vs L (D + Dv))."""
    for causal in (True, False):
        for mode in (("past",) if causal else ("far", "all")):
            def pick(length, mode=mode, causal=causal):
                blocks = Blocks(length, 64, -(-length // 64), causal)
                return choose_strategy(mode, blocks, 2, 1, 256, 64, 129)
            assert pick(512) == "dense" and pick(2048) == "dense"
            assert pick(65536) == "codes"


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
    options = dict(attn_fn=attn_fn, causal=causal, window=window)
    _, ref_g, _ = run(vq_attention_naive, leaves, codebook, codes, grad_out, **options)
    for strategy in STRATEGIES:
        _, tri_g, _ = run(vq_attention_linear, leaves, codebook, codes, grad_out,
                          key_grad_strategy=strategy, **options)  # fmt: skip
        assert (tri_g["k"][:, :, far].norm(dim=-1) > 0).all()
        assert_close("dk_far", ref_g["k"][:, :, far], tri_g["k"][:, :, far], 1e-5)
    for fn in (vq_attention_naive, vq_attention_linear):  # "window": far keys get nothing
        _, window_g, _ = run(fn, leaves, codebook, codes, grad_out, key_grad="window", **options)
        assert (window_g["k"][:, :, far] == 0).all()
        assert (window_g["k"].norm(dim=-1) > 0).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("length", [5, 63, 100])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_window_key_grad_matches_naive(attn_fn, causal, use_bias, length, dtype):
    """key_grad="window": the same exact local region (query block n, key blocks n-1..n(+1)) in
    both paths, also bidirectional without bias (where the linear path has no local part
    otherwise); q, v and bias gradients and the output are unchanged."""
    leaves, codebook, codes = make_inputs(length, 16, dtype, attn_fn, use_bias, seed=7)
    options = dict(attn_fn=attn_fn, causal=causal, window=16)
    compare(leaves, codebook, codes, TOL[dtype], key_grad="window", **options)
    ste_o, ste_g, grad_out = run(vq_attention_naive, leaves, codebook, codes, **options)
    win_o, win_g, _ = run(vq_attention_naive, leaves, codebook, codes, grad_out,
                          key_grad="window", **options)  # fmt: skip
    exact = 1e-12 if dtype == torch.float64 else 1e-5  # float32: other summation order
    assert_close("o", ste_o, win_o, exact)
    for name in ("q", "v", "bias") if use_bias else ("q", "v"):
        assert_close(f"d{name}", ste_g[name], win_g[name], exact)


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


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", [6, 8])
@pytest.mark.parametrize("length", [10, 40, 100])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_strong_negative_bias(causal, length, seed, strategy):
    """Rows that lie mostly inside the window with a bias of -20: no cancellation (a codes-for-
    all-keys form with a window correction gives NaN here in float32). Also covers the "codes"
    key gradient's total-state-minus-near-blocks form (bidirectional) in float32."""
    leaves, codebook, codes = make_inputs(length, 16, torch.float32, "softmax", True, seed=seed)
    with torch.no_grad():
        leaves["bias"].fill_(-20.0)
    compare(leaves, codebook, codes, 1e-3, strategy, attn_fn="softmax", causal=causal,
            window=16)  # fmt: skip


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
    with pytest.raises(ValueError, match="key_grad"):
        vq_attention(q, k_hat, v, codebook, codes, None, attn_fn="softmax", causal=True, window=4,
                     key_grad="none")  # fmt: skip
    with pytest.raises(ValueError, match="key_grad_strategy"):
        vq_attention_linear(q, k_hat, v, codebook, codes, None, attn_fn="softmax", causal=True,
                            window=4, key_grad_strategy="fast")  # fmt: skip
    with pytest.raises(ValueError, match="bias"):
        vq_attention_naive(q, k_hat, v, codebook, codes, torch.zeros(3), attn_fn="softmax",
                           causal=True, window=4)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key_grad", ["ste", "window"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_strategies_match_naive_on_cuda(attn_fn, causal, strategy, key_grad):
    leaves, codebook, codes = make_inputs(300, 16, torch.float32, attn_fn, True, seed=9)
    leaves = {name: x.detach().cuda().requires_grad_() for name, x in leaves.items()}
    compare(leaves, codebook.cuda(), codes.cuda(), 1e-3, strategy, attn_fn=attn_fn,
            causal=causal, window=16, key_grad=key_grad)  # fmt: skip
