"""Quadratic reference for VQ attention: materialises the L x L matrix, plain autograd.

    logit_ij = s_i q_i . k_hat_j + B_ij,   B_ij = bias[(i - j) + W - 1] if |i - j| < W else 0
    softmax: s_i = 1/sqrt(D),  O_i = sum_j softmax_j(logit_ij) v_j
    laplace: s_i = 1/n_i (n_i = L, or i + 1 when causal),  O_i = sum_j phi(logit_ij) v_j
             (unnormalised; phi(x) = 0.5 (1 + erf((x - mu) / (sigma sqrt 2))))
    causal: only j <= i.
    W = 0: no local part (no bias, key_grad="ste"): plain VQ attention over every visible key.

k_hat is used as given, so autograd gives dL/dk_hat for every key (key_grad="ste"); with
k_hat = codebook[codes] + (k - k.detach()) (straight-through) that is dL/dk. This is the test
oracle for ``vq_attention_linear``; ``codebook`` and ``codes`` are accepted (and checked) only for
a uniform signature.

key_grad="window" (Transformer-VQ's semantics): logit_ij uses k_hat_j inside the exact local
region of the linear path's block structure and sg(k_hat_j) elsewhere, so keys get gradient only
from the queries of that region. With blocks of W positions, block(x) = x // W, the region is

    block(i) - block(j) in {0, 1} (causal),  |block(i) - block(j)| <= 1 (bidirectional).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_inputs, compute_dtype, laplace, logit_scale, no_autocast


def vq_attention_naive(
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
) -> Tensor:
    """q, k_hat: (B, H, L, D); v: (B, H, L, Dv); bias: (2W-1,) or None. Returns (B, H, L, Dv)."""
    check_inputs(q, k_hat, v, codebook, codes, bias, attn_fn, window, key_grad)
    with no_autocast(q):
        return _naive(q, k_hat, v, bias, attn_fn, key_grad, causal, window)


def _naive(q, k_hat, v, bias, attn_fn, key_grad, causal, window) -> Tensor:
    dtype = compute_dtype(q)
    qf, kf, vf = q.to(dtype), k_hat.to(dtype), v.to(dtype)
    length, dim = q.shape[-2], q.shape[-1]

    pos = torch.arange(length, device=q.device)
    offset = pos[:, None] - pos[None, :]  # i - j
    scale = logit_scale(attn_fn, causal, length, length, dim, dtype, q.device)
    logits = qf @ kf.transpose(-1, -2)  # (B, H, L, L)
    if key_grad == "window":
        gap = pos[:, None] // window - pos[None, :] // window  # block(i) - block(j)
        exact = (gap >= 0) & (gap <= 1) if causal else gap.abs() <= 1
        logits = torch.where(exact, logits, qf @ kf.detach().transpose(-1, -2))
    logits = logits * scale[:, None]
    if bias is not None:
        in_window = offset.abs() < window
        index = (offset + window - 1).clamp(0, 2 * window - 2)
        logits = logits + torch.where(in_window, bias.to(dtype)[index], 0.0)

    visible = offset >= 0 if causal else torch.ones_like(offset, dtype=torch.bool)
    if attn_fn == "softmax":
        weights = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    else:
        weights = torch.where(visible, laplace(logits), 0.0)
    return (weights @ vf).to(q.dtype)
