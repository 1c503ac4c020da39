"""Matrix products in the compiled forward and backward graphs of one Text-4K LongVQ step, by budget:
does the budget make the backward recompute any GEMM? (min-cut partitioner, as inductor uses)"""
import sys, collections
import torch
import torch._functorch.config as fc
from functorch.compile import min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd
import harness.measure
from harness.measure import EfficiencyCell, build_step
from harness.registry import parse_model_spec
from harness.efficiency_presets import PRESETS

MM = {"mm", "addmm", "bmm", "baddbmm", "convolution"}
def counter(tag, counts):
    def compiler(gm, _inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function":
                name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
                if name in MM:
                    counts[tag] += 1
        return gm.forward
    return compiler

name = sys.argv[1]
spec = parse_model_spec(name)
config = spec.entry.make_config(**PRESETS["paper-text4k"].backbone, **dict(spec.overrides))
counts = collections.Counter()
backend = aot_autograd(fw_compiler=counter("forward", counts), bw_compiler=counter("backward", counts),
                       partition_fn=min_cut_rematerialization_partition)
harness.measure.compile_model = lambda m: (torch._dynamo.reset(), torch.compile(m, backend=backend))[1]
cell = EfficiencyCell(spec.label, 4096, 8, "cpu", "bf16", warmup=1, compile=True)
build_step(spec.entry, config, cell, torch.device("cpu")).step()
print(name, dict(counts))
