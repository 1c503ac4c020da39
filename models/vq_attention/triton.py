"""Fused Triton VQ attention: forward and backward kernels, same function as ``naive.py``.

    logit_ij = s_i q_i . k_hat_j + B_ij        (s_i, B, phi, causal: see ``naive.py``)

Layout. Positions are cut into query *chunks* of CH positions (CH a multiple of the window W,
``default_chunk``: about 128, 4-7 % faster than 256 at 32K on an H200). For a query i of
chunk c the keys split into
  - the *band*, read exactly from k_hat / v: keys in [c CH - W, i] (causal) or
    [c CH - W, (c + 1) CH + W) (bidirectional with bias, or key_grad="window"); it holds the
    exact local blocks of ``linear.py`` (query block n, key blocks n-1, n (, n+1)) and so every
    |i - j| < W pair, where the bias is added;
  - all other keys, read through their codes: sum_s phi(s_i q_i . c_s) U_s with the per-code
    value sums U_s (and counts n_s) of those keys. They are the same for every query of the
    chunk: one (S, Dv) *chunk cache* entry per chunk, the sums over the keys before the band
    (causal: one pass over the keys by ``_cache_sums_kernel``, split into segments that start
    from ``_segment_sums_kernel`` totals when B H alone would not fill the GPU) or outside it
    (bidirectional: the totals over all keys less the band's own sums, ``_far_sums_kernel``,
    one independent program per entry; exact counts, so codes with no key outside the band
    are masked, not rounding residues). Bidirectional without bias (and key_grad="ste"): no
    band, one cache entry of all keys.
Keys of the band outside the local blocks are read exactly too: k_hat_j == c_{s_j}, so the value
is the same as through their code (that is what ``linear.py`` computes with a per-block cache, CH
= W here). A larger CH trades a longer exact band (flash-attention-like tiles on tensor cores)
for a smaller cache in HBM: (L / CH) x S x Dv floats per (batch, head), never L x L or L x S.

Softmax keeps one running max and sum over the code tiles (log-weights s_i q_i . c_s, counts
n_s as multiplicities, absent codes masked) and the band tiles, and saves lse = m + log(l);
laplace (Mega: s_i = 1/n_i, unnormalised) just sums. Tiles accumulate in fp32 from fp32 or
bf16/fp16 inputs (dots: bf16/fp16 on tensor cores, weights rounded to the input dtype before
the value products as in flash attention; fp32 inputs: 3xTF32 dots). The cache sums U are
summed in fp32; the forward reads them in bf16 for bf16 inputs (its weights rounded to bf16 like
the band's), fp32 otherwise (TF32 dots with fp16 inputs); the backward reuses them (saved).

Backward (g_ij = dL/dlogit_ij = P'_ij (dO_i . v_j - delta_i), as in ``linear.py``):
  - ``_bwd_dq_kernel`` per query tile: dq from the code part (s_i sum_s P'_is (dO_i . U_s -
    delta_i n_s) c_s) and from the band tiles, and d(bias) from the band tiles: each tile's
    g summed along its diagonals (``tl.gather``) into a per-program row, summed in torch;
  - ``_grad_sums_kernel`` per query chunk: G_c = sum_{i in c} P_is dO_i (S x Dv); causal,
    turned by ``_scan_kernel`` (exclusive suffix scan) into, per key chunk, the sum over the
    query chunks that read it through codes; bidirectional, kept with its total over chunks;
  - ``_bwd_dkdv_kernel`` per key tile: dv from the band tiles plus the code part: G[s_j] of the
    key's scan entry (causal), or the total less the <= 3 chunks whose band holds j; dk_hat
    from the exact local blocks (key_grad="window", Transformer-VQ's semantics), or, for
    key_grad="ste" with the "dense" strategy, from every (query, key) pair (the far ones without
    bias: their P'_{i, s_j} is the code weight), i.e. dL/dk_hat of the oracle, O(L^2 D) tiles,
    no L x L tensor.
  key_grad="ste" with the "split" strategy: ``_bwd_dkdv_kernel`` sums dk_hat over the band
  rows only, and ``_bwd_dk_far_kernel`` adds the far rows (more than W from the key tile: no
  bias, no mask), one program per (key tile, slice of query chunks), atomically into an fp32
  dk: the same O(L^2 D) tiles as "dense", spread over many programs instead of one long loop
  per key tile (and without the dv accumulator in registers).
  key_grad="ste" with the "codes" strategy (auto above ``DENSE_MAX_LEN``; up to it auto is
  "split", measured 1.2-1.7x faster than "dense" at 4K-32K on an H200): the Triton kernel
  gives the local-block part and ``_key_grad.code_key_grad`` (torch, per-code D x Dv states)
  the far part, from code weights computed in torch ((B, H, L, S), this backward only).
Torch does the small glue: the sum of the d(bias) rows, dtype casts (delta = rowsum(dO O):
``_delta_kernel``). Block sizes are autotuned (``triton.autotune``, keyed on S, D, Dv, W, CH
and a power-of-two bucket of L; the cache sums on B H instead of L);
``LONGVQ_TRITON_AUTOTUNE=0`` (and the interpreter) use the first config. W = 0 (no local part:
no bias, key_grad="ste", as in ``linear.py``/``naive.py``) runs as W = 1. Inputs: float32,
bfloat16 or float16 on CUDA (float64: use ``linear``); CPU tensors only under the interpreter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.flop_counter import register_flop_formula
from triton.runtime.errors import OutOfResources

from models._optional import interpreting
from models.triton_precompile import precompiling

from ._common import (
    LAPLACE_MU,
    LAPLACE_SIGMA,
    check_choice,
    check_inputs,
    laplace_grad,
    no_autocast,
    to_autocast_dtype,
)
from ._key_grad import KEY_GRAD_STRATEGIES, code_key_grad

CHUNK_TARGET = 128  # positions per query chunk (rounded to whole windows), see default_chunk
# key_grad="ste", strategy "auto": Triton "split" tiles (O(L^2 D), fast on tensor cores) up to this
# length, then torch per-code states (O(L S D Dv)).
DENSE_MAX_LEN = 65536
TRITON_KEY_GRAD_STRATEGIES = (*KEY_GRAD_STRATEGIES, "split")
# key_grad="ste", strategy "split": programs of the far-row dk kernel to aim for (a few per SM)
FAR_PROGRAMS = 1024
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = {"past": 0, "far": 1, "all": 2}

_MU = tl.constexpr(LAPLACE_MU)
_INV_SIGMA_SQRT2 = tl.constexpr(1.0 / (LAPLACE_SIGMA * math.sqrt(2.0)))
_INV_SIGMA = tl.constexpr(1.0 / LAPLACE_SIGMA)
_PDF_NORM = tl.constexpr(1.0 / (LAPLACE_SIGMA * math.sqrt(2.0 * math.pi)))
LOG2E = 1.0 / math.log(2.0)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))
# fp32 elements of one 16-byte load: the forward's bias tiles start at multiples of it
BIAS_VECTOR = 4
_BIAS_VECTOR = tl.constexpr(BIAS_VECTOR)


def default_chunk(window: int) -> int:
    """Query chunk size: the multiple of W nearest CHUNK_TARGET from below (at least W)."""
    return window * max(1, CHUNK_TARGET // window)


# ------------------------------------------------------------------------------ jit helpers


@triton.jit
def _phi(x):
    """Mega's Laplace function 0.5 (1 + erf((x - mu) / (sigma sqrt 2)))."""
    return 0.5 * (1.0 + tl.math.erf((x - _MU) * _INV_SIGMA_SQRT2))


@triton.jit
def _dphi(x):
    z = (x - _MU) * _INV_SIGMA
    return tl.exp(-0.5 * z * z) * _PDF_NORM


@triton.jit
def _row_scale(rows, sm_scale, inv_len, IS_SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr):
    """s_i: 1/sqrt(D) (softmax), 1/(i + 1) (laplace, causal), 1/L (laplace, bidirectional)."""
    if IS_SOFTMAX:
        return tl.zeros(rows.shape, tl.float32) + sm_scale
    elif CAUSAL:
        return 1.0 / (rows + 1).to(tl.float32)
    else:
        return tl.zeros(rows.shape, tl.float32) + inv_len


@triton.jit
def _band_bounds(c, last_row, L, W, CH, CAUSAL: tl.constexpr):
    """Keys [lo, hi) of the band of the query rows of chunk c up to last_row."""
    lo = tl.maximum(c * CH - W, 0)
    if CAUSAL:
        hi = tl.minimum(last_row + 1, L)
    else:
        hi = tl.minimum((c + 1) * CH + W, L)
    return lo, hi


@triton.jit
def _add_bias(logit, BIAS, offset, o_lo, o_hi, W, HAS_BIAS: tl.constexpr):
    """logit + B_ij for a tile of offsets i - j in [o_lo, o_hi]: bias[i - j + W - 1] where
    |i - j| < W, gathered in a branch that most band tiles skip (they hold no pair within W of
    the diagonal). dq and dk/dv: no running max there, and a branch-free gather spills more in
    dq. The forward reads ``_bias_tile`` instead."""
    if HAS_BIAS:
        if (o_lo < W) & (o_hi > -W):
            in_window = (offset < W) & (offset > -W)
            logit += tl.load(BIAS + offset + W - 1, mask=in_window, other=0.0)
    return logit


@triton.jit
def _bias_tile(TABLE, stride, y0, c, first_row, j0, W, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The forward's bias tile B_ij, rows i in [first_row, first_row + BLOCK_M) of chunk c, keys
    j in [j0, j0 + BLOCK_N): a plain 2-D slice of the Toeplitz table that ``_bias_table`` builds,
    T[r, y] = B(r - y + y0) (B(o) = bias[o + W - 1] for |o| < W, else 0), rows of ``stride``
    floats. Element (r, k) has offset d + r - k (d = first_row - j0), the value at T[r, k - d +
    y0]: contiguous keys, 16-byte loads that Triton pipelines with the key and value tiles, no
    window mask and no per-element index arithmetic (``_add_bias``'s masked gather cost the
    forward ~60 registers and many selects and compares a tile on sm_90a). Loaded on every band
    tile, not in a branch: in a branch Triton carried the forward's logits in two layouts and
    ran its online softmax twice (2x the exps, 3x the row maxima; tests/test_triton_codegen.py)."""
    # d is a multiple of 4 (the tile sizes are) but in chunks c > 0, whose keys start at
    # c CH - W: there d = W (mod 4). That remainder moves to the row (T[r + 1, y + 1] = T[r, y]),
    # so that the column offset stays a multiple of 4 floats: 16-byte aligned.
    shift = (W % _BIAS_VECTOR) * (c > 0).to(tl.int32)
    d = first_row - j0 - shift
    # a tile beyond the table's columns is all zero (every pair >= W apart), and so is the tile
    # at the clamp: every index lies in T whatever CH, so no mask
    d = tl.minimum(tl.maximum(d, y0 + BLOCK_N - stride), y0)
    col = tl.multiple_of(y0 - d, _BIAS_VECTOR)
    # a multiple of 16 already; this tells Triton (tl.multiple_of of an argument is lost), so
    # that every row of the tile starts aligned
    stride = (stride // 16) * 16
    r = tl.arange(0, BLOCK_M)
    base = TABLE + shift * stride + col
    return tl.load(base + r[:, None] * stride + tl.arange(0, BLOCK_N)[None, :])


@triton.jit
def _query_tile(pid, CH, L, BLOCK_M: tl.constexpr):
    """Program ``pid``'s query tile: its chunk c, first row, rows and their mask (tiles never
    cross a chunk)."""
    tiles = tl.cdiv(CH, BLOCK_M)
    c = pid // tiles
    in_chunk = (pid % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = c * CH + in_chunk
    return c, c * CH + (pid % tiles) * BLOCK_M, rows, (in_chunk < CH) & (rows < L)


@triton.jit
def _code_span(bh, c, n_cache, S, MODE: tl.constexpr):
    """The chunk's cache entry and how many codes it reads (causal chunk 0 reads none)."""
    entry = bh * n_cache + (0 if MODE == 2 else c)
    s_end = S
    if MODE == 0:
        s_end = S * (c > 0).to(tl.int32)
    return entry, s_end


