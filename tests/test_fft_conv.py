"""The FFT convolution's hand-written backward against autograd through torch.fft."""

from __future__ import annotations

import pytest
import torch

from models.fft_conv import fft_conv, fft_conv_ref
from tests.conftest import requires_cuda


@pytest.mark.parametrize(
    ("bsz", "length", "k_length", "n"),
    [
        (3, 37, 37, 74),  # S4D causal: Lk = L, n = 2L
        (2, 50, 100, 100),  # S4D bidirectional: a (H, 2L) circular kernel, n = 2L
        (1, 64, 16, 80),  # truncated EMA: n = L + Lk
        (4, 1, 1, 2),
        (2, 33, 20, 65),  # odd n: the irfft's last bin is not a Nyquist bin
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fft_conv_matches_autograd_reference(bsz: int, length: int, k_length: int, n: int,
                                             dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(length + n)
    u = torch.randn(bsz, 5, length, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(5, k_length, generator=gen, dtype=dtype, requires_grad=True)
    dy = torch.randn(bsz, 5, length, generator=gen, dtype=dtype)  # random upstream gradient
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    y_ref = fft_conv_ref(u, k, n)
    grads_ref = torch.autograd.grad(y_ref, (u, k), dy)
    y = fft_conv(u, k, n)
    grads = torch.autograd.grad(y, (u, k), dy)
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("wants", [(True, False), (False, True)])
def test_fft_conv_one_input_needing_grad(wants: tuple[bool, bool]) -> None:
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 20, generator=gen, dtype=torch.float64, requires_grad=wants[0])
    k = torch.randn(3, 20, generator=gen, dtype=torch.float64, requires_grad=wants[1])
    leaf = u if wants[0] else k
    (got,) = torch.autograd.grad(fft_conv(u, k, 40).square().sum(), leaf)
    (want,) = torch.autograd.grad(fft_conv_ref(u, k, 40).square().sum(), leaf)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("length", "k_length", "n"), [(37, 74, 74), (64, 16, 80), (33, 20, 65)])
def test_compiled_fft_conv_pads_outside_and_matches_reference(length: int, k_length: int,
                                                              n: int) -> None:
    """Traced (aot_eager), ``fft_conv`` pads u to n and slices y outside the op: the op sees
    length-n signals in the forward and the backward (dy with zeros after L), and the output,
    du, dk and the skip term's gradient equal the autograd reference's (random upstream)."""
    gen = torch.Generator().manual_seed(n)
    u = torch.randn(2, 5, length, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, k_length, generator=gen, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, length, generator=gen, dtype=torch.float64)
    leaves = (u, k, skip)
    want = fft_conv_ref(u, k, n) + u * skip[:, None]
    grads_want = torch.autograd.grad(want, leaves, dy)
    import models.fft_conv as module

    lengths: list[int] = []
    original = module._fft_conv_backward_op

    def recording(dy_, u_, *rest):
        lengths.extend([dy_.shape[-1], u_.shape[-1]])
        return original(dy_, u_, *rest)

    torch._dynamo.reset()
    try:
        module._fft_conv_backward_op = recording
        got = torch.compile(lambda *x: fft_conv(x[0], x[1], n, skip=x[2]),
                            backend="aot_eager", fullgraph=True)(*leaves)
        grads = torch.autograd.grad(got, leaves, dy)
    finally:
        module._fft_conv_backward_op = original
        torch._dynamo.reset()
    assert lengths == [n, n]
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, grads_want, strict=True):
        torch.testing.assert_close(g, w)


def test_fft_conv_is_the_linear_convolution() -> None:
    """Against the direct sum, so a wrong n or slice in both paths cannot pass together."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 12, generator=gen, dtype=torch.float64)
    k = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    direct = torch.stack(
        [(u[..., : t + 1] * k[:, : t + 1].flip(-1)).sum(-1) for t in range(12)], -1
    )
    torch.testing.assert_close(fft_conv(u, k, 24), direct)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("bsz", "length"), [(8, 4096), (1, 65536)])
def test_fft_conv_matches_reference_on_cuda(bsz: int, length: int) -> None:
    """cuFFT at LongVQ's sizes (one and two-pass transforms), float32, bidirectional layout."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(bsz, 16, length, device="cuda", generator=gen, requires_grad=True)
    k = torch.randn(16, 2 * length, device="cuda", generator=gen) / length ** 0.5
    k.requires_grad_(True)
    dy = torch.randn(bsz, 16, length, device="cuda", generator=gen)
    y_ref = fft_conv_ref(u.double(), k.double(), 2 * length)
    grads_ref = torch.autograd.grad(y_ref, (u, k), dy.double())
    y = fft_conv(u, k, 2 * length)
    grads = torch.autograd.grad(y, (u, k), dy)
    for got, want in zip((y, *grads), (y_ref, *grads_ref), strict=True):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_fft_conv_custom_ops_pass_opcheck(wants: tuple[bool, bool]) -> None:
    """Schemas, fake (meta) outputs with the real outputs' strides, and the registered autograd,
    as torch.compile relies on them."""
    from models.fft_conv import _fft_conv_backward_op, _fft_conv_op

    gen = torch.Generator().manual_seed(2)
    u = torch.randn(2, 3, 10, generator=gen, requires_grad=wants[0])
    k = torch.randn(3, 20, generator=gen, requires_grad=wants[1])
    torch.library.opcheck(_fft_conv_op, (u, k, 20))  # eager: padded inside
    torch.library.opcheck(_fft_conv_op, (u.detach().transpose(1, 2).contiguous().transpose(1, 2),
                                         k.detach(), 21))
    full = torch.randn(2, 3, 20, generator=gen, requires_grad=wants[0])  # compiled: u of length n
    torch.library.opcheck(_fft_conv_op, (full, k, 20))
    dy = torch.randn(2, 3, 10, generator=gen)
    torch.library.opcheck(_fft_conv_backward_op, (dy, u.detach(), k.detach(), 20, *wants))
    torch.library.opcheck(_fft_conv_backward_op,
                          (torch.randn(2, 3, 20, generator=gen), full.detach(), k.detach(), 20,
                           *wants))


def test_s4d_fft_conv_is_not_a_graph_break() -> None:
    """Under torch.compile the S4D layer (kernel generation, FFT conv, D term) is one graph."""
    from models.ssm import S4D

    layer = S4D(4, d_state=4, bidirectional=True)
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    u = torch.randn(2, 16, 4, requires_grad=True)
    y = torch.compile(layer, backend=record)(u)
    torch._dynamo.reset()
    assert len(graphs) == 1
    torch.testing.assert_close(y, layer(u))


@pytest.mark.parametrize("layer_name", ["s4d", "ema"])
def test_signals_reach_the_fft_contiguous(monkeypatch, layer_name: str) -> None:
    """The layers hand the FFT (B, H, L) signals already contiguous, in the forward and in the
    backward (u is recomputed from the saved input): a strided one makes every rfft copy it
    first (4 strided copy kernels per LongVQ Text-4K step on an H200)."""
    from models.ssm import S4D, MultiHeadEMA

    seen: list[bool] = []
    rfft = torch.fft.rfft

    def record(x, *args, **kwargs):
        seen.append(x.is_contiguous())
        return rfft(x, *args, **kwargs)

    monkeypatch.setattr(torch.fft, "rfft", record)
    layer = S4D(8, d_state=4, bidirectional=True) if layer_name == "s4d" else MultiHeadEMA(8)
    u = torch.randn(2, 24, 8, requires_grad=True)  # (B, L, H)
    layer(u).square().sum().backward()
    assert len(seen) >= 4 and all(seen), seen
