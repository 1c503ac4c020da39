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
the kernel's spectrum, one batch reduction that folds the conj in (``linalg.vecdot``), and two
inverse FFTs. ``fft_conv_ref`` keeps the autograd version; tests compare outputs and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fft_conv", "fft_conv_ref"]


def fft_conv_ref(u: Tensor, k: Tensor, n: int) -> Tensor:
    """Reference: u (B, H, L), k (H, Lk) -> (B, H, L), autograd through ``torch.fft``."""
    length = u.size(-1)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)
    return y[..., :length]


class _FFTConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor, n: int) -> Tensor:  # type: ignore[override]
        u_f = torch.fft.rfft(u, n=n)
        k_f = torch.fft.rfft(k, n=n)
        ctx.save_for_backward(u_f, k_f)
        ctx.n, ctx.length, ctx.k_length = n, u.size(-1), k.size(-1)
        return torch.fft.irfft(u_f * k_f, n=n)[..., : u.size(-1)]

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        u_f, k_f = ctx.saved_tensors
        n = ctx.n
        dy_f = torch.fft.rfft(dy, n=n)
        du = dk = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft(dy_f * k_f.conj().resolve_conj(), n=n)[..., : ctx.length]
        if ctx.needs_input_grad[1]:
            dk_f = torch.linalg.vecdot(u_f, dy_f, dim=0)  # sum_b conj(U) dY, no conj copy of U
            dk = torch.fft.irfft(dk_f, n=n)[..., : ctx.k_length]
        return du, dk, None


def fft_conv(u: Tensor, k: Tensor, n: int) -> Tensor:
    """Linear convolution via FFT of length ``n`` (>= L + Lk - 1 for no wrap-around):
    u (B, H, L), k (H, Lk) -> (B, H, L); same values as ``fft_conv_ref``, fewer backward ops."""
    return _FFTConv.apply(u, k, n)
