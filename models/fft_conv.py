"""Long convolution by FFT with a hand-written backward (S4D's and the EMA's kernel product).

y = irfft(rfft(u, n) rfft(k, n), n)[:L] is a circular convolution of the zero-padded signals,
so its gradients are circular correlations, one complex product and one inverse FFT each:

    du = irfft(rfft(dy, n) conj(rfft(k, n)), n)[:L]
    dk = irfft(sum_b rfft(dy, n) conj(rfft(u, n)), n)[:Lk]

Autograd through ``torch.fft`` reaches the same values by differentiating each op: the backward
of ``irfft`` and of both ``rfft`` calls adds Hermitian fix-ups (a complex zero-fill, a doubling of
the non-edge bins) and a physical ``conj`` of each saved spectrum. Measured on an H200 (LongVQ
Text-4K, compiled, session 8): those complex elementwise kernels took about as long as the FFTs
themselves. Here the backward is one FFT of dy, one product with the (small, batch-free) conj of
the kernel's spectrum (which also carries the inverse FFT's 1/n, ``_kernel_spectrum``), one
product-and-sum over the batch with conj(rfft(u)) (imaginary parts negated in place), and two
inverse FFTs; the spectra of u and k are recomputed, not saved (see below).
``fft_conv_ref`` keeps the autograd version; tests compare outputs and gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["fft_conv", "fft_conv_ref"]


def fft_conv_ref(u: Tensor, k: Tensor, n: int) -> Tensor:
    """Reference: u (B, H, L), k (H, Lk) -> (B, H, L), autograd through ``torch.fft``."""
    length = u.size(-1)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
    return y[..., :length]


# Custom ops rather than an autograd.Function under ``torch.compiler.disable``: dynamo records
# each as one opaque node, so a compiled model is not split into separate graphs around every
# convolution (the ops before and after it fuse with their neighbours), and no complex tensor
# ever enters the graph (inductor does not lower complex tensors on CUDA). The backward
# recomputes the spectra of u and k instead of saving them: u is real and half the bytes of its
# spectrum, for one more FFT of u per backward.
#
# The ops read u of any length up to the FFT's n and return y of u's length: ``rfft(x, n)`` pads
# a shorter x inside, as a fill of the (B, H, n) buffer and a copy of x into it, two kernels for
# each rfft of u (forward and backward) and of dy (session 10's H200 profile of the LongVQ
# Text-4K step: 12 fill and 5 copy kernels, 81 us a step; these six batch-sized pads are among
# them). So under torch.compile ``fft_conv`` pads u to n and slices y *outside* the op: the
# kernel that makes u writes the padding, and in the backward the slice's gradient (dy with
# zeros after L) comes from the kernel that makes dy. Eager, it passes u unpadded: the op then
# keeps u, not its padded copy, for the backward (the pads cost the same either way there).
def _first(y: Tensor, length: int) -> Tensor:
    """y[..., :length] of a contiguous (..., n) y: the layout (strides of n) the fake outputs
    promise to inductor, without copying the slice."""
    return y.contiguous()[..., :length]


def _first_fake(like: Tensor, shape: tuple[int, ...], n: int) -> Tensor:
    return like.new_empty((*shape[:-1], n))[..., : shape[-1]]


def _kernel_spectrum(k: Tensor, n: int) -> Tensor:
    """rfft(k, n) / n: the inverse FFT's 1/n folded into the small, batch-free kernel spectrum.
    The inverse transforms then run with ``norm="forward"`` (no scaling): torch applies an
    inverse FFT's 1/n as a separate multiplication over its output (on CUDA an elementwise
    kernel after cuFFT's; session 10's H200 profile of the LongVQ Text-4K step: 6 float
    multiplications by a scalar, 63 us a step, one per irfft)."""
    return torch.fft.rfft(k, n=n) * (1.0 / n)


@torch.library.custom_op("longvq::fft_conv", mutates_args=())
def _fft_conv_op(u: Tensor, k: Tensor, n: int) -> Tensor:
    """The first u.size(-1) values of the length-n circular convolution of u (..., <= n) and k
    (H, Lk <= n), both zero-padded to n."""
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * _kernel_spectrum(k, n), n=n, norm="forward")
    return _first(y, u.size(-1))


@_fft_conv_op.register_fake
def _(u: Tensor, k: Tensor, n: int) -> Tensor:
    return _first_fake(u, tuple(u.shape), n)


@torch.library.custom_op("longvq::fft_conv_backward", mutates_args=())
def _fft_conv_backward_op(dy: Tensor, u: Tensor, k: Tensor, n: int, need_du: bool,
                          need_dk: bool) -> tuple[Tensor, Tensor]:
    """(du, dk) of ``_fft_conv_op``: dy and du of u's length; an unneeded one is an empty
    tensor.

    No conjugate *views* in here (``x.conj()``, ``linalg.vecdot``): run by a compiled graph,
    a custom op's body sees their conj bit ignored (torch 2.13, CPU: opcheck's AOT test gave
    the unconjugated products). The kernel's conj is taken physically (it is small), and
    conj(U) of the batch-sized u by negating the imaginary parts of rfft(u) in place (a real
    view): one pass over the spectrum, where building the reversed signal (zeros, flip, cat;
    its rfft is conj(U)) cost three (H200, LongVQ Text-4K: 60 us per call).
    """
    dy_f = torch.fft.rfft(dy, n=n)
    du = dk = u.new_empty(0)
    if need_du:
        k_f = torch.conj_physical(_kernel_spectrum(k, n))
        du = _first(torch.fft.irfft(dy_f * k_f, n=n, norm="forward"), u.size(-1))
    if need_dk:
        u_conj = torch.fft.rfft(u, n=n)
        torch.view_as_real(u_conj)[..., 1].neg_()
        dk_f = (u_conj * dy_f).sum(0)  # sum_b conj(U) dY
        dk = _first(torch.fft.irfft(dk_f, n=n), k.size(-1))
    return du, dk


@_fft_conv_backward_op.register_fake
def _(dy: Tensor, u: Tensor, k: Tensor, n: int, need_du: bool,
      need_dk: bool) -> tuple[Tensor, Tensor]:
    return (_first_fake(u, tuple(u.shape), n) if need_du else u.new_empty(0),
            _first_fake(k, tuple(k.shape), n) if need_dk else k.new_empty(0))


# FLOP estimates (a real FFT of n points: ~2.5 n log2 n): what torch.compile's partitioner
# weighs when an activation_memory_budget makes it choose what to recompute in the backward.
# Without them it counts a custom op as 1 FLOP and recomputes the convolution as if it were
# free, like an elementwise op.
def _rfft_flops(rows: int, n: int) -> int:
    return int(2.5 * rows * n * math.log2(max(n, 2)))


@register_flop_formula(torch.ops.longvq.fft_conv)
def _(u_shape, k_shape, n, *, out_shape=None, **kwargs) -> int:
    rows = math.prod(u_shape[:-1])
    return 2 * _rfft_flops(rows, n) + _rfft_flops(k_shape[0], n) + 6 * rows * (n // 2 + 1)


@register_flop_formula(torch.ops.longvq.fft_conv_backward)
def _(dy_shape, u_shape, k_shape, n, need_du, need_dk, *, out_shape=None, **kwargs) -> int:
    rows = math.prod(u_shape[:-1])
    transforms = 1 + int(need_du) + 2 * int(need_dk)
    return transforms * _rfft_flops(rows, n) + 6 * rows * (n // 2 + 1) * (1 + int(need_dk))


def _setup_context(ctx, inputs: tuple[Tensor, Tensor, int], output: Tensor) -> None:
    u, k, n = inputs
    ctx.save_for_backward(u, k)
    ctx.n = n


def _backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    u, k = ctx.saved_tensors
    need_du, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    du, dk = _fft_conv_backward_op(dy, u, k, ctx.n, need_du, need_dk)
    return (du if need_du else None), (dk if need_dk else None), None


_fft_conv_op.register_autograd(_backward, setup_context=_setup_context)


def fft_conv(u: Tensor, k: Tensor, n: int, skip: Tensor | None = None) -> Tensor:
    """Linear convolution via FFT of length ``n`` (>= L + Lk - 1 for no wrap-around):
    u (B, H, L), k (H, Lk) -> (B, H, L); same values as ``fft_conv_ref``, fewer backward ops,
    and one node (no graph break) under torch.compile, with the zero-padding and the slice
    around it there (see above). ``skip`` (H,): adds u * skip (S4D's D term), read from the
    u the op keeps (compiled: the padded one), so the backward does not also keep another."""
    length = u.size(-1)
    source = torch.nn.functional.pad(u, (0, n - length)) if torch.compiler.is_compiling() else u
    y = _fft_conv_op(source, k, n)[..., :length]
    return y if skip is None else y + source[..., :length] * skip.unsqueeze(-1)
