"""VQ attention (LongVQ / Transformer-VQ): the quadratic oracle and the linear-time path."""

from __future__ import annotations

from torch import Tensor

from .linear import vq_attention_linear
from .naive import vq_attention_naive

__all__ = ["vq_attention", "vq_attention_linear", "vq_attention_naive"]

_IMPLS = {"linear": vq_attention_linear, "naive": vq_attention_naive}


def vq_attention(
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
    impl: str = "linear",
    key_grad: str = "ste",
) -> Tensor:
    """Dispatch to ``vq_attention_linear`` (default) or ``vq_attention_naive``. key_grad: "ste"
    (straight-through gradient to every key) or "window" (only from the exact local blocks)."""
    if impl not in _IMPLS:
        raise ValueError(f"impl={impl!r}; known: {', '.join(_IMPLS)}")
    return _IMPLS[impl](
        q, k_hat, v, codebook, codes, bias, attn_fn=attn_fn, causal=causal, window=window,
        key_grad=key_grad,
    )
