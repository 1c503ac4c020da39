"""Pieces shared by the naive and the linear VQ-attention paths: phi, logit scales, checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

ATTN_FNS = ("softmax", "laplace")
KEY_GRADS = ("ste", "window")  # straight-through to every key | only from the exact local blocks

# Mega's Laplace attention function: a Gaussian CDF with these moments.
LAPLACE_MU = math.sqrt(0.5)
LAPLACE_SIGMA = math.sqrt(1.0 / (4.0 * math.pi))


def laplace(x: Tensor) -> Tensor:
    """phi(x) = 0.5 (1 + erf((x - mu) / (sigma sqrt 2)))."""
    return 0.5 * (1.0 + torch.erf((x - LAPLACE_MU) / (LAPLACE_SIGMA * math.sqrt(2.0))))


def laplace_grad(x: Tensor) -> Tensor:
    """phi'(x): the Gaussian pdf with mean mu and std sigma."""
    norm = LAPLACE_SIGMA * math.sqrt(2.0 * math.pi)
    return torch.exp(-0.5 * ((x - LAPLACE_MU) / LAPLACE_SIGMA) ** 2) / norm


def compute_dtype(x: Tensor) -> torch.dtype:
    """Both paths compute in float32, or in float64 when given float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(x: Tensor) -> torch.autocast:
    """Both paths compute in float32/float64 even inside an autocast region."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def logit_scale(
    attn_fn: str, causal: bool, length: int, padded: int, dim: int, dtype, device
) -> Tensor:
    """Per-query factor on q_i . k_j, shape (padded,): tau = 1/sqrt(D) (softmax), 1/n_i (laplace).

    Laplace follows Mega: n_i = L (bidirectional) or i + 1 (causal), the number of attended keys.
    """
    if attn_fn == "softmax":
        return torch.full((padded,), dim**-0.5, dtype=dtype, device=device)
    if causal:
        return 1.0 / torch.arange(1, padded + 1, dtype=dtype, device=device)
    return torch.full((padded,), 1.0 / length, dtype=dtype, device=device)


def to_autocast_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` in the autocast dtype of their device when autocast is on (as SDPA reads its
    inputs), else as given: what the Triton kernels read."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(x.to(dtype) for x in tensors)


def check_choice(field: str, value: str, known: tuple[str, ...]) -> None:
    """One clear error for an option outside its known values."""
    if value not in known:
        raise ValueError(f"{field}={value!r}; known: {', '.join(known)}")


def check_window(window: int, has_bias: bool, key_grad: str, bias_name: str = "bias") -> None:
    """W >= 1, or W = 0: VQ attention with no local part (every key through its code). W = 0
    has no bias (2W - 1 = -1 offsets) and no exact local blocks, so key_grad="window" would give
    no key any gradient: both are refused with the fix named. (bias_name: what the caller calls
    the bias, e.g. a model's ``local_bias``.)"""
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    if window == 0 and has_bias:
        raise ValueError(f"window=0 has no local part, so no local bias: set {bias_name} off "
                         "or window >= 1")
    if window == 0 and key_grad == "window":
        raise ValueError("window=0 has no exact local blocks, so key_grad='window' would give "
                         "no key a gradient: use key_grad='ste' or window >= 1")


def check_inputs(
    q: Tensor,
    k_hat: Tensor,
    v: Tensor,
    codebook: Tensor,
    codes: Tensor,
    bias: Tensor | None,
    attn_fn: str,
    window: int,
    key_grad: str = "ste",
) -> None:
    check_choice("attn_fn", attn_fn, ATTN_FNS)
    check_choice("key_grad", key_grad, KEY_GRADS)
    check_window(window, bias is not None, key_grad)
    if q.dim() != 4 or k_hat.shape != q.shape:
        raise ValueError(f"q and k_hat must be (B, H, L, D); got {q.shape} and {k_hat.shape}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, L, Dv) matching q {q.shape}; got {v.shape}")
    heads, dim = q.shape[1], q.shape[3]
    if codebook.dim() != 3 or codebook.shape[0] not in (1, heads) or codebook.shape[2] != dim:
        raise ValueError(f"codebook must be (H, S, D) with H in (1, {heads}); got {codebook.shape}")
    if codes.shape != q.shape[:3] or codes.dtype != torch.int64:
        raise ValueError(f"codes must be int64 of shape {tuple(q.shape[:3])}; got {codes.shape}")
    if bias is not None and bias.shape != (2 * window - 1,):
        raise ValueError(f"bias must have shape ({2 * window - 1},) for window={window}")
