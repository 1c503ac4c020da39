"""Linear-time VQ attention: codes for the far keys, exact attention near the diagonal.

Same function as ``naive.vq_attention_naive`` (see there for logit_ij, s_i, phi), computed in
O(L (S + W) D) time without any L x L tensor. k_hat_j = c_{s_j} takes S values, so over any set
of keys without bias, sum_j phi(s_i q_i . k_hat_j) v_j = sum_s phi(s_i q_i . c_s) U_s with the
per-code value sums U_s = sum_{j: s_j = s} v_j (and counts n_s for v -> 1).

Positions are cut into blocks of W (L padded up to N*W). Query block n reads
  - key blocks n-1, n (and n+1 when bidirectional) exactly, bias where |i - j| < W (``_local``);
  - every other key block through its codes: blocks <= n - 2 (causal, the Transformer-VQ cache,
    an exclusive cumsum of per-block U and n), and also >= n + 2 (bidirectional, a suffix sum).
Bidirectional without bias needs no local part: the codes cover every key. (MODELS.md writes the
bidirectional case as codes over all keys plus a window correction phi(z + b) - phi(z); that
identity is the same, but its subtraction cancels catastrophically when a strongly negative bias
covers most of a row, e.g. NaN at b = -20 in float32, so every term here stays positive.)
W = 0, no local part (no bias, key_grad="ste"): without a bias the function does not depend on
the block size, so it runs with blocks of ``NO_WINDOW_BLOCK``.
Softmax divides by the same sums with v -> 1, stabilised by a per-query max over the code part
(log-weights s_i q_i . c_s + log n_s, -inf for absent codes) and the local logits; lse is saved.

Gradients (key_grad="ste", default) are straight-through (K_hat = STVQ(K; C)): the backward
returns dL/dk_hat_j for EVERY key, exactly what autograd gives on the naive path, and None for
codebook and codes (the codebook is trained by EMA k-means, not by this loss). With g_ij =
dL/dlogit_ij = P'_ij (dO_i . v_j - delta_i) (softmax: P' = P = exp(logit - lse), delta_i = dO_i .
O_i; laplace: P = phi, P' = phi', no delta) and w_is the code-part P' of code s for query i, the
code part is

  dq_i = s_i sum_s w_is (dO_i . U_s - delta_i n_s) c_s
  dk_j = sum_{i reads j through codes} s_i w_{i, s_j} (dO_i . v_j - delta_i) q_i   (``_key_grad``:
         per-code D x Dv states, O(L S D Dv), or dense tiles, O(L^2 (D + Dv)) and no L x L
         tensor, whichever is cheaper at this L: dense below L ~ 10-30K)
  dv_j = sum_i P_{i, s_j} dO_i

with U, n summed over the keys query i reads through codes, and the dv sums over the queries that
read key j through its code (the adjoint: suffix/prefix sums over blocks). The local part is
differentiated exactly on its small dense recomputation (``_local.local_grads``); the bias
gradient comes from it alone.

key_grad="window" (Transformer-VQ's semantics: its aggregated cache scores queries against the
codebook, so cached keys get no gradient): keys get gradient only from the queries of their exact
local region -- query block n, key blocks n-1, n (and n+1 when bidirectional) -- and far queries
see sg(K_hat). The code-part dk above is dropped; bidirectional without bias then still computes
the local blocks exactly (mode "far" with zero bias), so that region is the same in every case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._common import (
    check_choice,
    check_inputs,
    compute_dtype,
    laplace,
    laplace_grad,
    logit_scale,
    no_autocast,
)
from ._key_grad import KEY_GRAD_STRATEGIES, code_key_grad
from ._local import (
    Blocks,
    LocalMasks,
    local_apply,
    local_grads,
    local_logits,
    local_masks,
    local_max,
    local_weights,
    to_blocks,
)

# W = 0 runs with blocks of this size (the causal cache's blocks; LongVQ's default window)
NO_WINDOW_BLOCK = 64


@dataclass
class _Problem:
    """Inputs in the compute dtype, padded to N*W positions, plus layout helpers."""

    q: Tensor  # (B, H, P, D)
    k: Tensor  # (B, H, P, D)
    v: Tensor  # (B, H, P, Dv)
    codebook: Tensor  # (H, S, D)
    one_hot: Tensor  # (B, H, P, S), zero rows at padded keys
    codes: Tensor  # (B, H, P) int64, 0 at padded keys
    bias: Tensor | None  # (2W - 1,)
    scale: Tensor  # (P,), s_i
    in_range: Tensor  # (P,) bool, position < L
    attn_fn: str
    key_grad: str  # "ste" | "window"
    blocks: Blocks
    masks: LocalMasks

    @property
    def mode(self) -> str:
        """Which keys the codes cover: "past" (causal: key blocks <= n - 2), "far" (bidirectional
        with bias, or key_grad="window": blocks <= n - 2 and >= n + 2), "all" (otherwise)."""
        if self.blocks.causal:
            return "past"
        return "far" if self.bias is not None or self.key_grad == "window" else "all"

    @property
    def has_local(self) -> bool:
        return self.mode != "all"

    def code_groups(self, x: Tensor) -> Tensor:
        """(B, H, P, E) -> (B, H, G, T, E), or (P,) -> (G, T, 1): the query/key groups of the
        code part, G = N blocks of T = W, or one group of all P positions (mode "all")."""
        groups = 1 if self.mode == "all" else self.blocks.count
        if x.dim() == 1:
            return x.reshape(groups, -1, 1)
        return x.reshape(*x.shape[:2], groups, x.shape[2] // groups, x.shape[-1])


def _prepare(q, k_hat, v, codebook, codes, bias, attn_fn, key_grad, causal, window) -> _Problem:
    dtype = compute_dtype(q)
    length, dim = q.shape[-2], q.shape[-1]
    blocks = Blocks(length, window, -(-length // window), causal)
    pad = blocks.padded - length

    def padded(x: Tensor) -> Tensor:
        return F.pad(x.to(dtype), (0, 0, 0, pad))

    size = codebook.shape[1]
    codes = F.pad(codes, (0, pad))
    one_hot = F.one_hot(codes, size).to(dtype)
    in_range = torch.arange(blocks.padded, device=q.device) < length
    one_hot = one_hot * in_range[:, None]
    return _Problem(
        q=padded(q),
        k=padded(k_hat),
        v=padded(v),
        codebook=codebook.to(dtype).expand(q.shape[1], -1, -1),
        one_hot=one_hot,
        codes=codes,
        bias=None if bias is None else bias.to(dtype),
        scale=logit_scale(attn_fn, causal, length, blocks.padded, dim, dtype, q.device),
        in_range=in_range,
        attn_fn=attn_fn,
        key_grad=key_grad,
        blocks=blocks,
        masks=local_masks(blocks, q.device),
    )


def _shift_groups(x: Tensor, shift: int) -> Tensor:
    """out[:, :, g] = x[:, :, g - shift], zero-filled."""
    groups = x.shape[2]
    if abs(shift) >= groups:
        return torch.zeros_like(x)
    zero = torch.zeros_like(x[:, :, : abs(shift)])
    if shift > 0:
        return torch.cat([zero, x[:, :, : groups - shift]], dim=2)
    return torch.cat([x[:, :, -shift:], zero], dim=2)


def _cumsum_groups(x: Tensor, reverse: bool = False) -> Tensor:
    """Inclusive prefix (reverse: suffix) sums over dim 2. On CPU, torch.cumsum over a middle dim
    (and flip) is several times slower than adding the group slices in place (``add_``: ``x[g] +=``
    would also copy each slice back)."""
    if x.device.type != "cpu":
        return x.flip(2).cumsum(2).flip(2) if reverse else x.cumsum(2)
    out = x.clone()
    groups = out.shape[2]
    for g in range(groups - 2, -1, -1) if reverse else range(1, groups):
        out[:, :, g].add_(out[:, :, g + 1 if reverse else g - 1])
    return out


def _read_cache(per_group: Tensor, mode: str) -> Tensor:
    """Sums over the key groups that each query group reads through codes (see ``mode``)."""
    if mode == "all":
        return per_group
    before = _shift_groups(_cumsum_groups(per_group), 2)  # groups <= n - 2
    if mode == "past":
        return before
    return before + _shift_groups(_cumsum_groups(per_group, reverse=True), -2)  # and >= n + 2


def _write_cache(per_group: Tensor, mode: str) -> Tensor:
    """Adjoint of ``_read_cache``: sums over the query groups that read each key group."""
    if mode == "far":  # symmetric
        return _read_cache(per_group, mode)
    if mode == "all":
        return per_group
    return _shift_groups(_cumsum_groups(per_group, reverse=True), -2)


def _code_part(p: _Problem) -> tuple[Tensor, Tensor, Tensor]:
    """Code logits (B, H, G, T, S) and the code sums U (B, H, G, S, Dv), n (B, H, G, S) read."""
    one_hot = p.code_groups(p.one_hot)
    sums = _read_cache(torch.einsum("bhgts,bhgte->bhgse", one_hot, p.code_groups(p.v)), p.mode)
    counts = _read_cache(one_hot.sum(dim=3), p.mode)
    logits = torch.einsum("bhld,hsd->bhls", p.q, p.codebook) * p.scale[:, None]
    return p.code_groups(logits), sums, counts


def _forward(p: _Problem) -> tuple[Tensor, Tensor | None]:
    """Output (B, H, P, Dv) and, for softmax, lse (B, H, P)."""
    batch, heads, padded, _ = p.q.shape
    blocks, masks = p.blocks, p.masks
    code_logits, sums, counts = _code_part(p)
    present = (counts > 0).unsqueeze(3)
    if p.has_local:
        scale_blocks = p.scale.view(blocks.count, blocks.window)
        q_blocks, k_blocks = to_blocks(p.q, blocks), to_blocks(p.k, blocks)
        logits = local_logits(q_blocks, k_blocks, p.bias, scale_blocks, blocks.causal, masks)

    def per_query(x: Tensor) -> Tensor:  # (B, H, G, T, ...) or (B, H, N, W, ...) -> (B, H, P, ...)
        return x.reshape(batch, heads, padded, *x.shape[4:])

    if p.attn_fn == "laplace":
        out = per_query(torch.einsum("bhgts,bhgse->bhgte", laplace(code_logits), sums))
        if p.has_local:
            weights = local_weights(logits, None, "laplace", masks)
            out = out + per_query(local_apply(weights, to_blocks(p.v, blocks), blocks.causal))
        return out, None

    log_weights = torch.where(present, code_logits + counts.log().unsqueeze(3), float("-inf"))
    row_max = per_query(log_weights.amax(dim=-1))
    if p.has_local:
        row_max = torch.maximum(row_max, per_query(local_max(logits, masks)))
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    code_weights = torch.exp(
        torch.where(present, code_logits, float("-inf")) - p.code_groups(row_max[..., None])
    )
    num = per_query(torch.einsum("bhgts,bhgse->bhgte", code_weights, sums))
    den = per_query(torch.einsum("bhgts,bhgs->bhgt", code_weights, counts))
    if p.has_local:
        ref = row_max.view(batch, heads, blocks.count, blocks.window)
        weights = local_weights(logits, ref, "softmax", masks)
        num = num + per_query(local_apply(weights, to_blocks(p.v, blocks), blocks.causal))
        den = den + per_query(weights.sum(dim=-1))
    den = torch.where(p.in_range, den, 1.0)
    return num / den[..., None], row_max + den.log()


def _backward(p: _Problem, out: Tensor, lse: Tensor | None, grad_out: Tensor, strategy: str):
    """dq, dk_hat, dv (B, H, P, .) and dbias, all in the compute dtype."""
    code_logits, sums, counts = _code_part(p)
    present = (counts > 0).unsqueeze(3)
    valid = p.code_groups(p.in_range)
    mode = p.mode
    if p.attn_fn == "softmax":
        delta = (grad_out * out).sum(dim=-1)  # (B, H, P)
        shifted = torch.where(present, code_logits, float("-inf")) - p.code_groups(lse[..., None])
        weights = torch.where(valid, torch.exp(shifted), 0.0)
        weights_grad = weights
    else:
        delta = None
        weights = torch.where(valid, laplace(code_logits), 0.0)
        weights_grad = torch.where(valid, laplace_grad(code_logits), 0.0)

    do_g = p.code_groups(grad_out)
    one_hot = p.code_groups(p.one_hot)
    scale_g = p.code_groups(p.scale)
    # dq_i = s_i sum_s w_is (dO_i . U_s - delta_i n_s) c_s
    coeff = torch.einsum("bhgte,bhgse->bhgts", do_g, sums)
    if delta is not None:
        coeff = coeff - p.code_groups(delta[..., None]) * counts.unsqueeze(3)
    dq = torch.einsum("bhgts,hsd->bhgtd", weights_grad * coeff, p.codebook) * scale_g
    # dv_j = sum_i P_{i, s_j} dO_i
    value_grad = _write_cache(torch.einsum("bhgts,bhgte->bhgse", weights, do_g), mode)
    dv = torch.einsum("bhgts,bhgse->bhgte", one_hot, value_grad)
    dq, dv = dq.flatten(2, 3), dv.flatten(2, 3)
    # dk_j = sum_{i reads j through codes} s_i w_{i, s_j} (dO_i . v_j - delta_i) q_i; the
    # present mask (zero weight on codes a query reads nowhere) only matters for laplace
    if p.key_grad == "ste":
        weights_scaled = torch.where(present, weights_grad * scale_g, 0.0).flatten(2, 3)
        do_ext, v_ext = grad_out, p.v
        if delta is not None:  # fold -delta_i into dO_i . v_j: dO' = [dO, -delta], v' = [v, 1]
            do_ext = torch.cat([grad_out, -delta[..., None]], dim=-1)
            v_ext = torch.cat([p.v, torch.ones_like(p.v[..., :1])], dim=-1)
        dk = code_key_grad(
            weights_scaled, p.q, do_ext, v_ext, p.codes, mode, p.blocks, strategy
        )
    else:  # "window": far queries see sg(K_hat)
        dk = torch.zeros_like(p.q)

    dbias = None
    if p.has_local:
        local = local_grads(
            p.q, p.k, p.v, p.bias, p.scale, grad_out, delta, lse, p.attn_fn, p.blocks, p.masks
        )
        dq, dk, dv = dq + local[0], dk + local[1], dv + local[2]
        dbias = local[3]
    return dq, dk, dv, dbias


class _VQAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_hat, v, codebook, codes, bias, options):
        attn_fn, key_grad, causal, window, strategy = options
        with no_autocast(q):
            p = _prepare(q, k_hat, v, codebook, codes, bias, attn_fn, key_grad, causal, window)
            out, lse = _forward(p)
        out = out[:, :, : q.shape[2]]
        ctx.save_for_backward(q, k_hat, v, codebook, codes, bias, out, lse)
        ctx.options = options
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k_hat, v, codebook, codes, bias, out, lse = ctx.saved_tensors
        with no_autocast(q):
            p = _prepare(q, k_hat, v, codebook, codes, bias, *ctx.options[:4])
            length = q.shape[2]
            pad = p.blocks.padded - length
            grad_out = F.pad(grad_out.to(p.q.dtype), (0, 0, 0, pad))
            out = F.pad(out, (0, 0, 0, pad))
            dq, dk, dv, dbias = _backward(p, out, lse, grad_out, ctx.options[4])
        dq, dk, dv = (
            x[:, :, :length].to(ref.dtype)
            for x, ref in zip((dq, dk, dv), (q, k_hat, v), strict=True)
        )
        if dbias is not None:
            dbias = dbias.to(bias.dtype)
        return dq, dk, dv, None, None, dbias, None


def vq_attention_linear(
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
) -> Tensor:
    """q, k_hat: (B, H, L, D) with k_hat == codebook[h, codes] in value; v: (B, H, L, Dv);
    codebook: (H or 1, S, D); codes: (B, H, L) int64; bias: (2W-1,) or None. Returns (B, H, L, Dv)
    in q's dtype. Gradients flow to q, k_hat (key_grad="ste": straight-through, every key;
    "window": only from the exact local blocks), v and bias. key_grad_strategy picks how the far
    keys' gradient is computed ("codes" | "dense" | "auto": the cheaper, see ``_key_grad``); all
    give the same values."""
    check_inputs(q, k_hat, v, codebook, codes, bias, attn_fn, window, key_grad)
    check_choice("key_grad_strategy", key_grad_strategy, KEY_GRAD_STRATEGIES)
    options = (attn_fn, key_grad, causal, window or NO_WINDOW_BLOCK, key_grad_strategy)
    return _VQAttention.apply(q, k_hat, v, codebook, codes, bias, options)
