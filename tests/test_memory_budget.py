"""Under an activation memory budget the compiled backward does not re-run an expensive custom
op (harness/measure.py, ``with_memory_budget``): LongVQ with a stand-in for the Triton VQ
attention (a custom op with a FLOP formula and an opaque backward reading what it saved), on
CPU with the min-cut partitioner torch.compile's inductor uses."""

from __future__ import annotations

import torch
from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
from torch import Tensor
from torch._dynamo.backends.common import aot_autograd
from torch.utils.flop_counter import register_flop_formula

import harness.measure
import models.longvq
from harness.backbone import task_loss
from harness.registry import REGISTRY


@torch.library.custom_op("budget_test::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return v * (q * k).sum(-1, keepdim=True), (q * k).sum(-1)


@_attention.register_fake
def _(q, k, v):
    return torch.empty_like(v), q.new_empty(q.shape[:-1])


@torch.library.custom_op("budget_test::attention_backward", mutates_args=())
def _attention_backward(g: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                        stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    gs = (g * v).sum(-1, keepdim=True)
    return gs * k, gs * q, g * stats[..., None]


@_attention_backward.register_fake
def _(g, q, k, v, out, stats):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


_attention.register_autograd(
    lambda ctx, g, _g_stats: _attention_backward(g, *ctx.saved_tensors),
    setup_context=_setup)


@register_flop_formula(torch.ops.budget_test.attention)
def _(q_shape, k_shape, v_shape, *, out_shape=None, **kwargs) -> int:
    return 10 ** 10  # an attention's worth: far more than the elementwise ops around it


def _stand_in(q, k_hat, v, codebook, codes, bias, **_options):
    return _attention(q, k_hat, v)[0]


# a one-layer LongVQ small enough for Triton's interpreter (test_vq_attention_triton.py uses it
# on the real op)
TINY_LONGVQ = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ffn": 64, "window": 8,
               "codebook_size": 8, "key_grad": "window", "z_dim": 16, "v_dim": 16}


def partitioned_graphs(budget_wrapper, **overrides) -> dict[str, list[str]]:
    """One training step of a tiny LongVQ compiled with the min-cut partitioner (inductor's) and
    run through ``budget_wrapper``: the forward and backward graphs it made, as text."""
    entry = REGISTRY.get("longvq")
    torch.manual_seed(0)
    net = entry.build(entry.make_config(**{**TINY_LONGVQ, **overrides})).train()
    graphs: dict[str, list[str]] = {"forward": [], "backward": []}

    def compiler(kind):
        def compile_graph(gm, _inputs):
            graphs[kind].append(str(gm.graph))
            return make_boxed_func(gm.forward)
        return compile_graph

    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    forward = budget_wrapper(torch.compile(net, backend=backend))
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    task_loss(net, forward(x), torch.zeros(2, dtype=torch.long)).backward()
    torch._dynamo.reset()
    return graphs


def _backward_calls(monkeypatch, budget_wrapper) -> int:
    monkeypatch.setattr(models.longvq, "vq_attention", _stand_in)
    return sum(g.count("budget_test.attention.default")
               for g in partitioned_graphs(budget_wrapper)["backward"])


def test_memory_budget_does_not_recompute_an_expensive_custom_op(monkeypatch) -> None:
    import torch._functorch.config as functorch_config

    def plain_budget(compiled):  # torch's own setting alone
        def forward(*args):
            with functorch_config.patch(activation_memory_budget=0.5):
                return compiled(*args)
        return forward

    assert _backward_calls(monkeypatch, plain_budget) > 0  # the case the harness guards against
    assert _backward_calls(
        monkeypatch, lambda compiled: harness.measure.with_memory_budget(compiled, 0.5)) == 0
