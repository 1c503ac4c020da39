"""S4D's convolution in linear time, chunked: no length-L kernel and no FFT.

S4D's output is y = K * u with K_l = 2 Re(sum_n w_n dA_n^l) (``models.ssm``). The FFT path
builds K over all L positions and convolves with length-2L FFTs. At long L and small batch
those cost more per token than at short L: the kernel and its FFTs are per sequence, and cuFFT
takes two passes past 16K points (measured on an H200, compiled LongVQ, d_model 128: FFT
kernels 0.56 ms per step at 8K x 8, 1.73 ms at 64K x 1, the same tokens). A diagonal SSM is a
recurrence, so the convolution splits into chunks of T positions, as Mamba-2's SSD does:

    t = m T + j:  y_t = sum_{i<=j} K_{j-i} u_{mT+i}               a T x T Toeplitz product
                      + 2 Re(sum_n w_n dA_n^(j+1) S_mn)             the state left by chunks < m
    s_mn = sum_i dA_n^(T-1-i) u_{mT+i}                             what chunk m adds
    S_mn = sum_{m'<m} a_n^(m-1-m') s_m'n,  a_n = dA_n^T           a decayed exclusive scan

The products are batched real matmuls (complex numbers split [re | im], as in
``s4d_kernel``), the scan is ``decayed_scan``: one Triton kernel on CUDA that reads the chunk
contributions once and writes the states once (its backward is the same scan run in reverse with
conj(a)), a sequential torch loop elsewhere (a reference for the tests; CPU runs take the FFT).
Every op is O(B L (T + N)) or O(B (L / T) N): linear in L at fixed T.

A first version in plain torch (a Hillis-Steele scan, log2(L/T) passes over states as large as
the input) was 2-4x slower than the FFT on an H200 (results/h200/session8); the single-pass scan
is what this version changes.

The anti-causal channel of a bidirectional S4D (lag -j gets K1_{j-1}, FFTConv's off-by-one) is
the causal form on the reversed input, shifted by one position. ``models.fft_conv`` with
``S4D.conv_kernel`` is the reference; tests compare outputs and all gradients.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from models._optional import interpreting

__all__ = ["decayed_scan", "decayed_scan_ref", "s4d_chunk_size", "s4d_chunked_conv"]


def s4d_chunk_size(length: int) -> int:
    """T = 64 (N/2 = 32 complex modes make the states as large as the input at T = N), or the
    padded length when shorter."""
    return min(64, max(1, 1 << (length - 1).bit_length()))


# ------------------------------------------------------------------------------------ the scan


def decayed_scan_ref(s: Tensor, a_re: Tensor, a_im: Tensor, group: int,
                     reverse: bool = False) -> Tensor:
    """Exclusive scan S_m = a S_{m-1} + s_{m-1}, S_0 = 0 (reverse: S_m = a S_{m+1} + s_{m+1},
    S_{M-1} = 0) along dim 1, complex numbers stored [re | im] on the last dim.

    s (R, M, 2 NH); a_re, a_im (R / group, NH): row r decays by a[r // group]. A loop over M
    (tests and CPU only).
    """
    rows, chunks, width = s.shape
    nh = width // 2
    ar = a_re.repeat_interleave(group, dim=0)
    ai = a_im.repeat_interleave(group, dim=0)
    order = range(chunks - 1, -1, -1) if reverse else range(chunks)
    sr, si = s[..., :nh], s[..., nh:]
    state_re = s.new_zeros(rows, nh)
    state_im = s.new_zeros(rows, nh)
    out = [None] * chunks
    for m in order:
        out[m] = torch.cat([state_re, state_im], dim=-1)
        state_re, state_im = (ar * state_re - ai * state_im + sr[:, m],
                              ar * state_im + ai * state_re + si[:, m])
    return torch.stack(out, dim=1)


def _scan_launch(s: Tensor, a_re: Tensor, a_im: Tensor, group: int, reverse: bool,
                 states: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    from models._s4d_scan_triton import decayed_scan_triton  # triton is optional

    return decayed_scan_triton(s, a_re, a_im, group, reverse, states)


# Custom ops with a registered autograd formula: under torch.compile the kernel and its
# backward are opaque nodes of the model's graph, so the products around them compile with the
# rest of the layer (an autograd.Function behind torch.compiler.disable split the graph there).
@torch.library.custom_op("longvq::decayed_scan", mutates_args=())
def _scan_op(s: Tensor, a_re: Tensor, a_im: Tensor, group: int) -> Tensor:
    return _scan_launch(s, a_re, a_im, group, reverse=False)[0]


@_scan_op.register_fake
def _(s: Tensor, a_re: Tensor, a_im: Tensor, group: int) -> Tensor:
    return torch.empty(s.shape, device=s.device, dtype=torch.float32)


@torch.library.custom_op("longvq::decayed_scan_backward", mutates_args=())
def _scan_backward_op(d_out: Tensor, out: Tensor, a_re: Tensor, a_im: Tensor,
                      group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ds, da_re, da_im) of ``_scan_op`` given its output ``out``."""
    # S_{m+1} = a S_m + s_m: ds_m = sum_{m' > m} conj(a)^(m'-m-1) dS_m' (the reverse
    # scan), and dL/da = sum_m ds_m (x) S_m: (Re, Im) = (g.S_re + g'.S_im, g'.S_re - g.S_im)
    ds, da = _scan_launch(d_out, a_re, -a_im, group, reverse=True, states=out)
    nh = a_re.size(-1)
    da = da.view(a_re.size(0), group, 2 * nh).sum(1)
    return ds, da[:, :nh].clone(), da[:, nh:].clone()  # not views: outputs may not alias


@_scan_backward_op.register_fake
def _(d_out: Tensor, out: Tensor, a_re: Tensor, a_im: Tensor,
      group: int) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty(d_out.shape, device=d_out.device, dtype=torch.float32),
            torch.empty(a_re.shape, device=a_re.device, dtype=torch.float32),
            torch.empty(a_im.shape, device=a_im.device, dtype=torch.float32))


