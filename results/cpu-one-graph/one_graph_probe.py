"""CPU proxy for session 15's one-graph change: LongVQ's Text-4K backbone (d_model 128, 2
layers, FFN 256, key_grad=window) compiled with inductor on this CPU, at L = 512, batch 2.

The VQ attention op is replaced by a stand-in custom op (the same function in both variants),
because on CPU the real op is the torch path (a graph break in both) and the Triton op runs only
under the interpreter. The variants:
  before: the stand-in behind torch.compiler.disable and the quantisers updating inside their
          own forward (defer_update=False): the structure of the code before the change;
  after:  the stand-in as a custom op in the graph, the updates deferred (the model's default).
Printed per variant: dynamo's graphs, the first (compiling) step's seconds (inductor's caches
off), and per later step, from torch.profiler, the inductor kernels run and the other ATen
compute ops run (the GEMMs and FFTs inductor calls, and eager work; views, casts and
allocations not counted), and their sum. A proxy: inductor's GPU kernels differ from its
CPU ones, and the GPU step has the real Triton op.

    PYTHONPATH=. python results/cpu-one-graph/one_graph_probe.py
"""

from __future__ import annotations

import collections
import time

import torch
import torch._dynamo as dynamo
import torch._inductor.config as inductor_config
from torch.profiler import profile

import models.longvq as longvq_module
from harness.backbone import task_loss
from harness.efficiency_presets import GPU_BACKBONE
from harness.registry import REGISTRY

NOT_COMPUTE = {"view", "reshape", "as_strided", "as_strided_", "permute", "expand", "unsqueeze",
               "squeeze", "alias", "detach", "t", "transpose", "empty", "empty_strided",
               "resize_", "slice", "select", "split", "split_with_sizes", "_unsafe_view",
               "resolve_conj", "resolve_neg", "lift_fresh", "empty_like", "to", "_to_copy",
               "contiguous", "clone", "unbind", "narrow", "_reshape_alias", "set_", "zeros",
               "new_empty", "new_empty_strided", "result_type", "is_nonzero", "item",
               "_local_scalar_dense", "scalar_tensor", "lift_fresh_copy", "detach_"}


@torch.library.custom_op("probe::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v * (q * k).sum(-1, keepdim=True)


@attention.register_fake
def _(q, k, v):
    return torch.empty_like(v)


@torch.library.custom_op("probe::attention_backward", mutates_args=())
def attention_backward(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gs = (g * v).sum(-1, keepdim=True)
    return gs * k, gs * q, g * (q * k).sum(-1, keepdim=True)


@attention_backward.register_fake
def _(g, q, k, v):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    return attention_backward(g, *ctx.saved_tensors)


attention.register_autograd(_backward, setup_context=_setup)


def stand_in(q, k_hat, v, codebook, codes, bias, **_options):
    return attention(q, k_hat, v)


def run(variant: str) -> None:
    longvq_module.vq_attention = (torch.compiler.disable(stand_in) if variant == "before"
                                  else stand_in)
    entry = REGISTRY.get("longvq")
    torch.manual_seed(0)
    model = entry.build(entry.make_config(**GPU_BACKBONE, key_grad="window")).train()
    for block in model.blocks:
        block.quantizer.defer_update = variant == "after"
    tokens = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(1))
    targets = torch.zeros(2, dtype=torch.long)
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = torch.compile(model)

    def step() -> None:
        model.zero_grad()
        task_loss(model, compiled(tokens), targets).backward()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    with profile() as prof:
        step()
    events = prof.events()
    kernels = sum("cpp_fused" in e.name for e in events)
    eager = collections.Counter(
        e.name for e in events
        if e.name.startswith("aten::") and e.name[6:] not in NOT_COMPUTE
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith(("aten::", "graph_"))))
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"{variant}: graphs {graphs}, first step {first:.1f} s; per step: inductor kernels "
          f"{kernels}, other ATen compute ops {sum(eager.values())} "
          f"({', '.join(f'{n[6:]} {c}' for n, c in eager.most_common(6))}), "
          f"sum {kernels + sum(eager.values())}")


if __name__ == "__main__":
    inductor_config.cpp.enable_kernel_profile = True  # each C++ kernel is a profiler event
    inductor_config.force_disable_caches = True  # compile times from scratch, both variants
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, inductor on CPU")
    for name in ("before", "after"):
        run(name)
