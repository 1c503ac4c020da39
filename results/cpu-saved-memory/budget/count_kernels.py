"""Inductor's static counts (kernels generated, bytes accessed) of one compiled Text-4K step."""
import sys
import torch
from torch._inductor import metrics
from harness.measure import EfficiencyCell, build_step
from harness.registry import parse_model_spec
from harness.efficiency_presets import PRESETS
name = sys.argv[1]
spec = parse_model_spec(name)
preset = PRESETS["paper-text4k"]
config = spec.entry.make_config(**preset.backbone, **dict(spec.overrides))
cell = EfficiencyCell(spec.label, 4096, 8, "cpu", "bf16", warmup=1, compile=True)
metrics.reset()
step = build_step(spec.entry, config, cell, torch.device("cpu")).step
step()
print(f"{name}: kernels {metrics.generated_kernel_count}, bytes accessed {metrics.num_bytes_accessed/2**20:.1f} MiB, "
      f"cpp-fused nodes {metrics.cpp_to_dtype_count}")
