"""The exact local part of the linear path, computed on blocks of W positions.

Query block n (positions nW .. nW + W - 1) sees key blocks n-1, n (causal, kW = 2W) or n-1, n, n+1
(bidirectional, kW = 3W); every tensor here is (B, H, N, W, kW), never L x L.

Exact attention over those blocks (causal: j <= i), bias where |i - j| < W; the codes cover all
other key blocks (<= n - 2, and >= n + 2 when bidirectional). Every |i - j| < W lies in them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import laplace


@dataclass(frozen=True)
class Blocks:
    length: int  # true L
    window: int  # W, the block size
    count: int  # N = ceil(L / W)
    causal: bool

    @property
    def padded(self) -> int:
        return self.count * self.window

    @property
    def context(self) -> int:
        return (2 if self.causal else 3) * self.window


@dataclass(frozen=True)
class LocalMasks:
    pair: Tensor  # (N, W, kW) bool: the (i, j) pairs this part sums over
    in_window: Tensor  # (W, kW) bool: |i - j| < W
    bias_index: Tensor  # (W, kW) long: (i - j) + W - 1, clamped


def local_masks(blocks: Blocks, device: torch.device) -> LocalMasks:
    w, n = blocks.window, blocks.count
    a = torch.arange(w, device=device)[:, None]  # query offset inside its block
    c = torch.arange(blocks.context, device=device)[None, :]  # key offset from block n-1's start
    offset = w + a - c  # i - j, the same for every block
    in_window = offset.abs() < w
    key = (torch.arange(n, device=device)[:, None, None] - 1) * w + c  # absolute j, (N, 1, kW)
    valid = (key >= 0) & (key < blocks.length)
    pair = valid & (offset >= 0) if blocks.causal else valid
    bias_index = (offset + w - 1).clamp(0, 2 * w - 2)
    return LocalMasks(pair, in_window, bias_index)


def to_blocks(x: Tensor, blocks: Blocks) -> Tensor:
    """(B, H, N*W, E) -> (B, H, N, W, E)."""
    return x.reshape(*x.shape[:2], blocks.count, blocks.window, x.shape[-1])


def block_context(x: Tensor, causal: bool) -> Tensor:
    """(B, H, N, W, E) -> (B, H, N, kW, E): blocks n-1, n (and n+1), zero past the ends."""
    zero = torch.zeros_like(x[:, :, :1])
    parts = [torch.cat([zero, x[:, :, :-1]], dim=2), x]
    if not causal:
        parts.append(torch.cat([x[:, :, 1:], zero], dim=2))
    return torch.cat(parts, dim=3)


def block_context_adjoint(x: Tensor, causal: bool) -> Tensor:
    """Adjoint of ``block_context``: (B, H, N, kW, E) -> (B, H, N, W, E), each block's slots in
    the contexts of blocks n+1 (as "n-1"), n (and n-1, as "n+1") summed."""
    w = x.shape[3] // (2 if causal else 3)
    out = x[:, :, :, w : 2 * w].clone()
    out[:, :, :-1].add_(x[:, :, 1:, :w])
    if not causal:
        out[:, :, 1:].add_(x[:, :, :-1, 2 * w :])
    return out


def local_logits(
    q_blocks: Tensor,
    k_blocks: Tensor,
    bias: Tensor | None,
    scale_blocks: Tensor,
    causal: bool,
    masks: LocalMasks,
) -> Tensor:
    """s_i q_i . k_j + B_ij, (B, H, N, W, kW)."""
    k_ctx = block_context(k_blocks, causal)
    logits = torch.einsum("bhnad,bhncd->bhnac", q_blocks, k_ctx) * scale_blocks[..., None]
    if bias is None:
        return logits
    return logits + torch.where(masks.in_window, bias[masks.bias_index], 0.0)


def local_max(logits: Tensor, masks: LocalMasks) -> Tensor:
    """Per-query max of the logits over the pairs, (B, H, N, W); -inf where none."""
    return torch.where(masks.pair, logits, float("-inf")).amax(dim=-1)


def local_weights(logits: Tensor, ref: Tensor | None, attn_fn: str, masks: LocalMasks) -> Tensor:
    """Weights of the local pairs, zero elsewhere: exp(logit - ref) (softmax; ref is a per-query
    max or lse, (B, H, N, W)) or phi(logit) (laplace)."""
    if attn_fn == "softmax":  # mask before exp: exp(-inf) = 0 also has a zero gradient
        return torch.exp(torch.where(masks.pair, logits, float("-inf")) - ref[..., None])
    return torch.where(masks.pair, laplace(logits), 0.0)


def local_apply(weights: Tensor, v_blocks: Tensor, causal: bool) -> Tensor:
    """sum_j weights_ij v_j over the local pairs, (B, H, N, W, Dv)."""
    return torch.einsum("bhnac,bhnce->bhnae", weights, block_context(v_blocks, causal))


def local_grads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    grad_out: Tensor,
    delta: Tensor | None,
    lse: Tensor | None,
    attn_fn: str,
    blocks: Blocks,
    masks: LocalMasks,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of the local part wrt (q, k, v, bias), all padded to N*W positions.

    With the weights P_ij (softmax: exp(logit_ij - lse_i); laplace: phi(logit_ij)) the loss
    gradient wrt logit_ij is g_ij = P'_ij (dO_i . v_j - delta_i) and wrt v_j is sum_i P_ij dO_i
    (delta = dO . O for softmax, 0 for laplace). Both are the gradients of the surrogate
    F = sum_ij P_ij (dO_i . v_j - delta_i) with lse and delta held fixed, so autograd on this
    small dense recomputation gives them exactly.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        bias_leaf = None if bias is None else bias.detach().requires_grad_()
        scale_blocks = scale.view(blocks.count, blocks.window)
        q_blocks, k_blocks = to_blocks(leaves[0], blocks), to_blocks(leaves[1], blocks)
        logits = local_logits(q_blocks, k_blocks, bias_leaf, scale_blocks, blocks.causal, masks)
        ref = None if lse is None else lse.view(*lse.shape[:2], blocks.count, blocks.window)
        weights = local_weights(logits, ref, attn_fn, masks)
        v_ctx = block_context(to_blocks(leaves[2], blocks), blocks.causal)
        dot = torch.einsum("bhnae,bhnce->bhnac", to_blocks(grad_out, blocks), v_ctx)
        if delta is not None:
            dot = dot - delta.view(*delta.shape[:2], blocks.count, blocks.window, 1)
        surrogate = (weights * dot).sum()
        inputs = leaves + ([] if bias_leaf is None else [bias_leaf])
        grads = torch.autograd.grad(surrogate, inputs)
    dq, dk, dv = grads[:3]
    return dq, dk, dv, (grads[3] if bias_leaf is not None else None)
