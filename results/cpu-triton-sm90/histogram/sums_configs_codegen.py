"""sums_configs.patch's two configs (the last two of SUMS_CONFIGS once both patches are applied) compiled for
sm_90a on CPU at #9's shape (sums) and the Text-4K shape (seg_sums, far_sums): registers, spills, shared
memory. Run from a tree with both patches applied: PYTHONPATH=. python THIS."""
import re
from models.vq_attention import triton as vq_triton
from tests.triton_codegen import compile_kernel
shapes = {"#9": dict(D=64, DV=64, BLOCK_D=64, BLOCK_DV=64, IS_SOFTMAX=True, CAUSAL=True, MODE=0, HAS_BIAS=True, PREC="tf32"),
          "T4K": dict(D=64, DV=256, BLOCK_D=64, BLOCK_DV=128, IS_SOFTMAX=True, CAUSAL=False, MODE=1, HAS_BIAS=True, PREC="tf32")}
for shape, names in (("#9", ["sums"]), ("T4K", ["seg_sums", "far_sums"])):
    for name in names:
        for i, config in enumerate(vq_triton.CONFIGS[name][-2:]):
            code = compile_kernel(name, shapes[shape], config)
            print(shape, name, config.kwargs, config.num_warps, config.num_stages, "regs", code.registers, "spill", code.spill_bytes, "shared", code.shared_bytes)
