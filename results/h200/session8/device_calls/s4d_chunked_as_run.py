"""S4D's convolution in linear time: chunked, no length-L kernel and no FFT.

S4D's output is y = K * u with K_l = 2 Re(sum_n w_n dA_n^l) (``models.ssm``). The FFT path
builds K over all L positions and convolves with two length-2L FFTs per channel; at long L and
small batch those cost as much as the rest of a LongVQ layer, and cuFFT goes from one pass to
two past 16K points (measured on an H200, compiled LongVQ, d_model 128: FFT kernels 0.56 ms per
step at 8K x 8, 1.73 ms at 64K x 1, same tokens). A diagonal SSM is a recurrence, so the
convolution splits into chunks of T positions, as Mamba-2's SSD does for its scalar decays:

    t = m T + j:  y_t = sum_{i<=j} K_{j-i} u_{mT+i}               intra-chunk: a T x T Toeplitz
                      + 2 Re(sum_n w_n dA_n^(j+1) S_mn)             the state left by chunks < m
    s_mn = sum_i dA_n^(T-1-i) u_{mT+i}                             what chunk m adds to the state
    S_mn = sum_{m'<m} (dA_n^T)^(m-1-m') s_m'n                       decayed exclusive scan

The first, second and third lines are real matmuls (complex numbers split as [re | im], as in
``s4d_kernel``); the scan over the M = L / T chunks is Hillis-Steele, log2(M) steps of a shifted
multiply-add with the constant decays dA^(T 2^k) = exp(dtA T 2^k), computed directly (no powers
multiplied up, so no error that grows with the step). Every op is O(B L (T + N)) or
O(B (L / T) N log(L / T)): linear in L at fixed T.

The anti-causal channel of a bidirectional S4D (lag -j gets k1_{j-1}, FFTConv's off-by-one) is
the causal form run on the reversed input and shifted by one position. The FFT path
(``models.ssm._fft_conv`` with ``S4D.conv_kernel``) is the reference; tests compare outputs and
all gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["s4d_chunked_conv", "s4d_chunk_size"]


def s4d_chunk_size(length: int) -> int:
    """T: 64 up to 4K positions, 128 beyond, never more than the padded length.

    The Toeplitz products cost B H L T, the scan B H (L / T) N/2 log2(L / T) complex steps, each
    kept for the backward; 128 halves the scan's memory at 64K for twice a product that is still
    small (d_model 128, 64K: ~2 GFLOP).
    """
    t = 64 if length <= 4096 else 128
    return min(t, max(1, 1 << (length - 1).bit_length()))


def _decayed_exclusive_scan(s: Tensor, dt_a_chunk: Tensor) -> Tensor:
    """S_m = sum_{m'<m} a^(m-1-m') s_m' along dim -2, with a = exp(dt_a_chunk) per mode.

    s (..., M, N/2) complex; dt_a_chunk (H, N/2) complex broadcasts over the leading dims
    (..., H, M, N/2). Inclusive Hillis-Steele scan, then a shift by one chunk.
    """
    chunks = s.size(-2)
    p = s
    step = 1
    while step < chunks:
        decay = torch.exp(dt_a_chunk * step).unsqueeze(-2)  # a^step, (H, 1, N/2)
        shifted = torch.cat([torch.zeros_like(p[..., :step, :]), p[..., :-step, :]], dim=-2)
        p = p + decay * shifted
        step *= 2
    return torch.cat([torch.zeros_like(p[..., :1, :]), p[..., :-1, :]], dim=-2)


def _split(z: Tensor) -> Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


def s4d_chunked_conv(u: Tensor, weights: Tensor, dt_a: Tensor, chunk: int | None = None) -> Tensor:
    """K * u for S4D's kernel without building K: u (B, H, L) real -> (B, H, L).

    weights (channels, H, N/2) = C dB and dt_a (H, N/2), complex, as ``s4d_kernel`` takes them.
    One channel: causal, y_t = sum_{s<=t} K0_{t-s} u_s. Two: plus the anti-causal part
    y_t += sum_{j>=1} K1_{j-1} u_{t+j} (``S4D.conv_kernel``'s layout). No D term.
    """
    bsz, h, length = u.shape
    channels, _, n_half = weights.shape
    t = chunk or s4d_chunk_size(length)
    m = -(-length // t)
    x = u.unsqueeze(1)
    if channels == 2:
        x = torch.cat([x, u.flip(-1).unsqueeze(1)], dim=1)  # anti-causal = causal on reversed u
    x = F.pad(x, (0, m * t - length)).view(bsz, channels, h, m, t)  # right pad: causal, unread

    steps = torch.arange(t + 1, device=u.device)
    powers = torch.exp(dt_a.unsqueeze(-1) * steps)  # dA^0 .. dA^T: (H, N/2, T + 1)
    # K_0 .. K_{T-1} per channel, then the lower-triangular Toeplitz [i, j] = K_{j-i}.
    k = 2 * torch.einsum("chn,hnl->chl", weights, powers[..., :t]).real  # (c, H, T)
    lag = torch.arange(t, device=u.device)
    lag = lag.unsqueeze(0) - lag.unsqueeze(1)  # j - i
    toeplitz = k[..., lag.clamp(min=0)] * (lag >= 0)  # (c, H, T, T)
    y = torch.einsum("bchmi,chij->bchmj", x, toeplitz)

    # s_m: dA^(T-1-i) weighs position i; as a real matmul against [re | im].
    into_state = _split(powers[..., :t].flip(-1).transpose(-1, -2))  # (H, T, N)
    s = torch.einsum("bchmi,hin->bchmn", x, into_state)
    s = torch.complex(s[..., :n_half], s[..., n_half:])
    state = _decayed_exclusive_scan(s, dt_a * t)  # (B, c, H, M, N/2)
    # 2 Re(w dA^(j+1) S) = [Re S | Im S] . [2 Re(w dA^(j+1)) ; -2 Im(w dA^(j+1))]
    out_of_state = 2 * weights.unsqueeze(-1) * powers[..., 1:].unsqueeze(0)  # (c, H, N/2, T)
    out_of_state = torch.cat([out_of_state.real, -out_of_state.imag], dim=-2)  # (c, H, N, T)
    y = y + torch.einsum("bchmn,chnj->bchmj", _split(state), out_of_state)

    y = y.reshape(bsz, channels, h, m * t)[..., :length]
    if channels == 1:
        return y[:, 0]
    # y_t gets z_{L-2-t} of the reversed run (the lag -j <- K1_{j-1} shift); y_{L-1} none.
    backward = F.pad(y[:, 1, :, :-1], (1, 0)).flip(-1)
    return y[:, 0] + backward

