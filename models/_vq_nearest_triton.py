"""The quantiser's nearest codeword as one Triton kernel (triton is optional: imported only when
used; ``models.vq`` keeps the torch reference and picks this on CUDA).

    codes[r] = argmin_s ||c_s||^2 - 2 k_r . c_s       (||k_r||^2 is the same for every s)

One program per (block of BLOCK_M keys, batch-head) loads its keys once and walks the codebook
in tiles of BLOCK_S, keeping a running minimum and its index: no (rows x S) distance matrix in
memory and no separate argmin pass. The reference (``VectorQuantizer.distances`` + argmin)
writes that matrix in float32 from a float32 GEMM, which has no tensor-core path with TF32 off:
on an H200 it was the step's one FFMA GEMM, 46 us per LongVQ layer at Text-4K (session 10's
profile), about as long as the whole VQ attention forward. Here the dots run on tensor cores as
"tf32x3" (three TF32 products with error compensation: about float32's accuracy), so the codes
are the reference's except where two codes are equidistant to within float32 rounding. Ties
keep the lowest index, as ``torch.argmin``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from models._optional import interpreting

__all__ = ["nearest_code_triton"]

BLOCK_M = 64
BLOCK_S = 64


@triton.jit(do_not_specialize=["L", "H", "S"])
def _nearest_code_kernel(K, CB, C2, CODES, L, H, S, D: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    head = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(K + (bh * L + rows[:, None]) * D + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    best_code = tl.zeros([BLOCK_M], tl.int32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        cb = tl.load(CB + (head * S + offs_s[:, None]) * D + offs_d[None, :],
                     mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        c2 = tl.load(C2 + head * S + offs_s, mask=s_ok, other=float("inf"))
        dist = c2[None, :] - 2.0 * tl.dot(k, tl.trans(cb), input_precision=PREC)
        tile_best = tl.min(dist, axis=1)
        tile_code = tl.argmin(dist, axis=1, tie_break_left=True) + s0
        better = tile_best < best  # strict: an equal later tile keeps the earlier code
        best = tl.where(better, tile_best, best)
        best_code = tl.where(better, tile_code, best_code)
    tl.store(CODES + bh * L + rows, best_code.to(tl.int64), mask=row_ok)


def nearest_code_triton(k: Tensor, codebook: Tensor) -> Tensor:
    """Codes (B, H, L) int64 of the nearest codeword: k (B, H, L, D), codebook (H, S, D); both
    read in float32. CUDA tensors (CPU ones under TRITON_INTERPRET=1)."""
    bsz, heads, length, dim = k.shape
    size = codebook.shape[1]
    kf = k.detach().float().contiguous()
    cb = codebook.detach().float().contiguous()
    c2 = cb.pow(2).sum(-1).contiguous()
    codes = torch.empty(bsz, heads, length, dtype=torch.int64, device=k.device)
    grid = (triton.cdiv(length, BLOCK_M), bsz * heads)
    _nearest_code_kernel[grid](
        kf, cb, c2, codes, length, heads, size, D=dim,
        PREC="ieee" if interpreting() else "tf32x3", BLOCK_M=BLOCK_M, BLOCK_S=BLOCK_S,
        BLOCK_D=max(16, triton.next_power_of_2(dim)), num_warps=4)
    return codes