def _scan_setup_context(ctx, inputs, output) -> None:
    _s, a_re, a_im, group = inputs
    ctx.save_for_backward(output, a_re, a_im)
    ctx.group = group


def _scan_backward(ctx, d_out: Tensor):
    out, a_re, a_im = ctx.saved_tensors
    ds, da_re, da_im = _scan_backward_op(d_out, out, a_re, a_im, ctx.group)
    return ds, da_re, da_im, None


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


# a complex multiply-add per state entry (models/fft_conv.py says why ops have FLOP formulas)
@register_flop_formula(torch.ops.longvq.decayed_scan)
def _(s_shape, a_re_shape, a_im_shape, group, *, out_shape=None, **kwargs) -> int:
    return 4 * math.prod(s_shape)


@register_flop_formula(torch.ops.longvq.decayed_scan_backward)
def _(d_out_shape, out_shape_in, a_re_shape, a_im_shape, group, *, out_shape=None,
      **kwargs) -> int:
    return 8 * math.prod(d_out_shape)


def decayed_scan(s: Tensor, a_re: Tensor, a_im: Tensor, group: int) -> Tensor:
    """``decayed_scan_ref`` (forward direction) with gradients: the Triton kernel for float32 on
    CUDA (and under the interpreter), the torch loop elsewhere (float64 included)."""
    if s.dtype == torch.float32 and (s.is_cuda or interpreting()):
        return _scan_op(s, a_re, a_im, group)
    return _scan_reference(s, a_re, a_im, group)


# A graph break under torch.compile: a Python loop over the chunks (tests and CPU only)
@torch.compiler.disable
def _scan_reference(s: Tensor, a_re: Tensor, a_im: Tensor, group: int) -> Tensor:
    warnings.warn(f"S4D conv='chunked' runs its scan as a torch loop over chunks for {s.dtype} "
                  f"on {s.device.type} (a reference: no Triton kernel there; conv='fft' is "
                  "faster)", stacklevel=3)
    return decayed_scan_ref(s, a_re, a_im, group)


# ------------------------------------------------------------------------------ the convolution


