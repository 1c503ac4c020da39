"""VQ attention (LongVQ / Transformer-VQ): the quadratic oracle, the linear-time torch path and
the fused Triton kernels (``triton.py``, imported only when used: triton is optional)."""

from __future__ import annotations

import torch
from torch import Tensor

from models._optional import importable

from ._common import check_choice, check_window, to_autocast_dtype
from .linear import vq_attention_linear
from .naive import vq_attention_naive

__all__ = ["IMPLS", "check_window", "kernel_inputs", "resolve_impl", "triton_available",
           "vq_attention", "vq_attention_linear", "vq_attention_naive"]

IMPLS = ("auto", "linear", "naive", "triton")


def triton_available() -> bool:
    """Whether the Triton kernels import (the triton package and a working build)."""
    return importable("models.vq_attention.triton")


def resolve_impl(impl: str, q: Tensor) -> str:
    """The implementation ``impl`` runs for inputs like ``q``: "auto" is "triton" for CUDA
    float32/bfloat16/float16 inputs when triton imports, "linear" otherwise."""
    check_choice("impl", impl, IMPLS)
    if impl != "auto":
        return impl
    supported = q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return "triton" if q.is_cuda and supported and triton_available() else "linear"


def kernel_inputs(impl: str, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` as ``impl`` reads them: for "triton" under autocast, in the autocast dtype
    (``vq_attention_triton`` casts them too; the torch paths compute in float32). Called in the
    model, before the op's graph break: torch.compile then fuses each cast (and its backward)
    into the ops that make q and k_hat, where inside the eager op every input and every returned
    gradient took a copy kernel of its own."""
    return to_autocast_dtype(*tensors) if impl == "triton" else tensors


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
    """Dispatch to ``vq_attention_linear`` (default), ``vq_attention_naive``,
    ``vq_attention_triton`` (CUDA) or "auto" (``resolve_impl``). key_grad: "ste"
    (straight-through gradient to every key) or "window" (only from the exact local blocks).
    Under torch.compile the Triton op is two custom ops inside the caller's graph; the torch
    paths run eagerly (a graph break)."""
    impl = resolve_impl(impl, q)
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package (pip install triton)")
        from .triton import vq_attention_triton

        return vq_attention_triton(q, k_hat, v, codebook, codes, bias, attn_fn=attn_fn,
                                   causal=causal, window=window, key_grad=key_grad)
    return _torch_path(q, k_hat, v, codebook, codes, bias, attn_fn=attn_fn, causal=causal,
                       window=window, impl=impl, key_grad=key_grad)


# Eager under torch.compile (a graph break): the linear path's custom backward and the naive
# oracle are references, not what a compiled GPU model runs.
@torch.compiler.disable
def _torch_path(q: Tensor, k_hat: Tensor, v: Tensor, codebook: Tensor, codes: Tensor,
                bias: Tensor | None, *, attn_fn: str, causal: bool, window: int, impl: str,
                key_grad: str) -> Tensor:
    fn = vq_attention_linear if impl == "linear" else vq_attention_naive
    return fn(q, k_hat, v, codebook, codes, bias, attn_fn=attn_fn, causal=causal, window=window,
              key_grad=key_grad)
