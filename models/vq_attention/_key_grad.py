"""Code-part key gradient of the linear path (straight-through): two exact strategies.

Let w_is = s_i P'_is be the code-part weight derivative of query i on code s (softmax:
P' = P = exp(s_i q_i . c_s - lse_i); laplace: P' = phi'(s_i q_i . c_s)), zero at padded queries
and where query i reads no key of code s through codes. The code part of dL/dk_hat_j is

    dk_j = sum_{i in R(j)} w_{i, s_j} (dO_i . v_j - delta_i) q_i
         = sum_{i in R(j)} w_{i, s_j} (dO'_i . v'_j) q_i

with R(j) the queries that read key j through its code (key block m: query blocks n >= m + 2 in
mode "past", |n - m| >= 2 in mode "far", every query in mode "all"), and dO' = [dO, -delta],
v' = [v, 1] folding softmax's delta term into the same products (laplace: dO' = dO, v' = v). Let
E = Dv' = Dv (+ 1). Two strategies compute it exactly:

  "codes"  per-code D x E states M_s = sum_{i in R} w_is q_i dO'_i^T, applied per key as
           dk_j = M_{s_j} v'_j (a gather of M_{s_j} and a matrix-vector product). "all": one total
           state. "far": the total state minus the near blocks |n - m| <= 1, whose terms are
           recomputed densely per block (``near_correction``). "past": a reverse scan over chunks
           of about CODES_CHUNK positions carrying ONE state, that of the queries after the chunk
           (never a state per block); the readers inside the chunk are a dense tile, as in chunked
           linear attention. Cost ~ P (S + c') D E (+ 3 P W (D + E + c) for "far", + P C/2
           (D + E + c) for "past").
  "dense"  (query tile x key tile) products over the tiles that hold pairs of R: g_ij = w_{i, s_j}
           (a gather), A = g * (dO'_I v'_J^T) masked to R, dk_J += A^T q_I. No L x L tensor: a
           tile holds at most TILE_ELEMS elements. Cost ~ pairs (D + E + c), pairs = the (i, j) of
           the computed tiles (about P^2 bidirectional, P^2 / 2 causal).

"auto" takes the one with the smaller cost estimate (``choose_strategy``; c = DENSE_OVERHEAD,
c' = CODES_OVERHEAD, in multiply-add units, fitted on CPU): dense while, roughly,

    f P (D + E + c) < (S + c') D E,    f = pairs / P^2 (1 bidirectional, ~0.55 causal),

i.e. up to L ~ 12K (bidirectional) / ~23K (causal) for S = 256, D = 64, Dv = 128, and up to
~16K / ~30K for LongVQ's S = 256, D = 64, Dv = 256.

Why "far" may subtract (the forward may not): the subtracted near terms are exactly terms of the
total, each bounded (0 <= w_is <= s_i for softmax, < 1.5 s_i for laplace), nothing is divided or
logged afterwards, so the result carries an absolute error of about eps times the sum of |terms| --
the error of the direct sum, up to the 3W near queries per key. The forward's subtraction instead
took the log of a denominator that can cancel to ~0 (bias -20, NaN in float32).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ._local import Blocks, block_context, block_context_adjoint, to_blocks

KEY_GRAD_STRATEGIES = ("auto", "codes", "dense")

# Memory bounds, in elements (x4 bytes in float32): the per-chunk states (and the q dO'^T outer
# products feeding them), and one dense (B, H, query tile, key tile) tensor.
STATE_ELEMS = 2**26
TILE_ELEMS = 2**22
# Positions per chunk of the "past" scan (rounded to whole blocks): large enough for an efficient
# state matmul (its inner dimension), small enough that the in-chunk dense tile stays cheap.
CODES_CHUNK = 512
# Memory-bound work in multiply-add units (fitted on CPU, where both strategies' matmuls run near
# peak; a float moved costs ~40-60 multiply-adds on an H100 too): per dense pair, the gather of w
# and the elementwise product; per key and state element (E*D), the outer product, the gather of
# M_{s_j} and the matrix-vector product.
DENSE_OVERHEAD = 24
CODES_OVERHEAD = 64


def code_key_grad(
    weights: Tensor,
    q: Tensor,
    grad_out: Tensor,
    v: Tensor,
    codes: Tensor,
    mode: str,
    blocks: Blocks,
    strategy: str = "auto",
) -> Tensor:
    """dk_j (module docstring) for every padded position, (B, H, P, D).

    weights: w (B, H, P, S); q (B, H, P, D); grad_out: dO' (B, H, P, E); v: v' (B, H, P, E);
    codes (B, H, P) int64 (any value at padded keys: their rows are dropped by the caller).
    """
    if strategy == "auto":
        strategy = choose_strategy(mode, blocks, *weights.shape[:2], weights.shape[-1],
                                   q.shape[-1], v.shape[-1])
    if strategy == "dense":
        return _dense(weights, q, grad_out, v, codes, mode, blocks)
    if mode == "past":
        return _past_codes(weights, q, grad_out, v, codes, blocks)
    dk = _apply_total(_total_state(weights, q, grad_out), v, codes)
    if mode == "far":
        dk = dk - near_correction(weights, q, grad_out, v, codes, blocks)
    return dk


def choose_strategy(
    mode: str, blocks: Blocks, batch: int, heads: int, size: int, dim: int, value_dim: int
) -> str:
    """"dense" or "codes", whichever has the smaller cost estimate (multiply-adds per (b, h))."""
    padded, dense_pair = blocks.padded, dim + value_dim + DENSE_OVERHEAD
    codes = padded * (size + CODES_OVERHEAD) * dim * value_dim
    if mode == "far":
        codes += 3 * padded * blocks.window * dense_pair
    elif mode == "past":
        codes += padded * _past_chunk(blocks, batch * heads, dim * value_dim) // 2 * dense_pair
    pairs = sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1, _ in _tiles(mode, blocks, batch * heads))
    return "dense" if pairs * dense_pair < codes else "codes"


# ---------------------------------------------------------------------------- "codes" strategy


def _states(weights: Tensor, q: Tensor, grad_out: Tensor) -> Tensor:
    """M_s = sum_i w_is q_i dO'_i^T over the rows, (B, H, S, E*D): the outer products
    (B, H, rows, E*D) are smaller than a scatter of dO' into S slots while rows < S, and the
    matmul's output is contiguous in (E, D) for the gathers of ``_apply``."""
    outer = (grad_out.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2)
    return weights.transpose(-1, -2).contiguous() @ outer  # a strided left operand is ~1.5x slower


