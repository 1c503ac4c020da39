"""What LongVQ's compiled Text-4K step saves for its backward, before and after session 15's
one-graph change, counted on this CPU (harness/memory_accounting.py, as `efficiency --memory`).

On CPU the model runs the torch VQ attention path (a graph break either way), and the Triton op
only runs under the interpreter, far too slowly at L = 4096. So the op is replaced by a stand-in
with the Triton op's interface: the same casts and layout around it, a custom op whose outputs
have the shapes and dtypes of the Triton op's (output, row statistics, per-chunk code cache U
and counts: their fake implementation, models/vq_attention/triton.py) and which saves what the
Triton op saves (its inputs and outputs), with the Triton op's FLOP estimates. Its output is
the torch path's; its backward is an opaque op that reads every saved tensor and returns zero
gradients (only the forward's saved tensors are counted).
  before: the stand-in behind torch.compiler.disable (the op was an autograd.Function there)
          and the quantisers updating inside their own forward (defer_update=False);
  after:  the stand-in inside the compiled graph, updates deferred (the model's default).
The paper-text4k shape (L 4096, batch 8, d_model 128, 2 layers, FFN 256), bf16 autocast,
torch.compile (inductor), one warm-up step; at the default activation_memory_budget (1.0) and
at the lean rows' 0.5.

    PYTHONPATH=. python results/cpu-one-graph/saved_memory_probe.py
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

import models.longvq as longvq_module
from harness.backbone import SequenceModel
from harness.efficiency_presets import GPU_BACKBONE
from harness.measure import EfficiencyCell
from harness.memory_accounting import account_cell
from harness.registry import REGISTRY
from models.vq_attention import vq_attention_linear
from models.vq_attention._common import to_autocast_dtype
from models.vq_attention.triton import _fwd_op, default_chunk, kernel_dtype, vq_attention_flops

MIB = 2**20


@torch.library.custom_op("probe::vq_attention", mutates_args=())
def stand_in_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codebook: torch.Tensor,
                codes: torch.Tensor, bias: torch.Tensor, window: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = _fwd_op._abstract_fn(q, k, v, codebook, codes, bias, 1, "softmax", False, window,
                                  "window", "split", default_chunk(window))
    with torch.autocast("cpu", enabled=False):
        out = vq_attention_linear(q[:, None].float(), k[:, None].float(), v[:, None].float(),
                                  codebook.float(), codes[:, None].long(), bias,
                                  attn_fn="softmax", causal=False, window=window,
                                  key_grad="window")[:, 0]
    return (out.to(q.dtype), *(torch.zeros(x.shape, dtype=x.dtype) for x in shapes[1:]))


@stand_in_op.register_fake
def _(q, k, v, codebook, codes, bias, window):
    return _fwd_op._abstract_fn(q, k, v, codebook, codes, bias, 1, "softmax", False, window,
                                "window", "split", default_chunk(window))


@torch.library.custom_op("probe::vq_attention_backward", mutates_args=())
def stand_in_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor,
                         bias: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         u: torch.Tensor, cnt: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
            torch.zeros_like(bias))


@stand_in_backward_op.register_fake
def _(grad_out, q, k, v, codebook, codes, bias, out, lse, u, cnt):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(bias))


# the real op's FLOP estimates (what the partitioner weighs under a memory budget)
@register_flop_formula(torch.ops.probe.vq_attention)
def _(q_shape, k_shape, v_shape, codebook_shape, codes_shape, bias_shape, window, *,
      out_shape=None, **kwargs) -> int:
    return vq_attention_flops(q_shape, v_shape, codebook_shape, True, False, window, "window",
                              default_chunk(window))


@register_flop_formula(torch.ops.probe.vq_attention_backward)
def _(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return 5 * vq_attention_flops(q_shape, v_shape, args[0], True, False, 64, "window", 128) // 2


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], *output)


def _backward(ctx, grad_out, *_unused):
    # an opaque op reading every saved tensor, as the Triton op's backward does: what the
    # compiled graph must keep for it is then the same
    dq, dk, dv, dbias = stand_in_backward_op(grad_out, *ctx.saved_tensors)
    return dq, dk, dv, None, None, dbias, None


stand_in_op.register_autograd(_backward, setup_context=_setup)


def stand_in(q, k_hat, v, codebook, codes, bias, *, attn_fn, causal, window, impl, key_grad):
    """``vq_attention_triton``'s wrapper around the stand-in (LongVQ: one head)."""
    assert (attn_fn, causal, key_grad) == ("softmax", False, "window")
    q, k_hat, v = to_autocast_dtype(q, k_hat, v)
    dtype = kernel_dtype(q, k_hat, v)
    batch = q.shape[0]
    qc, kc, vc = (x.to(dtype).reshape(batch, *x.shape[2:]).contiguous() for x in (q, k_hat, v))
    out = stand_in_op(qc, kc, vc, codebook.to(dtype).contiguous(),
                      codes.to(torch.int32).reshape(batch, -1).contiguous(),
                      bias.float().contiguous(), window)[0]
    return out.view(batch, 1, *out.shape[1:]).to(q.dtype)


def account(variant: str, budget: float = 1.0) -> tuple[float, dict[str, float],
                                                        dict[str, float]]:
    longvq_module.vq_attention = (torch.compiler.disable(stand_in) if variant == "before"
                                  else stand_in)
    longvq_module.resolve_impl = lambda _impl, _q: "triton"  # kernel_inputs casts as on CUDA
    entry = REGISTRY.get("longvq")
    config = entry.make_config(**GPU_BACKBONE, key_grad="window",
                               activation_memory_budget=budget)
    original_init = SequenceModel.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        for module in self._deferred:
            module.defer_update = variant == "after"

    SequenceModel.__init__ = init
    try:
        cell = EfficiencyCell("longvq[key_grad=window]", 4096, 8, "cpu", "bf16", warmup=1,
                              compile=True)
        result = account_cell(entry, config, cell)
    finally:
        SequenceModel.__init__ = original_init
    by_holder: dict[str, float] = {}
    by_shape: dict[str, float] = {}
    for t in result.saved:
        by_holder[t.holder] = by_holder.get(t.holder, 0.0) + t.storage_bytes / MIB
        key = f"{t.shape} {t.dtype}"
        by_shape[key] = by_shape.get(key, 0.0) + t.storage_bytes / MIB
    return result.saved_bytes / MIB, by_holder, by_shape


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, inductor on CPU; saved for backward (MiB, storages once)")
    for name, budget in (("before", 1.0), ("after", 1.0), ("before", 0.5), ("after", 0.5)):
        torch._dynamo.reset()
        total, holders, shapes = account(name, budget)
        parts = ", ".join(f"{h} {mib:.1f}" for h, mib in sorted(holders.items()) if mib >= 0.1)
        print(f"{name}, activation_memory_budget={budget}: {total:.1f} MiB ({parts})")
        for key, mib in sorted(shapes.items(), key=lambda item: -item[1]):
            if mib >= 1.0:
                print(f"  - {mib:.1f} MiB  {key}")
