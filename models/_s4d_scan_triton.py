"""The decayed complex scan of ``models.s4d_chunked`` as one Triton kernel (triton is optional:
imported only when used).

One program per (row, block of modes) walks the M chunk contributions in tiles of BLOCK_M: an
``associative_scan`` inside the tile (the pairs (a, x) compose as (A2 A1, A2 X1 + X2), which also
gives the powers a^k), then the state entering the tile, decayed by those powers, is added. Each
contribution is read once and each state written once; ``reverse`` walks from the end (the
backward runs it with conj(a), and sums the decay's gradient on the way from the forward
states: no pass over them in torch). float32 throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["decayed_scan_triton"]


@triton.jit
def _combine(ar1, ai1, xr1, xi1, ar2, ai2, xr2, xi2):
    # (A1, X1) then (A2, X2): A = A2 A1, X = A2 X1 + X2 (complex)
    return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
            ar2 * xr1 - ai2 * xi1 + xr2, ar2 * xi1 + ai2 * xr1 + xi2)


@triton.jit
def _decayed_scan_kernel(X, A_RE, A_IM, OUT, STATES, DA, M, NH, GROUP, REVERSE: tl.constexpr,
                         WITH_DA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < NH
    g = r // GROUP
    a_re = tl.load(A_RE + g * NH + n, mask=n_ok, other=0.0)
    a_im = tl.load(A_IM + g * NH + n, mask=n_ok, other=0.0)
    base = r.to(tl.int64) * M * 2 * NH
    if REVERSE:
        first = M - 1
    else:
        first = 0
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    tl.store(OUT + base + first * 2 * NH + n, zero, mask=n_ok)
    tl.store(OUT + base + first * 2 * NH + NH + n, zero, mask=n_ok)
    c_re = tl.zeros([BLOCK_N], dtype=tl.float32)
    c_im = tl.zeros([BLOCK_N], dtype=tl.float32)
    da_re = tl.zeros([BLOCK_N], dtype=tl.float32)
    da_im = tl.zeros([BLOCK_N], dtype=tl.float32)
    ar = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + a_re[None, :]
    ai = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + a_im[None, :]
    for start in range(0, M, BLOCK_M):
        i = start + tl.arange(0, BLOCK_M)  # logical index: the scan's order
        if REVERSE:
            m = M - 1 - i
            m_out = M - 2 - i
        else:
            m = i
            m_out = i + 1
        ok = (i < M)[:, None] & n_ok[None, :]
        ptr = X + base + m[:, None] * 2 * NH + n[None, :]
        xr = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        xi = tl.load(ptr + NH, mask=ok, other=0.0).to(tl.float32)
        pa_re, pa_im, p_re, p_im = tl.associative_scan((ar, ai, xr, xi), 0, _combine)
        # add the state entering the tile, decayed by a^(i - start + 1)
        q_re = p_re + pa_re * c_re[None, :] - pa_im * c_im[None, :]
        q_im = p_im + pa_re * c_im[None, :] + pa_im * c_re[None, :]
        out_ok = (i + 1 < M)[:, None] & n_ok[None, :]  # exclusive: P_i is the state at i + 1
        optr = OUT + base + m_out[:, None] * 2 * NH + n[None, :]
        tl.store(optr, q_re, mask=out_ok)
        tl.store(optr + NH, q_im, mask=out_ok)
        if WITH_DA:  # backward: dL/da = sum_m g_m conj-paired with the forward state S_m
            sptr = STATES + base + m_out[:, None] * 2 * NH + n[None, :]
            s_re = tl.load(sptr, mask=out_ok, other=0.0)
            s_im = tl.load(sptr + NH, mask=out_ok, other=0.0)
            da_re += tl.sum(q_re * s_re + q_im * s_im, axis=0)
            da_im += tl.sum(q_im * s_re - q_re * s_im, axis=0)
        last = (i == tl.minimum(start + BLOCK_M, M) - 1)[:, None]
        c_re = tl.sum(tl.where(last, q_re, 0.0), axis=0)
        c_im = tl.sum(tl.where(last, q_im, 0.0), axis=0)
    if WITH_DA:  # one partial per row; rows of a group are summed in torch (deterministic)
        tl.store(DA + r.to(tl.int64) * 2 * NH + n, da_re, mask=n_ok)
        tl.store(DA + r.to(tl.int64) * 2 * NH + NH + n, da_im, mask=n_ok)


def decayed_scan_triton(s: Tensor, a_re: Tensor, a_im: Tensor, group: int,
                        reverse: bool = False, states: Tensor | None = None
                        ) -> tuple[Tensor, Tensor | None]:
    """``decayed_scan_ref(s, a_re, a_im, group, reverse)`` in one kernel (no autograd).

    With ``states`` (the forward scan's output, for the backward: ``s`` is then dL/dstates and
    ``reverse`` True with conj(a)), also returns per-row partials (R, 2 NH) [re | im] of
    sum_m out_m * conj-pair states_m, i.e. dL/da before the sum over each group's rows.
    """
    rows, chunks, width = s.shape
    nh = width // 2
    s = s.contiguous()
    out = torch.empty(s.shape, device=s.device, dtype=torch.float32)
    da = None
    if states is not None:
        states = states.contiguous()
        da = torch.empty(rows, 2 * nh, device=s.device, dtype=torch.float32)
    block_n = min(32, triton.next_power_of_2(nh))
    block_m = min(64, triton.next_power_of_2(chunks))
    grid = (rows, triton.cdiv(nh, block_n))
    _decayed_scan_kernel[grid](s, a_re.float().contiguous(), a_im.float().contiguous(), out,
                               out if states is None else states, out if da is None else da,
                               chunks, nh, group, REVERSE=reverse, WITH_DA=states is not None,
                               BLOCK_M=block_m, BLOCK_N=block_n)
    return out, da
