"""S4D and Mega EMA: FFT paths against their sequential recurrences, kernels, hints, causality."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.ssm import (
    S4D,
    S4D_KERNEL_PARAMS,
    MultiHeadEMA,
    S4DKernel,
    S4DOutput,
    build_memory,
    ema_recurrence_ref,
    s4d_block_size,
    s4d_kernel,
    s4d_recurrence_ref,
    s4d_vandermonde_ref,
)
from tests.conftest import assert_close_max as assert_close


@pytest.mark.parametrize("length", [37, 100])
@pytest.mark.parametrize("init", ["lin", "inv"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_s4d_fft_matches_recurrence(length: int, init: str, bidirectional: bool) -> None:
    torch.manual_seed(0)
    layer = S4D(6, d_state=16, bidirectional=bidirectional, init=init).double()
    u = torch.randn(3, length, 6, dtype=torch.float64)
    assert_close("s4d y", s4d_recurrence_ref(layer, u), layer(u), 1e-10)


@pytest.mark.parametrize("length", [37, 100])
@pytest.mark.parametrize(("bidirectional", "shift"), [(False, True), (True, True), (True, False)])
def test_ema_fft_matches_recurrence(length: int, bidirectional: bool, shift: bool) -> None:
    torch.manual_seed(0)
    layer = MultiHeadEMA(5, ndim=16, bidirectional=bidirectional, shift=shift).double()
    x = torch.randn(2, length, 5, dtype=torch.float64)
    pad = torch.zeros(2, length, dtype=torch.bool)
    pad[1, length - 7 :] = True
    assert_close("ema y", ema_recurrence_ref(layer, x), layer(x), 1e-10)
    assert_close("ema y pad", ema_recurrence_ref(layer, x, pad), layer(x, pad), 1e-10)


def test_ema_truncation_at_full_length_is_exact() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 30, 4, dtype=torch.float64)
    full = MultiHeadEMA(4, bidirectional=True).double()
    trunc = MultiHeadEMA(4, bidirectional=True, truncation=30).double()
    trunc.load_state_dict(full.state_dict())
    assert_close("trunc=L", full(x), trunc(x), 1e-12)
    with pytest.raises(ValueError):
        ema_recurrence_ref(trunc, x)


def test_s4d_kernel_vandermonde_matches_loop() -> None:
    torch.manual_seed(0)
    kern = S4DKernel(4, d_state=8, channels=2, init="inv").double()
    length = 23
    dt_a, d_b, c = kern.discretize()
    d_a = torch.exp(dt_a)
    loop = torch.stack([2 * (c * d_b * d_a**step).sum(-1).real for step in range(length)], dim=-1)
    assert_close("kernel", loop, kern(length), 1e-12)


@pytest.mark.parametrize(
    ("length", "block"),
    [
        (1, None),  # L < T = 64: one block, mostly cut off
        (37, None),
        (64, None),  # L = T
        (100, None),  # 2 blocks of 64, the last partial
        (1000, None),
        (5000, None),  # T = 128, M = 40, the last block partial
        (37, 8),  # M = 5, 3 positions used of the last block
        (64, 16),  # T divides L
        (50, 128),  # L < T, explicit block
    ],
)
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 5e-5)])
def test_s4d_blocked_kernel_matches_vandermonde(
    length: int, block: int | None, channels: int, dtype: torch.dtype, tol: float
) -> None:
    """``s4d_kernel`` (l = m T + j, one real bmm, real arithmetic) equals the direct complex
    (H, N/2, L) Vandermonde formula, and so do the gradients w.r.t. every kernel parameter
    (random upstream).

    The truth is the Vandermonde formula in float64. In float32 some gradients are inexact in
    any formulation (exp(dtA) - 1 cancels for small dt: ~1e-2 relative at L = 1), so a float32
    result may be off by tol or by twice the float32 Vandermonde's own error, whichever is more.
    """
    torch.manual_seed(length + channels)
    kern = S4DKernel(4, d_state=16, channels=channels, init="inv" if channels == 2 else "lin")
    upstream = torch.randn(channels, 4, length, dtype=torch.float64)

    def run(kern: S4DKernel, blocked: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kern.zero_grad()
        if blocked:
            k = s4d_kernel(kern.log_dt, kern.log_A_real, kern.A_imag, kern.C, length, block=block)
        else:
            dt_a, d_b, c = kern.discretize()
            k = s4d_vandermonde_ref(c * d_b, dt_a, length)
        k.backward(upstream.to(k.dtype))
        grads = {n: kern.get_parameter(n).grad.double() for n in S4D_KERNEL_PARAMS}
        return k.detach().double(), grads

    truth = run(copy.deepcopy(kern).double(), blocked=False)
    kern = kern.to(dtype)
    k_new, grads_new = run(kern, blocked=True)
    formula = run(kern, blocked=False) if dtype != torch.float64 else truth
    assert k_new.shape == (channels, 4, length)
    for name, ref, new, same_dtype_ref in (
        ("kernel", truth[0], k_new, formula[0]),
        *((n, truth[1][n], grads_new[n], formula[1][n]) for n in S4D_KERNEL_PARAMS),
    ):
        scale = ref.abs().max().item()
        formula_err = (same_dtype_ref - ref).abs().max().item() / scale
        assert_close(name, ref, new, max(tol, 2 * formula_err))
    if block is None:  # the module's forward is the blocked kernel
        assert_close("module", k_new, kern(length).detach().double(), 1e-12)


def test_s4d_block_size() -> None:
    """T: smallest power of two >= sqrt(L), at least 64; so M = ceil(L / T) <= T."""
    expected = {1: 64, 64: 64, 4096: 64, 4097: 128, 5000: 128, 65536: 256, 65537: 512,
                10**6: 1024}
    for length, t in expected.items():
        assert s4d_block_size(length) == t, length
        assert -(-length // t) <= t and t * t >= length


def test_s4d_kernel_ignores_autocast() -> None:
    """The kernel's real bmm stays float32 under autocast (a complex einsum would anyway)."""
    torch.manual_seed(0)
    kern = S4DKernel(4, d_state=16, channels=2)
    ref = kern(300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k = kern(300)
    assert k.dtype == torch.float32
    assert_close("autocast kernel", ref, k, 1e-6)


def test_s4d_inits() -> None:
    torch.manual_seed(0)
    n_state = 16
    lin = S4DKernel(3, d_state=n_state, init="lin")
    inv = S4DKernel(3, d_state=n_state, init="inv")
    n = torch.arange(n_state // 2, dtype=torch.float32)
    assert torch.allclose(lin.A_imag, (math.pi * n).expand(3, -1))
    assert torch.allclose(
        inv.A_imag, (n_state / math.pi * (n_state / (2 * n + 1) - 1)).expand(3, -1)
    )
    assert torch.allclose(lin.log_A_real.exp(), torch.full((3, n_state // 2), 0.5))
    assert lin.C.shape == (1, 3, n_state // 2, 2)
    assert lin.log_dt.min() >= math.log(1e-3) and lin.log_dt.max() <= math.log(1e-1)
    with pytest.raises(ValueError):
        S4DKernel(3, d_state=16, init="legs")


def test_s4d_gradients_flow() -> None:
    torch.manual_seed(0)
    layer = S4D(4, d_state=8, bidirectional=True)
    u = torch.randn(2, 19, 4, requires_grad=True)
    y = layer(u)
    y.backward(torch.randn_like(y))  # random upstream grad, not .sum()
    for name in ("D", "kernel.C", "kernel.log_dt", "kernel.log_A_real", "kernel.A_imag"):
        grad = layer.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_ema_gradients_flow() -> None:
    torch.manual_seed(0)
    layer = MultiHeadEMA(4, ndim=4, bidirectional=True)
    y = layer(torch.randn(2, 19, 4))
    y.backward(torch.randn_like(y))
    for name in ("alpha", "delta", "beta", "gamma", "omega"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_chunked_kernel_generation_equals_one_shot(monkeypatch) -> None:
    """EMA kernels built in checkpointed chunks of 16 positions (4 of them, the last partial)
    give the one-shot kernel's layer outputs and every parameter gradient (random upstream).
    (S4D's kernel is blocked instead: ``test_s4d_blocked_kernel_matches_vandermonde``.)"""
    import models.ssm

    torch.manual_seed(0)
    layer = MultiHeadEMA(4, ndim=4, bidirectional=True).double()
    u = torch.randn(2, 55, 4, dtype=torch.float64)
    upstream = torch.randn(2, 55, 4, dtype=torch.float64)

    def run(chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(models.ssm, "KERNEL_CHUNK", chunk)
        layer.zero_grad()
        y = layer(u)
        y.backward(upstream)
        return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    y_one, grads_one = run(10**6)
    y_chunked, grads_chunked = run(16)
    assert_close("output", y_one, y_chunked, 1e-12)
    for name, grad in grads_one.items():
        assert_close(name, grad, grads_chunked[name], 1e-12)


def test_optim_hints() -> None:
    layer = S4D(4, d_state=8, lr=1e-3).double()  # hints must survive dtype moves
    for name in ("log_dt", "log_A_real", "A_imag"):
        assert layer.kernel.get_parameter(name)._optim == {"lr": 1e-3, "weight_decay": 0.0}
    assert not hasattr(layer.kernel.C, "_optim") and not hasattr(layer.D, "_optim")
    frozen = S4D(4, d_state=8, lr=0.0)  # lr == 0: fixed buffers, as in s4d.py
    assert {n for n, _ in frozen.named_parameters()} == {"D", "kernel.C"}
    assert "kernel.log_dt" in dict(frozen.named_buffers())
    assert S4D(4, d_state=8, lr=None).kernel.log_dt._optim == {"weight_decay": 0.0}
    ema = MultiHeadEMA(4, lr=2e-3)
    for name in ("alpha", "delta", "beta", "gamma"):
        assert getattr(ema, name)._optim == {"lr": 2e-3, "weight_decay": 0.0}
    assert not hasattr(ema.omega, "_optim")


def test_ema_init_and_shapes() -> None:
    torch.manual_seed(0)
    ema = MultiHeadEMA(64, ndim=16, bidirectional=True)
    assert ema.alpha.shape == ema.delta.shape == ema.beta.shape == (128, 16, 1)
    assert ema.gamma.shape == (128, 16) and ema.omega.shape == (64,)
    sign = torch.tensor([1.0, -1.0] * 8)
    assert torch.allclose(ema.beta.mean(0).squeeze(-1), sign, atol=0.02)
    p, q = ema.coeffs()
    assert torch.allclose(p, torch.sigmoid(ema.alpha))
    assert torch.allclose(q, 1 - torch.sigmoid(ema.alpha) * torch.sigmoid(ema.delta))


@pytest.mark.parametrize("kind", ["s4d", "ema"])
def test_causal_never_sees_future(kind: str) -> None:
    torch.manual_seed(0)
    layer = build_memory(kind, 4, bidirectional=False).double()
    u = torch.randn(2, 41, 4, dtype=torch.float64)
    y = layer(u)
    for t in (0, 17, 39):
        v = u.clone()
        v[:, t + 1 :] = torch.randn_like(v[:, t + 1 :]) * 10
        y2 = layer(v)
        assert torch.allclose(y[:, : t + 1], y2[:, : t + 1], atol=1e-12, rtol=0)
        assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@pytest.mark.parametrize("kind", ["s4d", "ema"])
def test_bidirectional_sees_future(kind: str) -> None:
    torch.manual_seed(0)
    layer = build_memory(kind, 4, bidirectional=True).double()
    u = torch.randn(1, 20, 4, dtype=torch.float64)
    v = u.clone()
    v[:, -1] += 1.0
    assert not torch.allclose(layer(u)[:, 0], layer(v)[:, 0])


def test_s4d_output_matches_conv1d_glu() -> None:
    torch.manual_seed(0)
    out = S4DOutput(6)
    y = torch.randn(2, 11, 6)
    ref = F.glu(out.output_linear(F.gelu(y).transpose(1, 2)), dim=-2).transpose(1, 2)
    assert_close("S4DOutput", ref, out(y), 1e-6)


def test_bf16_autocast_runs() -> None:
    torch.manual_seed(0)
    for kind in ("s4d", "ema"):
        layer = build_memory(kind, 8, bidirectional=True)
        u = torch.randn(2, 33, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(u.bfloat16())
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        assert_close(f"{kind} bf16", layer(u), y.float(), 5e-2)


def test_build_memory_unknown() -> None:
    with pytest.raises(ValueError, match="known: s4d, ema"):
        build_memory("mamba", 4)


def test_bidirectional_lag_layout() -> None:
    """Impulse response: lag 0 is the causal kernel + D only; lag -1 is k1_0 (S4's off-by-one)."""
    torch.manual_seed(0)
    layer = S4D(3, d_state=8, bidirectional=True).double()
    length, pos = 16, 9
    u = torch.zeros(1, length, 3, dtype=torch.float64)
    u[0, pos] = 1.0
    y = layer(u)[0]
    k = layer.kernel(length)
    assert_close("lag 0", k[0, :, 0] + layer.D, y[pos], 1e-12)
    assert_close("lag +2", k[0, :, 2], y[pos + 2], 1e-12)
    assert_close("lag -1", k[1, :, 0], y[pos - 1], 1e-12)
    assert_close("lag -3", k[1, :, 2], y[pos - 3], 1e-12)
    # Mega, shift=True: the anti-causal half drops k2_0, so lag -j carries k2_j.
    ema = MultiHeadEMA(3, ndim=4, bidirectional=True).double()
    k_ema = ema.kernel(length)
    circ = ema.conv_kernel(length)  # circular layout of FFT length 2L; index 2L - j is lag -j
    assert torch.equal(circ[:, 2 * length - 1], k_ema[3:, 1])
    assert torch.equal(circ[:, 2 * length - 5], k_ema[3:, 5])
    assert torch.equal(circ[:, 0], k_ema[:3, 0])