def s4d_chunked_conv(u: Tensor, log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor,
                     chunk: int | None = None, gemm_dtype: torch.dtype | None = None) -> Tensor:
    """K * u for S4D's kernel without building K: u (B, H, L) -> (B, H, L).

    Takes S4DKernel's parameters (as ``s4d_kernel``): c (channels, H, N/2, 2). One channel:
    causal, y_t = sum_{s<=t} K0_{t-s} u_s. Two: plus the anti-causal part
    y_t += sum_{j>=1} K1_{j-1} u_{t+j} (``S4D.conv_kernel``'s layout). No D term.

    ``gemm_dtype`` (default: u's): the dtype of the products' operands and results, e.g.
    bfloat16 under autocast, as a Linear layer's would be. Everything else (the decay powers,
    the weights before rounding, the scan, the output) stays in u's dtype. On an H200 the
    float32 products (no tensor cores unless TF32 is on) were 0.77 ms of a 64K LongVQ layer.
    """
    gemm_dtype = gemm_dtype or u.dtype
    from models.ssm import s4d_discretize  # models.ssm imports this module

    bsz, h, length = u.shape
    channels, _, n_half, _ = c.shape
    t = chunk or s4d_chunk_size(length)
    m = -(-length // t)
    rows = channels * h
    # (c, H, B, L) rows, the anti-causal channel on the reversed input, padded to M T on the
    # right (causal: the padding is never read by a real position)
    x = u.transpose(0, 1).to(gemm_dtype)
    if channels == 2:
        x = torch.stack([x, x.flip(-1)])
    else:
        x = x.unsqueeze(0)
    x = F.pad(x, (0, m * t - length)).reshape(rows, bsz * m, t)

    dt_re, dt_im, w_re, w_im = s4d_discretize(log_dt, log_a_real, a_imag, c)
    steps = torch.arange(t + 1, device=u.device).to(dt_re.dtype)
    mag = torch.exp(dt_re.unsqueeze(-1) * steps)  # |dA|^p, p = 0..T: (H, N/2, T + 1)
    ang = dt_im.unsqueeze(-1) * steps
    p_re, p_im = mag * torch.cos(ang), mag * torch.sin(ang)
    wr, wi = w_re.unsqueeze(-1), w_im.unsqueeze(-1)  # (c, H, N/2, 1)
    wp_re = 2 * (wr * p_re - wi * p_im)  # 2 w dA^p per mode: (c, H, N/2, T + 1)
    wp_im = 2 * (wr * p_im + wi * p_re)

    k = wp_re[..., :t].sum(2)  # K_0 .. K_{T-1}: (c, H, T)
    # [i, j] = K_{j-i} (0 for j < i): windows of the left-padded K, rows flipped. Unfold's
    # backward is a strided sum; a gather by a lag index had a sort-based backward (eager CUDA)
    toeplitz = F.pad(k, (t - 1, 0)).unfold(-1, t, 1).flip(-2).reshape(rows, t, t)
    # s_m = sum_i dA^(T-1-i) u_i: [re | im] columns, shared by the channels
    into_state = torch.cat([p_re[..., :t].flip(-1), p_im[..., :t].flip(-1)], dim=1)  # (H, N, T)
    into_state = into_state.transpose(1, 2).repeat(channels, 1, 1)  # (c H, T, N)
    # one product for both: x read once, and one product for its gradient (no sum of two)
    local, s = torch.bmm(x, torch.cat([toeplitz, into_state], dim=2).to(gemm_dtype)).split(
        [t, 2 * n_half], dim=-1)  # (c H, B M, T), (c H, B M, N)
    s = s.to(u.dtype).reshape(rows * bsz, m, 2 * n_half)
    a_re = p_re[..., t].repeat(channels, 1)  # dA^T: (c H, N/2)
    a_im = p_im[..., t].repeat(channels, 1)
    state = decayed_scan(s, a_re, a_im, group=bsz).view(rows, bsz * m, 2 * n_half)
    # 2 Re(w dA^(j+1) S) = [Re S | Im S] . [2 Re(w dA^(j+1)) ; -2 Im(w dA^(j+1))]
    out_of_state = torch.cat([wp_re[..., 1:], -wp_im[..., 1:]], dim=2).reshape(
        rows, 2 * n_half, t)
    y = torch.baddbmm(local, state.to(gemm_dtype),
                      out_of_state.to(gemm_dtype)).to(u.dtype)  # (c H, B M, T)

    y = y.view(channels, h, bsz, m * t)[..., :length]
    out = y[0]
    if channels == 2:  # y_t gets z_{L-2-t} of the reversed run: the lag -j <- K1_{j-1} shift
        out = out + F.pad(y[1, ..., :-1], (1, 0)).flip(-1)
    return out.transpose(0, 1)
