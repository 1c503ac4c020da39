"""Host cost of one call with autograd: a custom op with a registered autograd formula (what
torch.compile traces) against an autograd.Function (what eager calls of the Triton VQ attention
use), both with the VQ forward op's signature and a trivial body, on this CPU.

    PYTHONPATH=. python results/cpu-one-graph/dispatch_overhead.py
"""

from __future__ import annotations

import time

import torch
from torch import Tensor


@torch.library.custom_op("overhead::vq_fwd", mutates_args=())
def custom(q: Tensor, k: Tensor, v: Tensor, codebook: Tensor, codes: Tensor, bias: Tensor | None,
           heads: int, attn_fn: str, causal: bool, window: int, key_grad: str, strategy: str,
           chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(q.new_empty(1) for _ in range(4))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], *output)


custom.register_autograd(lambda ctx, *grads: (None,) * 13, setup_context=_setup)


class Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, codebook, codes, bias, *params):
        out = tuple(q.new_empty(1) for _ in range(4))
        ctx.save_for_backward(q, k, v, codebook, codes, bias, *out)
        return out[0]

    @staticmethod
    def backward(ctx, grad):
        return (None,) * 13


def per_call_us(fn, calls: int = 5000) -> float:
    for _ in range(500):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


if __name__ == "__main__":
    torch.set_num_threads(1)
    x = torch.randn(4, requires_grad=True)
    args = (x, x, x, x, x, x, 1, "softmax", False, 64, "window", "split", 128)
    print(f"torch {torch.__version__}")
    print(f"custom op: {per_call_us(lambda: custom(*args)):.1f} us per call")
    print(f"autograd.Function: {per_call_us(lambda: Function.apply(*args)):.1f} us per call")