@triton.jit
def _code_dots(q, cb_base, s0, S, D, offs_d, d_ok, PREC: tl.constexpr, BLOCK_S: tl.constexpr):
    """Codes [s0, s0 + BLOCK_S): their indices, mask, vectors and the dots q_i . c_s."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    cb = tl.load(cb_base + offs_s[:, None] * D + offs_d[None, :],
                 mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    return offs_s, s_ok, cb, tl.dot(q, tl.trans(cb), input_precision=PREC)


@triton.jit
def _code_logits(q, scale, cb_base, s0, S, D, offs_d, d_ok, PREC: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    """``_code_dots`` with the logits s_i q_i . c_s instead of the dots."""
    offs_s, s_ok, cb, qc = _code_dots(q, cb_base, s0, S, D, offs_d, d_ok, PREC, BLOCK_S)
    return offs_s, s_ok, cb, qc * scale[:, None]


@triton.jit
def _band_logits(q, scale, K, BIAS, bh, L, D, W, offs_d, d_ok, rows, row_ok, first_row, j0,
                 hi, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Band keys [j0, j0 + BLOCK_N) (below ``hi``) of the query tile ``rows`` (from
    ``first_row``): their indices, mask, exact vectors, logits s_i q_i . k_j + B_ij and the
    valid (query, key) pairs."""
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    k = tl.load(K + (bh * L + cols[:, None]) * D + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    offset = rows[:, None] - cols[None, :]
    logit = tl.dot(q, tl.trans(k), input_precision=PREC) * scale[:, None]
    logit = _add_bias(logit, BIAS, offset, first_row - (j0 + BLOCK_N - 1),
                      first_row + rows.shape[0] - 1 - j0, W, HAS_BIAS)
    valid = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        valid = valid & (offset >= 0)
    return cols, col_ok, k, logit, valid


@triton.jit
def _key_band_rows(j0, j_last, L, W, CH, CAUSAL: tl.constexpr, MODE: tl.constexpr):
    """Query rows [lo, hi) whose band holds a key of the tile [j0, j_last]: chunks c with
    c CH - W <= j (and, bidirectional, (c + 1) CH + W > j); empty in mode "all". Every row
    outside is more than W from every key of the tile."""
    hi = tl.minimum(((j_last + W) // CH + 1) * CH, L)
    if CAUSAL:
        lo = j0
    else:
        lo = tl.maximum(((j0 - W + CH) // CH - 1) * CH, 0)
    if MODE == 2:
        hi = lo
    return lo, hi


@triton.jit
def _value_dots(acc, X, x_rows, x_ok, Y, y_rows, y_ok, DV: tl.constexpr,
                BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """acc += X[x_rows] . Y[y_rows] summed over every value tile (rows of DV values; X's tile
    cast to Y's dtype): (len(x_rows), len(y_rows))."""
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        e_ok = offs_e < DV
        x = tl.load(X + x_rows[:, None] * DV + offs_e[None, :],
                    mask=x_ok[:, None] & e_ok[None, :], other=0.0)
        y = tl.load(Y + y_rows[:, None] * DV + offs_e[None, :],
                    mask=y_ok[:, None] & e_ok[None, :], other=0.0)
        acc += tl.dot(x.to(y.dtype), tl.trans(y), input_precision=PREC)
    return acc


@triton.jit
def _dp_tile(dp, V, DO, bh, L, cols, col_ok, rows, row_ok, DV: tl.constexpr,
             BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """dp += v_j . dO_i over every value tile, for a (key tile, query tile): (BLOCK_N, BLOCK_M)."""
    return _value_dots(dp, V, bh * L + cols, col_ok, DO, bh * L + rows, row_ok, DV, BLOCK_DV,
                       PREC)


# ------------------------------------------------------------------------------ kernels
# Sizes and lengths are not specialised on (do_not_specialize): one compile serves every L.
# Value dims are tiled by BLOCK_DV (<= 128, ``_value_block``; the bf16 forward <= 256,
# ``_forward_value_block``): the sums, the forward and the
# dk/dv kernels run one program per value tile (program axis "bh * n_e + e"); the dq kernel and
# the dk part loop over the value tiles for dO . v and dO . U.


@triton.jit
def _add_code_sums(acc, cnt, V, CODES, bh, lo, hi, L, offs_s, offs_e, e_ok, DV: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc += the per-code sums of v over the keys [max(lo, 0), hi) (one-hot dots, exact
    selection in any dtype), cnt += their counts."""
    for j0 in range(tl.maximum(lo, 0), hi, BLOCK_N):
        acc, cnt = _add_code_tile(acc, cnt, V, CODES, bh, j0, hi, L, offs_s, offs_e, e_ok, DV,
                                  PREC, BLOCK_N)
    return acc, cnt


@triton.jit
def _add_code_tile(acc, cnt, V, CODES, bh, j0, hi, L, offs_s, offs_e, e_ok, DV: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_add_code_sums`` of the keys [j0, j0 + BLOCK_N) that lie in [0, hi)."""
    cols = j0 + tl.arange(0, BLOCK_N)
    ok = (cols < hi) & (cols >= 0)
    code = tl.load(CODES + bh * L + cols, mask=ok, other=-1)
    v = tl.load(V + (bh * L + cols[:, None]) * DV + offs_e[None, :],
                mask=ok[:, None] & e_ok[None, :], other=0.0)
    one_hot = offs_s[:, None] == code[None, :]  # (BLOCK_S, BLOCK_N)
    one_hot = one_hot.to(v.dtype)
    acc += tl.dot(one_hot, v, input_precision=PREC)
    # the counts as a histogram of the tile's codes, relative to the code tile (codes outside
    # it, and the -1 of masked keys, excluded): not a second dot of the one-hot tile (against a
    # tile of ones, ~20 % of the dots of a kernel bound by them), nor a row sum of it (~300
    # warp shuffles a tile on sm_90a)
    n_bins: tl.constexpr = offs_s.shape[0]
    rel = code - tl.min(offs_s, axis=0)
    cnt += tl.histogram(rel, n_bins, mask=(rel >= 0) & (rel < n_bins)).to(tl.float32)
    return acc, cnt


@triton.jit
def _sums_tile(pid_s, pid_be, S, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_S: tl.constexpr):
    """A sums program's batch-head, value tile, code/value offsets and masks."""
    n_e: tl.constexpr = (DV + BLOCK_DV - 1) // BLOCK_DV
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = (pid_be % n_e) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    return (pid_be // n_e).to(tl.int64), pid_be % n_e, offs_s, offs_e, offs_s < S, offs_e < DV


@triton.jit(do_not_specialize=["L", "S", "seg_keys", "offset", "n_seg", "BH"])
def _segment_sums_kernel(
    V, CODES, T, TCNT,
    L, S, seg_keys, offset, n_seg, BH,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Per-code sums (fp32) and counts of the keys [g seg_keys + offset, (g + 1) seg_keys +
    offset) of each segment g = program_id(2): T (BH, n_seg, S, Dv), TCNT (BH, n_seg, S). The
    starting values of ``_cache_sums_kernel``'s segments, and the whole "all" cache. (BH,
    unused, keys the autotuner.)"""
    bh, et, offs_s, offs_e, s_ok, e_ok = _sums_tile(tl.program_id(0), tl.program_id(1), S, DV,
                                                    BLOCK_DV, BLOCK_S)
    g = tl.program_id(2)
    lo = g * seg_keys + offset
    acc, cnt = _add_code_sums(tl.zeros([BLOCK_S, BLOCK_DV], tl.float32),
                              tl.zeros([BLOCK_S], tl.float32), V, CODES, bh, lo,
                              tl.minimum(lo + seg_keys, L), L, offs_s, offs_e, e_ok, DV, PREC,
                              BLOCK_N)
    row = bh * n_seg + g
    tl.store(T + (row * S + offs_s[:, None]) * DV + offs_e[None, :], acc,
             mask=s_ok[:, None] & e_ok[None, :])
    tl.store(TCNT + row * S + offs_s, cnt, mask=s_ok & (et == 0))


@triton.jit(do_not_specialize=["L", "S", "CH", "W", "n_entries", "seg_entries", "n_seg", "BH"])
def _cache_sums_kernel(
    V, CODES, T, TCNT, U, CNT,
    L, S, CH, W, n_entries, seg_entries, n_seg, BH,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Causal code cache in one pass over the keys: entry c = per-code sums of v (summed in
    fp32, stored in U's dtype) and counts of the keys j < c CH - W, c = 0..n_entries-1. One
    program per (code tile, batch-head and value tile, segment of ``seg_entries`` entries)
    walks its entries in order, keeping the running sums in registers: no per-chunk sums in HBM
    and no separate scan. A segment starts from the ``_segment_sums_kernel`` totals T, TCNT of
    the segments before it: with few batch-heads one program per (code tile, batch-head) would
    leave most of the GPU idle while it walks all L keys. (BH, unused, keys the autotuner.)"""
    bh, et, offs_s, offs_e, s_ok, e_ok = _sums_tile(tl.program_id(0), tl.program_id(1), S, DV,
                                                    BLOCK_DV, BLOCK_S)
    g = tl.program_id(2)
    u_mask = s_ok[:, None] & e_ok[None, :]
    acc = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    cnt = tl.zeros([BLOCK_S], tl.float32)
    for g2 in range(0, g):
        row = bh * n_seg + g2
        acc += tl.load(T + (row * S + offs_s[:, None]) * DV + offs_e[None, :], mask=u_mask,
                       other=0.0)
        cnt += tl.load(TCNT + row * S + offs_s, mask=s_ok, other=0.0)
    first = g * seg_entries
    count = tl.minimum(n_entries - first, seg_entries)
    # One flat loop over (entry, key tile of the entry's chunk) with the stores masked, not a
    # loop over entries around a loop over their CH / BLOCK_N tiles: Triton pipelines only
    # innermost loops, so the nested walk waited on every load of v (~2 us a tile at 32K).
    tiles = tl.cdiv(CH, BLOCK_N)
    for t in range(0, count * tiles):  # entry c, then the keys [c CH - W, (c + 1) CH - W) join
        i = t // tiles
        k = t - i * tiles
        c = first + i
        start = c * CH - W
        row = bh * n_entries + c
        tl.store(U + (row * S + offs_s[:, None]) * DV + offs_e[None, :],
                 acc.to(U.dtype.element_ty), mask=u_mask & (k == 0))
        tl.store(CNT + row * S + offs_s, cnt, mask=s_ok & (et == 0) & (k == 0))
        # the segment's last entry adds no keys: the next segment starts from T
        hi = tl.where(i == count - 1, start, tl.minimum(start + CH, L))
        acc, cnt = _add_code_tile(acc, cnt, V, CODES, bh, start + k * BLOCK_N, hi, L, offs_s,
                                  offs_e, e_ok, DV, PREC, BLOCK_N)


@triton.jit(do_not_specialize=["L", "S", "CH", "W", "n_chunks", "BH"])
def _far_sums_kernel(
    V, CODES, TOT, TOT_CNT, U, CNT,
    L, S, CH, W, n_chunks, BH,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Bidirectional code cache, entry c = program_id(2): the per-code sums (stored in U's
    dtype) and counts of the keys outside chunk c's band [c CH - W, (c + 1) CH + W), as the
    totals over all keys (TOT (BH, S, Dv), TOT_CNT (BH, S), fp32) less the band's own sums.
    Every entry is independent (no pass over the keys in order, no scan), and each reads only
    its CH + 2W keys. Counts are exact integers, so a code whose keys all lie in the band gets
    count 0 and sum 0, not a rounding residue of the subtraction: the forward masks it
    (softmax) or reads u = 0 (laplace). (BH, unused, keys the autotuner.)"""
    bh, et, offs_s, offs_e, s_ok, e_ok = _sums_tile(tl.program_id(0), tl.program_id(1), S, DV,
                                                    BLOCK_DV, BLOCK_S)
    c = tl.program_id(2)
    band, band_cnt = _add_code_sums(tl.zeros([BLOCK_S, BLOCK_DV], tl.float32),
                                    tl.zeros([BLOCK_S], tl.float32), V, CODES, bh, c * CH - W,
                                    tl.minimum((c + 1) * CH + W, L), L, offs_s, offs_e, e_ok,
                                    DV, PREC, BLOCK_N)
    u_mask = s_ok[:, None] & e_ok[None, :]
    tot = tl.load(TOT + (bh * S + offs_s[:, None]) * DV + offs_e[None, :], mask=u_mask,
                  other=0.0)
    cnt = tl.load(TOT_CNT + bh * S + offs_s, mask=s_ok, other=0.0) - band_cnt
    u = tl.where(cnt[:, None] > 0, tot - band, 0.0)
    row = bh * n_chunks + c
    tl.store(U + (row * S + offs_s[:, None]) * DV + offs_e[None, :], u.to(U.dtype.element_ty),
             mask=u_mask)
    tl.store(CNT + row * S + offs_s, cnt, mask=s_ok & (et == 0))


@triton.jit(do_not_specialize=["n_entries", "seg_entries", "row_len"])
def _scan_totals_kernel(X, TOT, n_entries, seg_entries, row_len, BLOCK: tl.constexpr):
    """TOT[b, g] = sum of X's entries [g seg, (g + 1) seg) (fp32): the segments' totals."""
    b, g = tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < row_len
    x_row = X + b * n_entries * row_len + offs
    acc = tl.zeros([BLOCK], tl.float32)
    for e in range(g * seg_entries, tl.minimum((g + 1) * seg_entries, n_entries)):
        acc += tl.load(x_row + e * row_len, mask=ok, other=0.0)
    tl.store(TOT + (b * tl.num_programs(2) + g) * row_len + offs, acc, mask=ok)


@triton.jit(do_not_specialize=["n_entries", "out_entries", "first", "row_len", "seg_entries"])
def _scan_kernel(X, OUT, START, n_entries, out_entries, first, row_len, seg_entries,
                 HAS_START: tl.constexpr, BLOCK: tl.constexpr):
    """Exclusive suffix scan over the entries of rows of ``row_len`` floats, summed in fp32,
    stored in OUT's dtype at OUT entries [first, first + n_entries + 1) of out_entries per
    batch row: out[e] = sum_{e' > e} X[e'] (e = 0..n, out[n] = 0). One pass instead of torch's
    flip + cumsum + flip + cat (+ cast). Program (·, b, g) writes the entries [g seg, (g + 1)
    seg) (the last segment also entry n), starting from START[b, g] (the sum of the entries
    after the segment): each step waits on a load, so a row needs several segments in flight
    when there are few rows."""
    b, g = tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < row_len
    x_row = X + b * n_entries * row_len + offs
    out_row = OUT + (b * out_entries + first) * row_len + offs
    lo = g * seg_entries
    hi = tl.minimum(lo + seg_entries, n_entries)
    if HAS_START:
        acc = tl.load(START + (b * tl.num_programs(2) + g) * row_len + offs, mask=ok, other=0.0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
    if hi == n_entries:  # the last segment: out[n] = 0
        tl.store(out_row + n_entries * row_len, acc.to(OUT.dtype.element_ty), mask=ok)
    for i in range(0, hi - lo):
        e = hi - 1 - i  # out[e] = sum of the entries after e; then add X[e]
        tl.store(out_row + e * row_len, acc.to(OUT.dtype.element_ty), mask=ok)
        acc += tl.load(x_row + e * row_len, mask=ok, other=0.0)


@triton.jit(do_not_specialize=["n_rows"])
def _delta_kernel(O, DO, DELTA, n_rows, DV: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    """delta_i = dO_i . O_i in fp32 (softmax backward), without fp32 copies of dO and O."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < n_rows
    acc = tl.zeros([BLOCK_R], tl.float32)
    for e0 in range(0, DV, BLOCK_DV):
        offs_e = e0 + tl.arange(0, BLOCK_DV)
        mask = row_ok[:, None] & (offs_e < DV)[None, :]
        o = tl.load(O + rows[:, None] * DV + offs_e[None, :], mask=mask, other=0.0)
        do = tl.load(DO + rows[:, None] * DV + offs_e[None, :], mask=mask, other=0.0)
        acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + rows, acc, mask=row_ok)


@triton.jit(do_not_specialize=["L", "H", "S", "W", "CH", "n_cache", "cb_per_head", "L_BUCKET",
                               "bias_stride", "bias_y0"])
def _fwd_kernel(
    Q, K, V, CB, U, CNT, BIAS, O, LSE,
    L, H, S, W, CH, n_cache, cb_per_head, sm_scale, inv_len, L_BUCKET, bias_stride, bias_y0,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Output (and lse) of one query tile and value tile. BIAS: ``_bias_table``'s Toeplitz table
    of the bias (rows of ``bias_stride`` floats, row 0's offset 0 at column ``bias_y0``), not
    the bias."""
    pid = tl.program_id(0)
    n_e: tl.constexpr = (DV + BLOCK_DV - 1) // BLOCK_DV
    bh = (tl.program_id(1) // n_e).to(tl.int64)
    et = tl.program_id(1) % n_e
    c, tile_start, rows, row_ok = _query_tile(pid, CH, L, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = et * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    e_ok = offs_e < DV
    q = tl.load(Q + (bh * L + rows[:, None]) * D + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    scale = _row_scale(rows, sm_scale, inv_len, IS_SOFTMAX, CAUSAL)
    if IS_SOFTMAX:  # logits in log2 units (the launcher scales the bias so too): exp2 below,
        scale = scale * _LOG2E  # one multiply a logit fewer than exp's x log2(e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # code part: the chunk's cache entry
    entry, s_end = _code_span(bh, c, n_cache, S, MODE)
    cb_base = CB + (bh % H) * cb_per_head * S * D  # D a constexpr: aligned, so pipelined
    for s0 in range(0, s_end, BLOCK_S):
        offs_s, s_ok, cb, qc = _code_dots(q, cb_base, s0, S, D, offs_d, d_ok, PREC, BLOCK_S)
        u = tl.load(U + (entry * S + offs_s[:, None]) * DV + offs_e[None, :],
                    mask=s_ok[:, None] & e_ok[None, :], other=0.0)
        if IS_SOFTMAX:
            cnt = tl.load(CNT + entry * S + offs_s, mask=s_ok, other=0.0)
            qc = tl.where(cnt[None, :] > 0, qc, float("-inf"))
            # the scale (> 0) applied to the row maxima, and inside the exponent: one fused
            # multiply-add an element (s_i qc - m_i) where scaled logits took a multiply and a
            # subtraction (sm_90a: 30 FMUL and 32 FADD fewer; no time change measurable at
            # #9's shape on an H100, call56)
            m_new = tl.maximum(m_i, tl.max(qc, axis=1) * scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(qc * scale[:, None] - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p * cnt[None, :], axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(u.dtype), u, input_precision=PREC)
            m_i = m_new
        else:  # absent codes and padded slots have u = 0
            acc += tl.dot(_phi(qc * scale[:, None]).to(u.dtype), u, input_precision=PREC)

    # band part: exact keys
    if MODE != 2:
        last_row = tl.minimum(tile_start + BLOCK_M, tl.minimum((c + 1) * CH, L)) - 1
        lo, hi = _band_bounds(c, last_row, L, W, CH, CAUSAL)
        for j0 in range(lo, hi, BLOCK_N):
            cols, col_ok, k, logit, valid = _band_logits(
                q, scale, K, BIAS, bh, L, D, W, offs_d, d_ok, rows, row_ok, tile_start, j0,
                hi, False, CAUSAL, PREC, BLOCK_N)
            if HAS_BIAS:  # BIAS: the Toeplitz table
                logit += _bias_tile(BIAS, bias_stride, bias_y0, c, tile_start, j0, W, BLOCK_M,
                                    BLOCK_N)
            v = tl.load(V + (bh * L + cols[:, None]) * DV + offs_e[None, :],
                        mask=col_ok[:, None] & e_ok[None, :], other=0.0)
            if IS_SOFTMAX:
                logit = tl.where(valid, logit, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(logit, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(logit - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
                m_i = m_new
            else:
                p = tl.where(valid, _phi(logit), 0.0)
                acc += tl.dot(p.to(v.dtype), v, input_precision=PREC)

    out_mask = row_ok[:, None] & e_ok[None, :]
    if IS_SOFTMAX:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        acc = acc / l_safe[:, None]
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        tl.store(LSE + bh * L + rows, (m_safe + tl.log2(l_safe)) * _LN2,
                 mask=row_ok & (et == 0))
    tl.store(O + (bh * L + rows[:, None]) * DV + offs_e[None, :],
             acc.to(O.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["L", "H", "S", "CH", "n_cache", "cb_per_head"])
def _grad_sums_kernel(
    Q, CB, DO, LSE, CNT, G,
    L, H, S, CH, n_cache, cb_per_head, sm_scale, inv_len,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """G_c[s] = sum over the queries i of chunk c of P_is dO_i (P: the code weight)."""
    c = tl.program_id(0)
    sid = tl.program_id(1)
    n_e: tl.constexpr = (DV + BLOCK_DV - 1) // BLOCK_DV
    bh = (tl.program_id(2) // n_e).to(tl.int64)
    et = tl.program_id(2) % n_e
    n_chunks = tl.num_programs(0)
    offs_s = sid * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = et * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    e_ok = offs_e < DV
    cb = tl.load(CB + (bh % H) * cb_per_head * S * D + offs_s[:, None] * D + offs_d[None, :],
                 mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    entry = bh * n_cache + (0 if MODE == 2 else c)
    present = tl.load(CNT + entry * S + offs_s, mask=s_ok, other=0.0) > 0
    g = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    end = tl.minimum((c + 1) * CH, L)
    for i0 in range(c * CH, end, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        q = tl.load(Q + (bh * L + rows[:, None]) * D + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + (bh * L + rows[:, None]) * DV + offs_e[None, :],
                     mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        scale = _row_scale(rows, sm_scale, inv_len, IS_SOFTMAX, CAUSAL)
        logit = tl.dot(q, tl.trans(cb), input_precision=PREC) * scale[:, None]
        keep = row_ok[:, None] & present[None, :]
        if IS_SOFTMAX:  # absent codes masked before exp: their logits may exceed lse
            lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
            p = tl.exp(tl.where(keep, logit - lse[:, None], float("-inf")))
        else:
            p = tl.where(keep, _phi(logit), 0.0)
        g += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    tl.store(G + ((bh * n_chunks + c) * S + offs_s[:, None]) * DV + offs_e[None, :], g,
             mask=s_ok[:, None] & e_ok[None, :])


@triton.jit(do_not_specialize=["L", "H", "S", "W", "CH", "n_cache", "cb_per_head", "L_BUCKET"])
def _bwd_dq_kernel(
    Q, K, V, CB, U, CNT, BIAS, DO, LSE, DELTA, DQ, DBIAS,
    L, H, S, W, CH, n_cache, cb_per_head, sm_scale, inv_len, L_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """dq of one query tile (code part + band) and its d(bias) row (band tiles' diagonals)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    c, tile_start, rows, row_ok = _query_tile(pid, CH, L, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + (bh * L + rows[:, None]) * D + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    scale = _row_scale(rows, sm_scale, inv_len, IS_SOFTMAX, CAUSAL)
    if IS_SOFTMAX:
        lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_e: tl.constexpr = (DV + BLOCK_DV - 1) // BLOCK_DV
    if n_e == 1:  # one value tile: dO is read once, not once per code and band tile
        offs_e = tl.arange(0, BLOCK_DV)
        do_rows = tl.load(DO + (bh * L + rows[:, None]) * DV + offs_e[None, :],
                          mask=row_ok[:, None] & (offs_e < DV)[None, :], other=0.0)

    # code part: dL/dlogit_is = P'_is (dO_i . U_s - delta_i n_s)
    entry, s_end = _code_span(bh, c, n_cache, S, MODE)
    cb_base = CB + (bh % H) * cb_per_head * S * D  # D a constexpr: aligned, so pipelined
    for s0 in range(0, s_end, BLOCK_S):
        offs_s, s_ok, cb, logit = _code_logits(q, scale, cb_base, s0, S, D, offs_d, d_ok, PREC,
                                               BLOCK_S)
        if n_e == 1:
            u = tl.load(U + (entry * S + offs_s[:, None]) * DV + offs_e[None, :],
                        mask=s_ok[:, None] & (offs_e < DV)[None, :], other=0.0)
            coeff = tl.dot(do_rows.to(u.dtype), tl.trans(u), input_precision=PREC)
        else:
            coeff = _value_dots(tl.zeros([BLOCK_M, BLOCK_S], tl.float32), DO, bh * L + rows,
                                row_ok, U, entry * S + offs_s, s_ok, DV, BLOCK_DV, PREC)
        if IS_SOFTMAX:
            cnt = tl.load(CNT + entry * S + offs_s, mask=s_ok, other=0.0)
            keep = row_ok[:, None] & (cnt[None, :] > 0)
            p = tl.exp(tl.where(keep, logit - lse[:, None], float("-inf")))
            ds = p * (coeff - delta[:, None] * cnt[None, :])
        else:
            ds = tl.where(row_ok[:, None], _dphi(logit) * coeff, 0.0)
        dq += tl.dot(ds.to(cb.dtype), cb, input_precision=PREC)

    if MODE != 2:
        last_row = tl.minimum(tile_start + BLOCK_M, tl.minimum((c + 1) * CH, L)) - 1
        lo, hi = _band_bounds(c, last_row, L, W, CH, CAUSAL)
        n_bias = 2 * W - 1
        for j0 in range(lo, hi, BLOCK_N):
            cols, col_ok, k, logit, valid = _band_logits(
                q, scale, K, BIAS, bh, L, D, W, offs_d, d_ok, rows, row_ok, tile_start, j0,
                hi, HAS_BIAS, CAUSAL, PREC, BLOCK_N)
            if n_e == 1:
                v = tl.load(V + (bh * L + cols[:, None]) * DV + offs_e[None, :],
                            mask=col_ok[:, None] & (offs_e < DV)[None, :], other=0.0)
                dp = tl.dot(do_rows, tl.trans(v), input_precision=PREC)
            else:
                dp = _value_dots(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DO, bh * L + rows,
                                 row_ok, V, bh * L + cols, col_ok, DV, BLOCK_DV, PREC)
            if IS_SOFTMAX:
                p = tl.exp(tl.where(valid, logit - lse[:, None], float("-inf")))
                ds = p * (dp - delta[:, None])
            else:
                ds = tl.where(valid, _dphi(logit) * dp, 0.0)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
            if HAS_BIAS:
                # offsets i - j in this tile: tile_start - j0 - (BLOCK_N - 1) + t, t < M + N - 1
                o_min = tile_start - j0 - (BLOCK_N - 1)
                if (o_min < W) & (o_min + BLOCK_M + BLOCK_N - 2 > -W):
                    r = tl.arange(0, BLOCK_M)[:, None]
                    t = tl.arange(0, BLOCK_T)[None, :]
                    col = r + (BLOCK_N - 1) - t  # the column of row r at diagonal t
                    on_tile = (col >= 0) & (col < BLOCK_N)
                    col = tl.minimum(tl.maximum(col, 0), BLOCK_N - 1)
                    diag = tl.where(on_tile, tl.gather(ds, col, axis=1), 0.0)
                    per_offset = tl.sum(diag, axis=0)
                    o = o_min + tl.arange(0, BLOCK_T)
                    o_ok = (o < W) & (o > -W) & (tl.arange(0, BLOCK_T) < BLOCK_M + BLOCK_N - 1)
                    row_id = bh * tl.num_programs(0) + pid
                    tl.atomic_add(DBIAS + row_id * n_bias + o + W - 1, per_offset, mask=o_ok)

    dq = dq * scale[:, None]
    tl.store(DQ + (bh * L + rows[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["L", "S", "W", "CH", "n_chunks", "g_entries", "L_BUCKET"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, BIAS, GCAT, GTOT, CODES, DK, DV_OUT,
    L, S, W, CH, n_chunks, g_entries, sm_scale, inv_len, L_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, DK_PAIRS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dv (one value tile) and, in the programs of value tile 0, dk_hat of one key tile: loop
    over the query tiles whose band holds it, then dv += G[s_j] (the code part). DK_PAIRS: the
    (query, key) pairs dk_hat sums over: 0 the exact local blocks (key_grad="window"); 1 every
    pair (key_grad="ste", "dense": tile 0 loops over every query that sees the key); 2 every
    pair of the band rows (ste, "split": ``_bwd_dk_far_kernel`` adds the other rows)."""
    pid = tl.program_id(0)
    n_e: tl.constexpr = (DV + BLOCK_DV - 1) // BLOCK_DV
    bh = (tl.program_id(1) // n_e).to(tl.int64)
    et = tl.program_id(1) % n_e
    j0 = pid * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < L
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = et * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    e_ok = offs_e < DV
    k = tl.load(K + (bh * L + cols[:, None]) * D + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    j_last = tl.minimum(j0 + BLOCK_N, L) - 1
    band_lo, band_hi = _key_band_rows(j0, j_last, L, W, CH, CAUSAL, MODE)
    q_lo = band_lo
    q_hi = band_hi
    if DK_PAIRS == 1:
        if et == 0:  # dk from every query that sees the key
            q_hi = q_hi * 0 + L
            if not CAUSAL:
                q_lo = q_lo * 0
    # DK_PAIRS 0: the rows of the key tile's exact local blocks (the others skip dp and ds)
    local_lo = (j0 // W - (0 if CAUSAL else 1)) * W
    local_hi = (j_last // W + 2) * W
    if n_e == 1:  # one value tile: the key tile's v is read once (dp = v . dO)
        v_keys = tl.load(V + (bh * L + cols[:, None]) * DV + offs_e[None, :],
                         mask=col_ok[:, None] & e_ok[None, :], other=0.0)
    for i0 in range(q_lo, q_hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < q_hi
        q = tl.load(Q + (bh * L + rows[:, None]) * D + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + (bh * L + rows[:, None]) * DV + offs_e[None, :],
                     mask=row_ok[:, None] & e_ok[None, :], other=0.0)
        scale = _row_scale(rows, sm_scale, inv_len, IS_SOFTMAX, CAUSAL)
        offset = rows[None, :] - cols[:, None]  # (BLOCK_N, BLOCK_M): i - j
        logit = tl.dot(k, tl.trans(q), input_precision=PREC) * scale[None, :]
        logit = _add_bias(logit, BIAS, offset, i0 - (j0 + BLOCK_N - 1), i0 + BLOCK_M - 1 - j0, W,
                          HAS_BIAS)
        valid = row_ok[None, :] & col_ok[:, None]
        if CAUSAL:
            valid = valid & (offset >= 0)
        if IS_SOFTMAX:
            lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
            p = tl.exp(tl.where(valid, logit - lse[None, :], float("-inf")))
        else:
            p = tl.where(valid, _phi(logit), 0.0)
        # the pairs whose key is in the band of the query's chunk (per element: the tile's
        # row range [band_lo, band_hi) is the union over its keys)
        chunk = rows // CH
        in_band = valid & (cols[:, None] >= chunk[None, :] * CH - W)
        if not CAUSAL:
            in_band = in_band & (cols[:, None] < (chunk[None, :] + 1) * CH + W)
        # "all": no band, every key's dv comes from its code; DK_PAIRS 1: skip the far tiles.
        # Otherwise every tile of the loop is a band tile: no branch around the dot, so that
        # Triton pipelines the dO loads (it does not pipeline a load whose dots are in branches)
        if MODE != 2:
            if DK_PAIRS == 1:
                if (i0 < band_hi) & (i0 + BLOCK_M > band_lo):
                    dv += tl.dot(tl.where(in_band, p, 0.0).to(do.dtype), do,
                                 input_precision=PREC)
            else:
                dv += tl.dot(tl.where(in_band, p, 0.0).to(do.dtype), do, input_precision=PREC)
        need_dk = et == 0
        if DK_PAIRS == 0:
            need_dk = need_dk & (i0 < local_hi) & (i0 + BLOCK_M > local_lo)
        if need_dk:
            if n_e == 1:
                dp = tl.dot(v_keys, tl.trans(do), input_precision=PREC)
            else:
                dp = _dp_tile(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), V, DO, bh, L, cols,
                              col_ok, rows, row_ok, DV, BLOCK_DV, PREC)
            if IS_SOFTMAX:
                delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
                ds = p * (dp - delta[None, :])
            else:
                ds = tl.where(valid, _dphi(logit) * dp, 0.0)
            if DK_PAIRS == 1:
                dk_pairs = valid
            elif DK_PAIRS == 2:  # "split": the other pairs are _bwd_dk_far_kernel's
                dk_pairs = in_band
            else:  # exact local blocks: block(i) - block(j) in {0, 1} (causal) or {-1, 0, 1}
                gap = rows[None, :] // W - cols[:, None] // W
                dk_pairs = valid & (gap <= 1) & (gap >= -1)
            ds = tl.where(dk_pairs, ds * scale[None, :], 0.0)
            dk += tl.dot(ds.to(q.dtype), q, input_precision=PREC)

    # code part of dv: the sum of G_c[s_j] over the query chunks c that read key j through
    # its code. "past": entry (j + W) // CH of the suffix scan; "all": the one entry; "far":
    # the total GTOT less the (at most 3, as W <= CH) chunks whose band holds j
    code = tl.load(CODES + bh * L + cols, mask=col_ok, other=0)
    g_mask = col_ok[:, None] & e_ok[None, :]
    g_cols = code[:, None] * DV + offs_e[None, :]
    if MODE == 0:
        index = tl.minimum((cols + W) // CH, n_chunks)
        dv += tl.load(GCAT + (bh * g_entries + index[:, None]) * S * DV + g_cols, mask=g_mask,
                      other=0.0)
    elif MODE == 2:
        dv += tl.load(GCAT + bh * S * DV + g_cols, mask=g_mask, other=0.0)
    else:
        dv += tl.load(GTOT + bh * S * DV + g_cols, mask=g_mask, other=0.0)
        c_lo = tl.maximum(cols - W, 0) // CH  # chunks c with c CH - W <= j < (c + 1) CH + W
        c_hi = tl.minimum((cols + W) // CH, n_chunks - 1)
        for t in tl.static_range(3):
            index = c_lo + t
            dv -= tl.load(GCAT + (bh * g_entries + index[:, None]) * S * DV + g_cols,
                          mask=g_mask & (index <= c_hi)[:, None], other=0.0)
    tl.store(DK + (bh * L + cols[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :] & (et == 0))
    tl.store(DV_OUT + (bh * L + cols[:, None]) * DV + offs_e[None, :],
             dv.to(DV_OUT.dtype.element_ty), mask=g_mask)


@triton.jit
def _dk_far_rows(dk, k, cols, col_ok, Q, V, DO, LSE, DELTA, bh, lo, hi, L, W, CH, sm_scale,
                 inv_len, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, IS_SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr,
                 SIDE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """dk += sum over the query rows i in [lo, hi) outside key j's band of dS_ij s_i q_i for the
    key tile ``cols``: every row (SIDE 0, mode "all": no band), the rows of the chunks after
    key j's band (1) or before it (2), masked per element, so that the pairs are exactly the
    complement of ``_bwd_dkdv_kernel``'s whatever the two kernels' tile sizes. Those rows are
    more than W from the key: no bias, read exactly."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if SIDE == 1:  # chunks c > (j + W) // CH
        first_far = ((cols + W) // CH + 1) * CH
    elif SIDE == 2:  # chunks c < floor((j - W) / CH)
        last_far = ((cols - W + CH) // CH - 1) * CH
    for i0 in range(lo, hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        q = tl.load(Q + (bh * L + rows[:, None]) * D + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        scale = _row_scale(rows, sm_scale, inv_len, IS_SOFTMAX, CAUSAL)
        logit = tl.dot(k, tl.trans(q), input_precision=PREC) * scale[None, :]
        valid = row_ok[None, :] & col_ok[:, None]
        if SIDE == 1:
            valid = valid & (rows[None, :] >= first_far[:, None])
        elif SIDE == 2:
            valid = valid & (rows[None, :] < last_far[:, None])
        dp = _dp_tile(tl.zeros(logit.shape, tl.float32), V, DO, bh, L, cols, col_ok, rows,
                      row_ok, DV, BLOCK_DV, PREC)
        if IS_SOFTMAX:
            lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
            p = tl.exp(tl.where(valid, logit - lse[None, :], float("-inf")))
            ds = p * (dp - delta[None, :])
        else:
            ds = tl.where(valid, _dphi(logit) * dp, 0.0)
        dk += tl.dot((ds * scale[None, :]).to(q.dtype), q, input_precision=PREC)
    return dk


@triton.jit(do_not_specialize=["L", "W", "CH", "chunks_per_split", "L_BUCKET"])
def _bwd_dk_far_kernel(
    Q, K, V, DO, LSE, DELTA, DK,
    L, W, CH, chunks_per_split, sm_scale, inv_len, L_BUCKET,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_SOFTMAX: tl.constexpr, CAUSAL: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """key_grad="ste", strategy "split": the far-query part of dk_hat of one key tile, from the
    query rows outside the tile's band range (those are > W away: no bias, all pairs valid),
    restricted to this program's slice of query chunks (axis 2), added atomically into the fp32
    DK that ``_bwd_dkdv_kernel`` wrote (band rows). Many programs per key tile instead of one
    long loop: the O(L^2) part runs with the whole GPU busy at small B H."""
    bh = tl.program_id(1).to(tl.int64)
    j0 = tl.program_id(0) * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < L
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k = tl.load(K + (bh * L + cols[:, None]) * D + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    j_last = tl.minimum(j0 + BLOCK_N, L) - 1
    split_lo = tl.program_id(2) * chunks_per_split * CH
    split_hi = tl.minimum(split_lo + chunks_per_split * CH, L)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if MODE == 2:  # no band: every row
        dk = _dk_far_rows(dk, k, cols, col_ok, Q, V, DO, LSE, DELTA, bh, split_lo, split_hi,
                          L, W, CH, sm_scale, inv_len, D, DV, BLOCK_D, BLOCK_DV, IS_SOFTMAX,
                          CAUSAL, 0, PREC, BLOCK_M)
    else:
        # rows after the band of the tile's first key (the per-element mask does the rest)
        above = ((j0 + W) // CH + 1) * CH
        dk = _dk_far_rows(dk, k, cols, col_ok, Q, V, DO, LSE, DELTA, bh,
                          tl.maximum(above, split_lo), split_hi, L, W, CH, sm_scale, inv_len,
                          D, DV, BLOCK_D, BLOCK_DV, IS_SOFTMAX, CAUSAL, 1, PREC, BLOCK_M)
        if not CAUSAL:  # rows before the band of the tile's last key
            below = ((j_last - W + CH) // CH - 1) * CH
            dk = _dk_far_rows(dk, k, cols, col_ok, Q, V, DO, LSE, DELTA, bh, split_lo,
                              tl.minimum(below, split_hi), L, W, CH, sm_scale, inv_len, D, DV,
                              BLOCK_D, BLOCK_DV, IS_SOFTMAX, CAUSAL, 2, PREC, BLOCK_M)
    tl.atomic_add(DK + (bh * L + cols[:, None]) * D + offs_d[None, :], dk,
                  mask=col_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------ launch configs


def _with_block_t(meta: dict) -> dict:
    """The dq kernel's diagonal width: BLOCK_M + BLOCK_N - 1 rounded up to a power of two."""
    return {**meta, "BLOCK_T": triton.next_power_of_2(meta["BLOCK_M"] + meta["BLOCK_N"] - 1)}


def _configs(metas: list[dict], warps: list[int], stages: list[int]) -> list[triton.Config]:
    return [triton.Config(meta, num_warps=w, num_stages=s)
            for meta, w, s in zip(metas, warps, stages, strict=True)]


# The causal walk is one pipelined loop (``_cache_sums_kernel``): deeper pipelines (4 stages)
# and whole code tiles of 128 (V read fewer times) are candidates too.
SUMS_CONFIGS = _configs([{"BLOCK_N": 64, "BLOCK_S": 64}, {"BLOCK_N": 128, "BLOCK_S": 64},
                         {"BLOCK_N": 64, "BLOCK_S": 32}, {"BLOCK_N": 128, "BLOCK_S": 32},
                         {"BLOCK_N": 64, "BLOCK_S": 128}, {"BLOCK_N": 64, "BLOCK_S": 64},
                         {"BLOCK_N": 64, "BLOCK_S": 128},
                         # 0.375 ms against 0.390 on 3 stages at 32K on an H100 (call54)
                         {"BLOCK_N": 128, "BLOCK_S": 64}],
                        [4, 4, 4, 4, 8, 4, 8, 4], [3, 3, 3, 3, 2, 4, 4, 4])
# The first config of each list is the default (no autotuning); all fit D, Dv <= 128 in
# registers on an H100. The interpreter uses 16-wide tiles so that tiny tests cross tiles.
CONFIGS: dict[str, list[triton.Config]] = {
    # one program per (code tile, batch-head, segment): small code tiles when B H is small
    "sums": SUMS_CONFIGS,
    "seg_sums": SUMS_CONFIGS,
    "far_sums": SUMS_CONFIGS,
    "fwd": _configs([{"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_S": 64},
                     {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_S": 64},
                     {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 128},
                     {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_S": 32},
                     {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_S": 128},
                     {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_S": 64},
                     {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_S": 128},
                     # the forward's loops are short (S / BLOCK_S code tiles, then 2-3 band
                     # tiles): a deeper pipeline. (All of S = 256 in one code tile, and 128 x 64
                     # tiles on 4 warps, spill on sm_90a: results/cpu-triton-sm90/)
                     {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_S": 64},
                     # 64-row tiles: 138-143 registers on sm_90a (3 programs an SM; the 128 x 32
                     # x 32 above: 254, 2) and half the causal band's masked pairs. At 32K on an
                     # H100: 1.19 and 1.10 ms against 1.32 (results/h100/session20/call54/)
                     {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 32},
                     {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 64},
                     # variants of it (2 and 4 stages, 16-key band tiles, 128 codes a tile):
                     # the two above tie within run-to-run noise (1.10-1.19 ms each at 32K, the
                     # autotuner's pick flipped between H100 runs); with these the forward
                     # measured 1.548 ms in #9's table (results/h100/session20/call56/)
                     {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 64},
                     {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 64},
                     {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_S": 64},
                     {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 128}],
                    [4, 8, 4, 4, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4],
                    [2, 2, 2, 3, 2, 3, 2, 3, 3, 3, 2, 4, 3, 3]),
    "grad_sums": _configs([{"BLOCK_M": 64, "BLOCK_S": 64}, {"BLOCK_M": 128, "BLOCK_S": 64},
                           {"BLOCK_M": 64, "BLOCK_S": 128}, {"BLOCK_M": 64, "BLOCK_S": 256}],
                          [4, 8, 8, 8], [2, 2, 2, 2]),
    "dq": _configs([_with_block_t(m) for m in ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_S": 64},
                                               {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 64},
                                               {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_S": 64},
                                               {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_S": 128},
                                               {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_S": 128},
                                               {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_S": 64})],
                   [4, 4, 8, 4, 8, 4], [2, 2, 2, 3, 2, 3]),
    # the last: 64 x 64 on 8 warps, the default at Dv > 128 (WIDE_VALUE_DEFAULTS)
    "dkdv": _configs([{"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 32, "BLOCK_N": 64},
                      {"BLOCK_M": 64, "BLOCK_N": 128}, {"BLOCK_M": 64, "BLOCK_N": 128},
                      {"BLOCK_M": 128, "BLOCK_N": 64}, {"BLOCK_M": 64, "BLOCK_N": 64},
                      {"BLOCK_M": 64, "BLOCK_N": 64}],
                     [4, 4, 8, 8, 8, 4, 8], [2, 2, 2, 3, 2, 3, 2]),
    "dk_far": _configs([{"BLOCK_M": 64, "BLOCK_N": 64}, {"BLOCK_M": 128, "BLOCK_N": 64},
                        {"BLOCK_M": 64, "BLOCK_N": 128}], [4, 8, 8], [3, 3, 2]),
}
INTERPRETER_META: dict[str, dict[str, int]] = {
    "sums": {"BLOCK_N": 16, "BLOCK_S": 16},
    "seg_sums": {"BLOCK_N": 16, "BLOCK_S": 16},
    "far_sums": {"BLOCK_N": 16, "BLOCK_S": 16},
    "fwd": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_S": 16},
    "grad_sums": {"BLOCK_M": 16, "BLOCK_S": 16},
    "dq": _with_block_t({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_S": 16}),
    "dkdv": {"BLOCK_M": 16, "BLOCK_N": 16},
    # key tiles of another size than dkdv's: the split of dk_hat must not depend on tiling
    "dk_far": {"BLOCK_M": 16, "BLOCK_N": 32},
}
FALLBACK_META: dict[str, dict[str, int]] = {
    "sums": {"BLOCK_N": 32, "BLOCK_S": 32},
    "seg_sums": {"BLOCK_N": 32, "BLOCK_S": 32},
    "far_sums": {"BLOCK_N": 32, "BLOCK_S": 32},
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_S": 32},
    "grad_sums": {"BLOCK_M": 32, "BLOCK_S": 32},
    "dq": _with_block_t({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_S": 32}),
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 32},
    "dk_far": {"BLOCK_M": 32, "BLOCK_N": 32},
}
_KERNELS = {"sums": _cache_sums_kernel, "seg_sums": _segment_sums_kernel,
            "far_sums": _far_sums_kernel, "fwd": _fwd_kernel,
            "grad_sums": _grad_sums_kernel,
            "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel, "dk_far": _bwd_dk_far_kernel}
_TUNE_KEYS = {
    "sums": ["S", "CH", "DV", "BH"],
    "seg_sums": ["S", "DV", "BH"],
    "far_sums": ["S", "CH", "DV", "BH"],
    "fwd": ["S", "W", "CH", "D", "DV", "L_BUCKET"],
    "grad_sums": ["S", "CH", "D", "DV"],
    "dq": ["S", "W", "CH", "D", "DV", "L_BUCKET"],
    "dkdv": ["S", "W", "CH", "D", "DV", "L_BUCKET"],
    "dk_far": ["W", "CH", "D", "DV", "L_BUCKET"],
}
# The autotuner runs each config several times: kernels that accumulate get their output reset
# (dq: d(bias) rows from zero) or restored (dk_far: adds to the band part of dk).
_RESTORE = {"dk_far": ["DK"]}
# Timing each config for 5 + 40 ms instead of Triton's 25 + 100: a tuning is 3-14 configs of
# up to 8 kernels, redone at every new key (each length of a sweep: ~5 s a LongVQ cell on an H100,
# results/h100/session18/); 40 ms is still 8 runs of a 5 ms kernel (the 32K ones take 0.4-2.4).
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 40


def _time_config(kernel_call, quantiles):
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


# each tuning compiles its configs in parallel threads first (Triton 3.6 compiles them one by
# one as it times them: models/triton_precompile.py)
_TUNED = {name: precompiling(triton.autotune(CONFIGS[name], key=_TUNE_KEYS[name],
                                             reset_to_zero=["DBIAS"] if name == "dq" else None,
                                             restore_value=_RESTORE.get(name),
                                             do_bench=_time_config)(kernel))
          for name, kernel in _KERNELS.items()}


def autotuning() -> bool:
    return not interpreting() and os.environ.get("LONGVQ_TRITON_AUTOTUNE", "1") != "0"


# Without autotuning, kernels with several value tiles (Dv > 128: LongVQ's Dv = 2 d_model) use
# these configs instead of the first: compiled for sm_90a (results/cpu-triton-sm90/), the first
# spills 1.7 KB (dk/dv) and 0.3 KB (dq) per thread at D 64, Dv 256; these spill nothing.
WIDE_VALUE_DEFAULTS = {"dkdv": 6, "dq": 1}


def _default_config(name: str, kwargs: dict) -> triton.Config:
    """The config a launch without autotuning uses: the first, or WIDE_VALUE_DEFAULTS's."""
    configs = CONFIGS[name]
    index = WIDE_VALUE_DEFAULTS.get(name, 0) if kwargs.get("DV", 0) > kwargs.get(
        "BLOCK_DV", 1 << 30) else 0
    return configs[index] if index < len(configs) else configs[0]


def _launch(name: str, grid, *args, **kwargs) -> None:
    """Run kernel ``name``: autotuned, or with ``_default_config`` (LONGVQ_TRITON_AUTOTUNE=0) or
    the interpreter's small tiles. ``grid`` takes the meta-parameters (tile sizes). A config that
    does not fit the device (shared memory, e.g. float32 with D = Dv = 128) falls back to
    ``FALLBACK_META`` (small tiles, no pipelining); the error is raised at compile time, before
    anything ran."""
    if interpreting():
        _KERNELS[name][grid(INTERPRETER_META[name])](*args, **kwargs, **INTERPRETER_META[name])
        return
    try:
        if autotuning():
            _TUNED[name][grid](*args, **kwargs)
        else:  # float32 tiles are twice as large: no pipelining keeps them in shared memory
            config = _default_config(name, kwargs)
            stages = 1 if args[0].dtype == torch.float32 else config.num_stages
            _KERNELS[name][grid(config.kwargs)](*args, **kwargs, **config.kwargs,
                                                num_warps=config.num_warps, num_stages=stages)
    except OutOfResources:
        meta = FALLBACK_META[name]
        if name == "dq":  # the d(bias) rows are accumulated with atomics: start from zero
            args[11].zero_()
        _KERNELS[name][grid(meta)](*args, **kwargs, **meta, num_warps=4, num_stages=1)


def _block_sizes(name: str, key: str) -> list[int]:
    """Every ``key`` tile size kernel ``name`` may run with (autotuned, interpreter, fallback)."""
    metas = [c.kwargs for c in CONFIGS[name]] + [INTERPRETER_META[name], FALLBACK_META[name]]
    return [m[key] for m in metas]


def _min_block(name: str, key: str) -> int:
    return min(_block_sizes(name, key))


# ------------------------------------------------------------------------------ host side


@dataclass(frozen=True)
class _Spec:
    """Problem constants shared by the forward and the backward."""

    batch_heads: int
    heads: int
    length: int
    dim: int
    value_dim: int
    size: int  # S
    window: int  # W
    chunk: int  # CH
    attn_fn: str
    causal: bool
    mode: str  # "past" | "far" | "all"
    has_bias: bool
    key_grad: str
    strategy: str  # "dense" | "codes" (key_grad="ste" far keys)
    # 1: per-head codebooks (head h's at h S D), 0: shared. Not the stride S D itself: Triton
    # knows S D is a multiple of D only when D (a constexpr) multiplies in the kernel, and a
    # codebook tile whose alignment it cannot prove is loaded without cp.async pipelining
    cb_per_head: int

    @property
    def n_chunks(self) -> int:
        return -(-self.length // self.chunk)

    @property
    def value_tiles(self) -> int:
        return -(-self.value_dim // _value_block(self.value_dim))

    @property
    def n_cache(self) -> int:
        return 1 if self.mode == "all" else self.n_chunks

    def constants(self, dtype: torch.dtype) -> dict:
        return dict(
            D=self.dim, DV=self.value_dim, BLOCK_D=_block(self.dim),
            BLOCK_DV=_value_block(self.value_dim), IS_SOFTMAX=self.attn_fn == "softmax",
            CAUSAL=self.causal, MODE=MODES[self.mode], PREC=_precision(dtype),
        )

    @property
    def scales(self) -> tuple[float, float]:
        return self.dim**-0.5, 1.0 / self.length

    @property
    def length_bucket(self) -> int:
        return min(triton.next_power_of_2(self.length), 65536)


def _block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _value_block(value_dim: int) -> int:
    """Value tile: Dv up to 128 in one tile (LongVQ's Dv = 2 d_model can be 1024); 16 in the
    interpreter, so that tiny tests cross value tiles."""
    return min(16 if interpreting() else 128, _block(value_dim))


FORWARD_VALUE_BLOCK = 256  # bf16: the forward's widest value tile


def _forward_value_block(value_dim: int, dtype: torch.dtype) -> int:
    """The forward's value tile: with bf16 inputs, Dv up to 256 in one tile. Each value tile's
    program recomputes the logits and the softmax, so LongVQ's Dv = 256 in two tiles did that
    work twice; compiled for sm_90a, the 256-wide forward does not spill (8 warps: 228
    registers; results/cpu-triton-sm90/). float32 and float16 (fp32 code cache) keep
    ``_value_block``: their tiles are twice the bytes."""
    if interpreting() or dtype != torch.bfloat16:
        return _value_block(value_dim)
    return min(FORWARD_VALUE_BLOCK, _block(value_dim))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: 3xTF32 dots (about fp32 accuracy on tensor cores; "ieee" FMA dots compile
    ~5x slower); bf16/fp16 inputs: their tensor-core dots, TF32 for the fp32 x fp32 ones (the
    cache sums U)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Cache sums: aim for this many programs per SM (one per code tile and batch-head alone is
# a few dozen programs when B H is small, e.g. LongVQ's single head at batch 2)
SUMS_PROGRAMS_PER_SM = 2


def _sms(device: torch.device) -> int:
    return 2 if interpreting() else torch.cuda.get_device_properties(device).multi_processor_count


def _fill_segments(programs: int, n_units: int, per_sm: int, device: torch.device) -> int:
    """How many segments to split each of ``programs`` sequential walks over ``n_units`` into:
    1 when the programs already fill the GPU (a totals pass would only add work), else enough
    for ``per_sm`` programs per SM; at most n_units. Splitting on until ``per_sm`` programs per
    SM was slower for the 32K cache sums (B H = 64: 256 programs on 132 SMs; 1.84 -> 2.09-2.13
    ms forward, the totals pass 0.29 ms and the walk no faster: results/h100/session19/)."""
    sms = _sms(device)
    if programs >= sms:
        return 1
    return max(1, min(n_units, triton.cdiv(per_sm * sms, programs)))


def _even_split(n_units: int, pieces: int) -> tuple[int, int]:
    """(pieces, units per piece) for ``n_units`` >= 1 cut into at most ``pieces`` equal pieces
    (the last may be shorter), none empty."""
    per_piece = triton.cdiv(n_units, max(1, min(pieces, n_units)))
    return triton.cdiv(n_units, per_piece), per_piece


def _sums_segments(spec: _Spec, n_units: int, device: torch.device) -> int:
    """How many segments to split ``n_units`` (cache entries, or key tiles for "all") into so
    that the sums kernels fill the GPU: at least 1, at most n_units."""
    programs = triton.cdiv(spec.size, 64) * spec.batch_heads * spec.value_tiles
    return _fill_segments(programs, n_units, SUMS_PROGRAMS_PER_SM, device)


def _segment_sums(spec: _Spec, v: Tensor, codes: Tensor, n_seg: int, seg_keys: int,
                  offset: int) -> tuple[Tensor, Tensor]:
    """``_segment_sums_kernel``: fp32 per-code sums T (BH, n_seg, S, Dv) and counts (BH, n_seg,
    S) of the keys [g seg_keys + offset, (g + 1) seg_keys + offset), g < n_seg."""
    bh = spec.batch_heads
    t = torch.empty(bh, n_seg, spec.size, spec.value_dim, device=v.device, dtype=torch.float32)
    t_cnt = torch.empty(bh, n_seg, spec.size, device=v.device, dtype=torch.float32)
    _launch(
        "seg_sums", lambda meta: (triton.cdiv(spec.size, meta["BLOCK_S"]),
                                  bh * spec.value_tiles, n_seg),
        v, codes, t, t_cnt, spec.length, spec.size, seg_keys, offset, n_seg, bh,
        DV=spec.value_dim, BLOCK_DV=_value_block(spec.value_dim), PREC=_precision(v.dtype),
    )
    return t, t_cnt


def _cache_sums(spec: _Spec, v: Tensor, codes: Tensor, u: Tensor, counts: Tensor,
                segments: int | None = None) -> None:
    """``_cache_sums_kernel`` (causal) into u (BH, n, S, Dv) and counts (BH, n, S), n =
    n_chunks, split into ``segments`` (default ``_sums_segments``) whose starting sums come from
    ``_segment_sums``."""
    bh, n, chunk, window = spec.batch_heads, spec.n_chunks, spec.chunk, spec.window
    n_seg, seg_entries = _even_split(
        n, _sums_segments(spec, n, v.device) if segments is None else segments)
    if n_seg > 1:  # segment g's keys join during its entries (the last segment's: unused)
        t, t_cnt = _segment_sums(spec, v, codes, n_seg, seg_entries * chunk, -window)
    else:
        t, t_cnt = u, counts  # not read
    _launch(
        "sums", lambda meta: (triton.cdiv(spec.size, meta["BLOCK_S"]), bh * spec.value_tiles,
                              n_seg),
        v, codes, t, t_cnt, u, counts, spec.length, spec.size, chunk, window, n, seg_entries,
        n_seg, bh, DV=spec.value_dim, BLOCK_DV=_value_block(spec.value_dim),
        PREC=_precision(v.dtype),
    )


def _key_totals(spec: _Spec, v: Tensor, codes: Tensor,
                segments: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-code sums (BH, S, Dv) and counts (BH, S) of all keys, fp32: ``_segment_sums`` over
    ``segments`` pieces of the keys (default: enough to fill the GPU), summed."""
    tiles = triton.cdiv(spec.length, 64)
    n_seg, seg_keys = _even_split(
        spec.length, _sums_segments(spec, tiles, v.device) if segments is None else segments)
    t, t_cnt = _segment_sums(spec, v, codes, n_seg, seg_keys, 0)
    return t.sum(1), t_cnt.sum(1)


SCAN_BLOCK = 1024  # floats of a cache row per program of ``_scan_kernel``
SCAN_PROGRAMS_PER_SM = 4  # segments are added until the scan has this many programs per SM


def _scan_into(out: Tensor, first: int, x: Tensor, segments: int | None = None) -> Tensor:
    """``_scan_kernel``: the exclusive suffix scan of contiguous fp32 (B, n, ...) ``x`` over
    dim 1 into out[:, first : first + n + 1] (``out``: contiguous (B, n_out, ...), any float
    dtype).
    ``segments`` (default: enough for SCAN_PROGRAMS_PER_SM programs per SM when the rows alone
    do not fill the GPU -- LongVQ at 64K has a single row of 64 programs, whose scans ran 8x
    slower than at 8K batch 8 for the same bytes): pieces of each row scanned in parallel from
    the totals of the pieces after them (``_scan_totals_kernel``, then a cumsum over pieces)."""
    rows, n = x.shape[0], x.shape[1]
    row_len = math.prod(x.shape[2:])
    block = 16 if interpreting() else SCAN_BLOCK
    tiles = triton.cdiv(row_len, block)
    n_seg, seg_entries = _even_split(n, _fill_segments(
        tiles * rows, n, SCAN_PROGRAMS_PER_SM, x.device) if segments is None else segments)
    start = x  # not read with one segment
    if n_seg > 1:
        totals = torch.empty(rows, n_seg, row_len, device=x.device, dtype=torch.float32)
        _scan_totals_kernel[(tiles, rows, n_seg)](x, totals, n, seg_entries, row_len,
                                                  BLOCK=block)
        # exclusive over segments: the totals after segment g
        start = totals.flip(1).cumsum(1).flip(1) - totals
    _scan_kernel[(tiles, rows, n_seg)](
        x, out, start, n, out.shape[1], first, row_len, seg_entries, HAS_START=n_seg > 1,
        BLOCK=block)
    return out


def _code_cache(spec: _Spec, v: Tensor, codes: Tensor, u_dtype: torch.dtype = torch.float32,
                segments: int | None = None) -> tuple[Tensor, Tensor]:
    """U (BH, n_cache, S, Dv), in ``u_dtype`` (summed in fp32), and n (BH, n_cache, S), fp32:
    the per-code sums each query chunk reads through codes. Chunk c reads the keys
    j < c CH - W ("past"), j < c CH - W or j >= (c + 1) CH + W ("far": all keys less the
    chunk's band, ``_far_sums_kernel``), or all keys ("all"). ``segments``: how many pieces each
    pass over the keys is split into (default: enough to fill the GPU)."""
    shape = (spec.batch_heads, spec.n_cache, spec.size)
    if spec.mode == "past":
        u = torch.empty(*shape, spec.value_dim, device=v.device, dtype=u_dtype)
        counts = torch.empty(*shape, device=v.device, dtype=torch.float32)
        _cache_sums(spec, v, codes, u, counts, segments=segments)
        return u, counts
    total, total_cnt = _key_totals(spec, v, codes, segments)
    if spec.mode == "all":
        return total[:, None].to(u_dtype), total_cnt[:, None]
    u = torch.empty(*shape, spec.value_dim, device=v.device, dtype=u_dtype)
    counts = torch.empty(*shape, device=v.device, dtype=torch.float32)
    _launch(
        "far_sums", lambda meta: (triton.cdiv(spec.size, meta["BLOCK_S"]),
                                  spec.batch_heads * spec.value_tiles, spec.n_chunks),
        v, codes, total, total_cnt, u, counts, spec.length, spec.size, spec.chunk, spec.window,
        spec.n_chunks, spec.batch_heads, DV=spec.value_dim,
        BLOCK_DV=_value_block(spec.value_dim), PREC=_precision(v.dtype),
    )
    return u, counts


def _grad_cache(spec: _Spec, q, cb, grad_out, lse, counts) -> tuple[Tensor, Tensor | None]:
    """The adjoint of ``_code_cache`` for v, from G_c = sum_{i in c} P_is dO_i per query chunk:
    "past", per key index, the sum over the chunks that read it (suffix scan); "all", the sum
    over all chunks; "far", the G_c themselves and their total (the dk/dv kernel subtracts the
    chunks whose band holds the key). (BH, g_entries, S, Dv) and the total (BH, S, Dv) or
    None, fp32; see ``_bwd_dkdv_kernel``."""
    bh, n, size = spec.batch_heads, spec.n_chunks, spec.size
    g = torch.empty(bh, n, size, spec.value_dim, device=q.device, dtype=torch.float32)
    sm_scale, inv_len = spec.scales
    lse_arg = lse if lse is not None else g  # unused for laplace
    _launch(
        "grad_sums", lambda meta: (n, triton.cdiv(size, meta["BLOCK_S"]),
                                   bh * spec.value_tiles),
        q, cb, grad_out, lse_arg, counts, g, spec.length, spec.heads, size, spec.chunk,
        spec.n_cache, spec.cb_per_head, sm_scale, inv_len,
        **spec.constants(q.dtype),
    )
    if spec.mode == "all":
        return g.sum(1, keepdim=True), None
    if spec.mode == "far":
        return g, g.sum(1)
    # entry a = (j + W) // CH (clamped to n): the sum over chunks c > a (n + 1 entries)
    out = torch.empty(bh, n + 1, size, spec.value_dim, device=q.device, dtype=torch.float32)
    return _scan_into(out, 0, g), None


def _round_up(x: int, multiple: int) -> int:
    return triton.cdiv(x, multiple) * multiple


def _bias_table(bias: Tensor, window: int) -> tuple[Tensor, int, int]:
    """The forward's bias as a zero-padded Toeplitz table T[r, y] = B(r - y + y0) (B(o) =
    bias[o + W - 1] for |o| < W, else 0; fp32, contiguous, rows of ``stride`` floats), so that
    every band tile's bias is a plain 2-D slice of it (``_bias_tile``). Returns (T, stride, y0).

    ``_bias_tile`` reads rows shift + r (r < BLOCK_M, shift < BIAS_VECTOR) and columns
    y0 - d + k (k < BLOCK_N) with d clamped to [y0 + BLOCK_N - stride, y0], for any tile size
    the forward runs with (up to m, n below). In range: y0 >= W + n - 1 (a tile with d >= y0 has
    every offset d + shift + r - k >= W), stride - y0 - n >= W + m + BIAS_VECTOR - 2 (every
    offset <= -W for d <= y0 + n - stride). y0 and stride are multiples of 16: with d a multiple
    of 4, each tile row starts 16-byte aligned. m + 3 rows of about 2 W + 400 floats (W = 64:
    131 x 528, 0.28 MB), whatever CH."""
    m, n = max(_block_sizes("fwd", "BLOCK_M")), max(_block_sizes("fwd", "BLOCK_N"))
    y0 = _round_up(window + n - 1, 16)
    stride = _round_up(y0 + n + window + m + BIAS_VECTOR - 2, 16)
    rows = m + BIAS_VECTOR - 1
    # B over the table's offsets r - y + y0, from o_min = y0 - (stride - 1) up
    o_min = y0 - (stride - 1)
    padded = bias.new_zeros(rows + stride - 1)
    padded[1 - window - o_min:window - o_min] = bias
    r = torch.arange(rows, device=bias.device)
    y = torch.arange(stride, device=bias.device)
    return padded[r[:, None] - y[None, :] + (y0 - o_min)], stride, y0


def _forward(spec: _Spec, q, k, v, cb, codes, bias):
    u, cnt = _code_cache(spec, v, codes, _forward_cache_dtype(q.dtype))
    out = torch.empty(*q.shape[:-1], spec.value_dim, device=q.device, dtype=q.dtype)
    lse = (torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
           if spec.attn_fn == "softmax" else None)
    sm_scale, inv_len = spec.scales
    value_block = _forward_value_block(spec.value_dim, q.dtype)
    table, stride, y0 = u, 0, 0  # not read without a bias
    if bias is not None:
        if spec.attn_fn == "softmax":  # the kernel's logits are in log2 units
            bias = bias * LOG2E
        table, stride, y0 = _bias_table(bias, spec.window)
    _launch(
        "fwd", lambda meta: (spec.n_chunks * triton.cdiv(spec.chunk, meta["BLOCK_M"]),
                             spec.batch_heads * triton.cdiv(spec.value_dim, value_block)),
        q, k, v, cb, u, cnt, table, out,
        lse if lse is not None else out, spec.length, spec.heads, spec.size, spec.window,
        spec.chunk, spec.n_cache, spec.cb_per_head, sm_scale, inv_len, spec.length_bucket,
        stride, y0, HAS_BIAS=spec.has_bias,
        **{**spec.constants(q.dtype), "BLOCK_DV": value_block},
    )
    return out, lse, u, cnt


def _delta(out: Tensor, grad_out: Tensor) -> Tensor:
    """rowsum(dO * O), fp32, (BH, L): ``_delta_kernel``."""
    delta = torch.empty(out.shape[:-1], device=out.device, dtype=torch.float32)
    rows, dv = delta.numel(), out.shape[-1]
    block_r = 16 if interpreting() else 64
    _delta_kernel[(triton.cdiv(rows, block_r),)](out, grad_out, delta, rows, DV=dv,
                                                 BLOCK_R=block_r, BLOCK_DV=_value_block(dv))
    return delta


def _forward_cache_dtype(dtype: torch.dtype) -> torch.dtype:
    """The forward reads U in bf16 for bf16 inputs (half the bytes, bf16 tensor-core dots with
    the weights rounded to bf16 as in the band tiles); fp16 keeps fp32 (sums of many values can
    leave fp16's range), fp32 stays fp32. The backward reads the same U (saved)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _backward(spec: _Spec, q, k, v, cb, codes, bias, out, lse, grad_out, u, cnt):
    """dq, dk_hat, dv (kernel dtype) and dbias (fp32 or None); u, cnt: the forward's cache."""
    softmax = spec.attn_fn == "softmax"
    delta = _delta(out, grad_out) if softmax else None
    gcat, gtot = _grad_cache(spec, q, cb, grad_out, lse, cnt)
    sm_scale, inv_len = spec.scales
    dummy = u
    dq = torch.empty_like(q)
    tiles = triton.cdiv(spec.chunk, _min_block("dq", "BLOCK_M")) * spec.n_chunks
    dbias_rows = torch.zeros(spec.batch_heads * tiles, 2 * spec.window - 1, device=q.device,
                             dtype=torch.float32)
    _launch(
        "dq", lambda meta: (spec.n_chunks * triton.cdiv(spec.chunk, meta["BLOCK_M"]),
                            spec.batch_heads),
        q, k, v, cb, u, cnt, bias if bias is not None else dummy, grad_out,
        lse if softmax else dummy, delta if softmax else dummy, dq, dbias_rows,
        spec.length, spec.heads, spec.size, spec.window, spec.chunk, spec.n_cache,
        spec.cb_per_head, sm_scale, inv_len, spec.length_bucket,
        HAS_BIAS=spec.has_bias, **spec.constants(q.dtype),
    )
    split = spec.key_grad == "ste" and spec.strategy == "split"
    # "split": the far-row kernel adds into dk atomically, so dk is accumulated in fp32
    dk = torch.empty(k.shape, device=k.device, dtype=torch.float32) if split else \
        torch.empty_like(k)
    dv = torch.empty_like(v)
    dk_pairs = 0 if spec.key_grad == "window" else {"dense": 1, "codes": 0, "split": 2}[
        spec.strategy]
    _launch(
        "dkdv", lambda meta: (triton.cdiv(spec.length, meta["BLOCK_N"]),
                              spec.batch_heads * spec.value_tiles),
        q, k, v, grad_out, lse if softmax else dummy, delta if softmax else dummy,
        bias if bias is not None else dummy, gcat, gtot if gtot is not None else gcat, codes,
        dk, dv,
        spec.length, spec.size, spec.window, spec.chunk, spec.n_chunks, gcat.shape[1],
        sm_scale, inv_len, spec.length_bucket,
        HAS_BIAS=spec.has_bias, DK_PAIRS=dk_pairs, **spec.constants(q.dtype),
    )
    if split:
        chunks_per_split = -(-spec.n_chunks // _far_splits(spec))
        _launch(
            "dk_far", lambda meta: (triton.cdiv(spec.length, meta["BLOCK_N"]), spec.batch_heads,
                                    -(-spec.n_chunks // chunks_per_split)),
            q, k, v, grad_out, lse if softmax else dummy, delta if softmax else dummy, dk,
            spec.length, spec.window, spec.chunk, chunks_per_split, sm_scale, inv_len,
            spec.length_bucket, **spec.constants(q.dtype),
        )
    dbias = dbias_rows.sum(0) if spec.has_bias else None
    return dq, dk, dv, dbias, delta


def _far_splits(spec: _Spec) -> int:
    """Programs per key tile of ``_bwd_dk_far_kernel``: enough for ~FAR_PROGRAMS programs in
    all (64-wide key tiles), at most one per query chunk; 3 in the interpreter (tests cross
    the slices)."""
    if interpreting():
        return min(3, spec.n_chunks)
    key_tiles = spec.batch_heads * -(-spec.length // 64)
    return max(1, min(spec.n_chunks, -(-FAR_PROGRAMS // key_tiles)))


def _far_key_grad_torch(spec: _Spec, q, k, v, codebook, codes, bias, lse, delta, grad_out):
    """key_grad="ste", strategy "codes": the far-key part of dk_hat (query block >= key block +
    2, or |difference| >= 2) with ``linear.py``'s torch code (per-code states), from code
    weights computed here in torch. (B, H, L, D) fp32."""
    from .linear import _prepare, _read_cache

    batch, heads, length, _ = q.shape
    with no_autocast(q):
        p = _prepare(q, k, v, codebook, codes, bias, spec.attn_fn, "ste", spec.causal,
                     spec.window)
        pad = p.blocks.padded - length

        def padded(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x.float(), (0, 0, 0, pad))

        logits = torch.einsum("bhld,hsd->bhls", p.q, p.codebook) * p.scale[:, None]
        code_logits = p.code_groups(logits)
        counts = _read_cache(p.code_groups(p.one_hot).sum(dim=3), p.mode)
        present = (counts > 0).unsqueeze(3)
        valid = p.code_groups(p.in_range)
        grad_out = padded(grad_out)
        if spec.attn_fn == "softmax":
            lse_p = torch.nn.functional.pad(lse, (0, pad)).view(batch, heads, length + pad, 1)
            shifted = torch.where(present, code_logits, float("-inf")) - p.code_groups(lse_p)
            weights_grad = torch.where(valid, torch.exp(shifted), 0.0)
            delta_p = torch.nn.functional.pad(delta, (0, pad))[..., None]
            do_ext = torch.cat([grad_out, -delta_p], dim=-1)
            v_ext = torch.cat([p.v, torch.ones_like(p.v[..., :1])], dim=-1)
        else:
            weights_grad = torch.where(valid, laplace_grad(code_logits), 0.0)
            do_ext, v_ext = grad_out, p.v
        scale_g = p.code_groups(p.scale)
        weights = torch.where(present, weights_grad * scale_g, 0.0).flatten(2, 3)
        dk = code_key_grad(weights, p.q, do_ext, v_ext, p.codes, p.mode, p.blocks, "codes")
    return dk[:, :, :length]


# The op as two custom ops with a registered autograd formula: under torch.compile they are
# opaque nodes of the model's graph (dynamo neither traces the launcher nor re-autotunes, and the
# layout casts around them fuse into the neighbouring kernels), where an autograd.Function
# behind torch.compiler.disable split each layer's graph in two. Their inputs are the kernel
# layout: (B H, L, .) tensors in the kernel dtype, int32 codes, a float32 bias.
def _op_spec(q: Tensor, v: Tensor, codebook: Tensor, bias: Tensor | None, heads: int,
             attn_fn: str, causal: bool, window: int, key_grad: str, strategy: str,
             chunk: int) -> _Spec:
    if causal:
        mode = "past"
    else:
        mode = "far" if bias is not None or key_grad == "window" else "all"
    return _Spec(
        batch_heads=q.shape[0], heads=heads, length=q.shape[1], dim=q.shape[2],
        value_dim=v.shape[2], size=codebook.shape[1], window=window, chunk=chunk,
        attn_fn=attn_fn, causal=causal, mode=mode, has_bias=bias is not None,
        key_grad=key_grad, strategy=strategy,
        cb_per_head=int(codebook.shape[0] > 1),
    )


def _no_lse(q: Tensor) -> Tensor:
    """Laplace has no row statistics; custom ops return tensors, so an empty one."""
    return q.new_empty(0, dtype=torch.float32)


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, codebook: Tensor, codes: Tensor,
              bias: Tensor | None, heads: int, attn_fn: str, causal: bool, window: int,
              key_grad: str, strategy: str, chunk: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """out (B H, L, Dv), lse (B H, L) or empty, and the code cache U, n (saved for the
    backward)."""
    spec = _op_spec(q, v, codebook, bias, heads, attn_fn, causal, window, key_grad, strategy,
                    chunk)
    q, k, v, codebook, codes = (x.contiguous() for x in (q, k, v, codebook, codes))
    bias = None if bias is None else bias.contiguous()
    out, lse, u, cnt = _forward(spec, q, k, v, codebook, codes, bias)
    return out, _no_lse(q) if lse is None else lse, u, cnt


_fwd_op = torch.library.custom_op("longvq::vq_attention_fwd", _fwd_impl, mutates_args=())


@_fwd_op.register_fake
def _(q, k, v, codebook, codes, bias, heads, attn_fn, causal, window, key_grad, strategy,
      chunk):
    spec = _op_spec(q, v, codebook, bias, heads, attn_fn, causal, window, key_grad, strategy,
                    chunk)
    cache = (spec.batch_heads, spec.n_cache, spec.size)
    return (q.new_empty(*q.shape[:-1], spec.value_dim),
            q.new_empty(q.shape[:-1], dtype=torch.float32) if attn_fn == "softmax"
            else _no_lse(q),
            q.new_empty(*cache, spec.value_dim, dtype=_forward_cache_dtype(q.dtype)),
            q.new_empty(cache, dtype=torch.float32))


def _bwd_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, codebook: Tensor,
              codes: Tensor, bias: Tensor | None, out: Tensor, lse: Tensor, u: Tensor,
              cnt: Tensor, heads: int, attn_fn: str, causal: bool, window: int, key_grad: str,
              strategy: str, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk_hat, dv (the kernel dtype) and dbias (float32; empty without a bias)."""
    spec = _op_spec(q, v, codebook, bias, heads, attn_fn, causal, window, key_grad, strategy,
                    chunk)
    q, k, v, codebook, codes, out = (x.contiguous() for x in (q, k, v, codebook, codes, out))
    bias = None if bias is None else bias.contiguous()
    softmax = attn_fn == "softmax"
    do = grad_out.to(q.dtype).contiguous()
    dq, dk, dv, dbias, delta = _backward(spec, q, k, v, codebook, codes, bias, out,
                                         lse if softmax else None, do, u, cnt)
    if key_grad == "ste" and spec.strategy == "codes":
        def per_head(x: Tensor) -> Tensor:  # (B H, L, .) -> (B, H, L, .)
            return x.view(-1, heads, *x.shape[1:])

        far = _far_key_grad_torch(
            spec, per_head(q), per_head(k), per_head(v), codebook, per_head(codes).long(), bias,
            per_head(lse) if softmax else None, None if delta is None else per_head(delta),
            per_head(do))
        dk = dk.float() + far.flatten(0, 1)
    return dq, dk.to(k.dtype), dv, _no_lse(q) if dbias is None else dbias


_bwd_op = torch.library.custom_op("longvq::vq_attention_bwd", _bwd_impl, mutates_args=())


@_bwd_op.register_fake
def _(grad_out, q, k, v, codebook, codes, bias, out, lse, u, cnt, heads, attn_fn, causal, window,
      key_grad, strategy, chunk):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            _no_lse(q) if bias is None else bias.new_empty(bias.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, codebook, codes, bias, *params = inputs
    out, lse, u, cnt = output
    # the code cache (L / CH entries of S x Dv) is kept rather than recomputed in the backward
    ctx.save_for_backward(q, k, v, codebook, codes, bias, out, lse, u, cnt)
    ctx.params = params
    ctx.has_bias = bias is not None


def _input_grads(ctx, dq: Tensor, dk: Tensor, dv: Tensor, dbias: Tensor) -> tuple:
    """The backward's results per forward input (none for the codebook, codes and params)."""
    return (dq, dk, dv, None, None, dbias if ctx.has_bias else None,
            *(None for _ in ctx.params))


def _backward_formula(ctx, grad_out, _grad_lse, _grad_u, _grad_cnt):
    return _input_grads(ctx, *_bwd_op(grad_out, *ctx.saved_tensors, *ctx.params))


_fwd_op.register_autograd(_backward_formula, setup_context=_setup_context)


class _EagerVQAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls: a custom op's Python
    dispatch costs tens of microseconds per call more than an autograd.Function's, which the
    kernel benchmark (host time included) would count at short L."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return _input_grads(ctx, *_bwd_impl(grad_out, *ctx.saved_tensors, *ctx.params))


# FLOP estimates for torch.compile's partitioner (models/fft_conv.py says why): per query the
# code part (q . c_s and the weights times U_s over S codes) and its band of exact keys (about
# CH / 2 + W causal, CH + 2W bidirectional with a local part, none for "all").
def vq_attention_flops(q_shape, v_shape, codebook_shape, has_bias: bool, causal: bool,
                       window: int, key_grad: str, chunk: int) -> int:
    batch_heads, length, dim = q_shape
    value_dim, size = v_shape[-1], codebook_shape[1]
    if causal:
        band = chunk // 2 + window
    else:
        band = chunk + 2 * window if has_bias or key_grad == "window" else 0
    return 2 * batch_heads * length * (size + band) * (dim + value_dim)


@register_flop_formula(torch.ops.longvq.vq_attention_fwd)
def _(q_shape, k_shape, v_shape, codebook_shape, codes_shape, bias_shape, heads, attn_fn,
      causal, window, key_grad, strategy, chunk, *, out_shape=None, **kwargs) -> int:
    return vq_attention_flops(q_shape, v_shape, codebook_shape, bias_shape is not None, causal,
                              window, key_grad, chunk)


@register_flop_formula(torch.ops.longvq.vq_attention_bwd)
def _(grad_out_shape, q_shape, k_shape, v_shape, codebook_shape, codes_shape, bias_shape,
      out_shape_in, lse_shape, u_shape, cnt_shape, heads, attn_fn, causal, window, key_grad,
      strategy, chunk, *, out_shape=None, **kwargs) -> int:
    # the band twice (dq; dk, dv) with the scores recomputed, the code part twice (dq; the
    # gradient sums): about 2.5 forwards (key_grad="ste" adds the far keys, not counted)
    return 5 * vq_attention_flops(q_shape, v_shape, codebook_shape, bias_shape is not None,
                                  causal, window, key_grad, chunk) // 2


def kernel_dtype(q: Tensor, k_hat: Tensor, v: Tensor) -> torch.dtype:
    """The dtype the kernels read: the promoted input dtype (float32, bfloat16 or float16)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k_hat.dtype), v.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"impl='triton' supports float32, bfloat16 and float16 inputs, "
                         f"got {dtype}; use impl='linear'")
    return dtype


def vq_attention_triton(
    q: Tensor,
    k_hat: Tensor,
    v: Tensor,
    codebook: Tensor,
    codes: Tensor,
    bias: Tensor | None,
    *,
    attn_fn: str,
    causal: bool,
    window: int,
    key_grad: str = "ste",
    key_grad_strategy: str = "auto",
    chunk: int | None = None,
) -> Tensor:
    """Same contract as ``vq_attention_linear`` (shapes, dtypes, gradients to q, k_hat, v and
    bias; none to codebook and codes), on CUDA tensors (CPU only under TRITON_INTERPRET=1).
    Under autocast q, k_hat and v are cast to the autocast dtype and so is the output.
    key_grad_strategy for key_grad="ste": "dense" (Triton, every pair, in the dk/dv kernel),
    "split" (Triton, every pair; the far query rows in a second kernel spread over many
    programs), "codes" (torch per-code states for the far keys) or "auto" ("split" up to L =
    DENSE_MAX_LEN, then "codes"). chunk: query chunk size CH, a multiple of ``window`` (any
    size when W = 0; default ``default_chunk(window)``)."""
    check_inputs(q, k_hat, v, codebook, codes, bias, attn_fn, window, key_grad)
    # W = 0 (no bias, key_grad="ste") is the same function at any W: at W = 1 a causal chunk's
    # band holds one key before the chunk, and bidirectional reads every key through codes
    window = window or 1
    check_choice("key_grad_strategy", key_grad_strategy, TRITON_KEY_GRAD_STRATEGIES)
    if not q.is_cuda and not interpreting():
        raise ValueError(f"impl='triton' needs CUDA tensors (got {q.device}); use impl='linear'")
    # as SDPA under autocast: the kernels read the autocast dtype. In the models q and k come
    # from a float32 affine map (Mega's scale/offset), so without this the kernels ran float32
    # (3xTF32 dots, twice the bytes) inside a bf16 training step (the models cast already:
    # ``kernel_inputs``; then this is a no-op)
    q, k_hat, v = to_autocast_dtype(q, k_hat, v)
    kernel_dtype(q, k_hat, v)
    chunk = default_chunk(window) if chunk is None else chunk
    if not isinstance(chunk, int) or chunk < window or chunk % window:
        raise ValueError(f"chunk={chunk!r} must be a positive multiple of window={window}")
    strategy = key_grad_strategy
    if strategy == "auto":
        strategy = "split" if q.shape[2] <= DENSE_MAX_LEN else "codes"
    dtype = kernel_dtype(q, k_hat, v)
    batch, heads = q.shape[:2]
    qc, kc, vc = (x.to(dtype).reshape(batch * heads, *x.shape[2:]).contiguous()
                  for x in (q, k_hat, v))
    args = (qc, kc, vc, codebook.to(dtype).contiguous(),
            codes.to(torch.int32).reshape(batch * heads, -1).contiguous(),
            None if bias is None else bias.float().contiguous(), heads, attn_fn, causal, window,
            key_grad, strategy, chunk)
    # traced by torch.compile: the custom ops (one graph); eager: the cheaper Function
    out = _fwd_op(*args)[0] if torch.compiler.is_compiling() else _EagerVQAttention.apply(*args)
    return out.view(batch, heads, *out.shape[1:]).to(q.dtype)