def _apply(states: Tensor, v: Tensor, codes: Tensor) -> Tensor:
    """M_{s_j} v'_j per key: states (B, H, S, E*D) picked at codes (B, H, rows), (B, H, rows, D).
    index_select on the flattened states (row per (b, h, s)) is faster than an expanded gather."""
    batch, heads, size = states.shape[:3]
    offset = torch.arange(batch * heads, device=codes.device).view(batch, heads, 1) * size
    flat = states.reshape(batch * heads * size, states.shape[-1])
    picked = flat.index_select(0, (codes + offset).flatten())
    picked = picked.view(*codes.shape, v.shape[-1], -1)  # (B, H, rows, E, D)
    return (v.unsqueeze(-2) @ picked).squeeze(-2)


def _rows_per_chunk(x: Tensor, per_row: int) -> int:
    """Rows of (B, H, rows, per_row) intermediates: CODES_CHUNK (streams through the caches
    better than larger chunks), fewer if STATE_ELEMS requires."""
    return max(1, min(CODES_CHUNK, STATE_ELEMS // (x.shape[0] * x.shape[1] * per_row)))


def _total_state(weights: Tensor, q: Tensor, grad_out: Tensor) -> Tensor:
    """Sum of the states over all queries, (B, H, S, E*D), over row chunks (bounded outers)."""
    rows = _rows_per_chunk(q, q.shape[-1] * grad_out.shape[-1])
    total = None
    for start in range(0, q.shape[2], rows):
        span = slice(start, start + rows)
        part = _states(weights[:, :, span], q[:, :, span], grad_out[:, :, span])
        total = part if total is None else total.add_(part)
    return total


def _apply_total(total: Tensor, v: Tensor, codes: Tensor) -> Tensor:
    rows = _rows_per_chunk(v, total.shape[-1])
    parts = [_apply(total, v[:, :, s:s + rows], codes[:, :, s:s + rows])
             for s in range(0, v.shape[2], rows)]
    return torch.cat(parts, dim=2)


def _past_chunk(blocks: Blocks, batch_heads: int, state_row: int) -> int:
    """Positions per chunk of the "past" scan: whole blocks near CODES_CHUNK, within the memory
    bounds of its outer products / gathered states (rows x E*D) and its dense tile."""
    w = blocks.window
    limit = min(STATE_ELEMS // (batch_heads * state_row), math.isqrt(TILE_ELEMS // batch_heads))
    return max(w, min(-(-CODES_CHUNK // w) * w, limit // w * w, blocks.padded))


def _past_codes(
    weights: Tensor, q: Tensor, grad_out: Tensor, v: Tensor, codes: Tensor, blocks: Blocks
) -> Tensor:
    """Mode "past": key block m is read by query blocks n >= m + 2. Reverse scan over chunks of key
    blocks [a, b): the readers n >= b + 1 (of every key in the chunk) through ``carry``, their
    state sum; the readers n in [a + 2, b + 1) through a dense tile masked to n >= m + 2. Then the
    query blocks [a + 1, b + 1) join the carry."""
    w, count = blocks.window, blocks.count
    chunk = _past_chunk(blocks, q.shape[0] * q.shape[1], q.shape[-1] * grad_out.shape[-1]) // w
    dk = torch.zeros_like(q)
    carry = None
    stop = count
    while stop > 0:
        start = max(0, stop - chunk)
        keys = slice(start * w, stop * w)
        if carry is not None:
            dk[:, :, keys] = _apply(carry, v[:, :, keys], codes[:, :, keys])
        lo, hi = (start + 2) * w, min(count, stop + 1) * w
        if hi > lo:
            tile = (lo, hi, keys.start, keys.stop, True)
            dk[:, :, keys].add_(_dense_tile(weights, q, grad_out, v, codes, tile, "past", w))
        joining = slice((start + 1) * w, min(count, stop + 1) * w)
        if joining.stop > joining.start:
            part = _states(weights[:, :, joining], q[:, :, joining], grad_out[:, :, joining])
            carry = part if carry is None else carry.add_(part)
        stop = start
    return dk


def near_correction(
    weights: Tensor, q: Tensor, grad_out: Tensor, v: Tensor, codes: Tensor, blocks: Blocks
) -> Tensor:
    """sum over queries of blocks n with |n - m| <= 1 of w_{i, s_j} (dO'_i . v'_j) q_i, for each
    key j of block m, (B, H, P, D): per query block n against key blocks n-1, n, n+1 (the local
    layout, (B, H, N, W, 3W)), then each key's three contributions summed back."""
    wb, qb, dob = (to_blocks(x, blocks) for x in (weights, q, grad_out))
    v_ctx = block_context(to_blocks(v, blocks), causal=False)  # zero rows past the ends
    codes_ctx = block_context(to_blocks(codes.unsqueeze(-1), blocks), causal=False).squeeze(-1)
    index = codes_ctx.unsqueeze(3).expand(*wb.shape[:4], codes_ctx.shape[-1])
    pair = wb.gather(-1, index).mul_(dob @ v_ctx.transpose(-1, -2))  # (B, H, N, W, 3W)
    per_context = pair.transpose(-1, -2) @ qb  # (B, H, N, 3W, D)
    return block_context_adjoint(per_context, causal=False).flatten(2, 3)


# ---------------------------------------------------------------------------- "dense" strategy


def _tile_side(blocks: Blocks, batch_heads: int) -> int:
    """Square tiles of a multiple of W positions, B*H*side^2 <= TILE_ELEMS where possible."""
    side = math.isqrt(max(1, TILE_ELEMS // batch_heads)) // blocks.window * blocks.window
    return min(blocks.padded, max(blocks.window, side))


def _tiles(mode: str, blocks: Blocks, batch_heads: int) -> Iterator[tuple[int, int, int, int,
                                                                          bool]]:
    """(i0, i1, j0, j1, partial): query x key tiles holding pairs of R; partial when some of
    their pairs are not in R (mask needed)."""
    padded, w = blocks.padded, blocks.window
    side = _tile_side(blocks, batch_heads)
    for j0 in range(0, padded, side):
        j1 = min(padded, j0 + side)
        kb0, kb1 = j0 // w, (j1 - 1) // w
        for i0 in range(0, padded, side):
            i1 = min(padded, i0 + side)
            qb0, qb1 = i0 // w, (i1 - 1) // w
            if mode == "all":
                yield i0, i1, j0, j1, False
                continue
            later, earlier = qb1 - kb0 >= 2, kb1 - qb0 >= 2  # some pair with n >= m+2 / n <= m-2
            if mode == "past" and later:
                yield i0, i1, j0, j1, qb0 - kb1 < 2
            elif mode == "far" and (later or earlier):
                yield i0, i1, j0, j1, qb0 - kb1 < 2 and kb0 - qb1 < 2


def _dense_tile(
    weights: Tensor,
    q: Tensor,
    grad_out: Tensor,
    v: Tensor,
    codes: Tensor,
    tile: tuple[int, int, int, int, bool],
    mode: str,
    window: int,
) -> Tensor:
    """sum over the tile's queries i in R(j) of w_{i, s_j} (dO'_i . v'_j) q_i, (B, H, keys, D).
    Tiles start at block boundaries; near pairs are zeroed by block slices (no (i, j) mask)."""
    i0, i1, j0, j1, partial = tile
    batch, heads = weights.shape[:2]
    index = codes[:, :, None, j0:j1].expand(batch, heads, i1 - i0, j1 - j0)
    pair = weights[:, :, i0:i1].gather(-1, index)  # w_{i, s_j}
    pair.mul_(grad_out[:, :, i0:i1] @ v[:, :, j0:j1].transpose(-1, -2))
    if partial:  # per query block n: key blocks m >= n - 1 (past) or n-1..n+1 (far) are not in R
        for n in range(i0 // window, -(-i1 // window)):
            rows = slice(n * window - i0, (n + 1) * window - i0)
            lo = max(j0, (n - 1) * window) - j0
            hi = j1 - j0 if mode == "past" else min(j1, (n + 2) * window) - j0
            if hi > lo:
                pair[:, :, rows, lo:hi] = 0.0
    return pair.transpose(-1, -2) @ q[:, :, i0:i1]


def _dense(
    weights: Tensor,
    q: Tensor,
    grad_out: Tensor,
    v: Tensor,
    codes: Tensor,
    mode: str,
    blocks: Blocks,
) -> Tensor:
    dk = torch.zeros_like(q)
    for tile in _tiles(mode, blocks, q.shape[0] * q.shape[1]):
        keys = slice(tile[2], tile[3])
        tile_dk = _dense_tile(weights, q, grad_out, v, codes, tile, mode, blocks.window)
        dk[:, :, keys].add_(tile_dk)  # in place (x[i] += y would copy the slice back)
    return dk
