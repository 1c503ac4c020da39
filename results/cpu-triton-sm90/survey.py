"""Registers, spills, shared memory, pipelined loads and exp count of every VQ-attention Triton
kernel compiled for sm_90a on this CPU (tests/triton_codegen.py), for each autotune config, at
the #9 shape (causal, bias, D = Dv = 64) and LongVQ's Text-4K shape (bidirectional "far" cache,
bias, D 64, Dv 256: two value tiles of 128; the bf16 forward one of 256). bf16 inputs. Usage (from the repository root):
    PYTHONPATH=. python results/cpu-triton-sm90/survey.py [--default-only] > OUT.md
"""

from __future__ import annotations

import argparse

from models.vq_attention import triton as vq_triton
from tests.triton_codegen import compile_kernel

SHAPES = {
    "#9 (causal)": dict(D=64, DV=64, BLOCK_D=64, BLOCK_DV=64, IS_SOFTMAX=True, CAUSAL=True,
                        MODE=0, HAS_BIAS=True, PREC="tf32"),
    "Text-4K (bidir)": dict(D=64, DV=256, BLOCK_D=64, BLOCK_DV=128, IS_SOFTMAX=True,
                            CAUSAL=False, MODE=1, HAS_BIAS=True, PREC="tf32"),
}
USED = {"#9 (causal)": ("sums", "fwd", "grad_sums", "dq", "dkdv"),
        "Text-4K (bidir)": ("seg_sums", "far_sums", "fwd", "grad_sums", "dq", "dkdv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-only", action="store_true",
                        help="only each kernel's first config (the one used without autotuning)")
    args = parser.parse_args()
    print("| shape | kernel | config | warps | stages | registers | spill B | shared KiB | "
          "cp.async loads | waited loads in loops | MUFU.EX2 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, values in SHAPES.items():
        for name in USED[shape]:
            configs = vq_triton.CONFIGS[name][:1] if args.default_only else \
                vq_triton.CONFIGS[name]
            for i, config in enumerate(configs):
                extra = {"DK_PAIRS": 0} if name == "dkdv" else {}
                meta = " ".join(f"{k[6:]}={v}" for k, v in config.kwargs.items())
                try:
                    code = compile_kernel(name, values, config, **extra)
                except Exception as error:  # noqa: BLE001 -- one row per config, whatever
                    print(f"| {shape} | {name} | {i}: {meta} | {config.num_warps} | "
                          f"{config.num_stages} | error: {type(error).__name__} |||||")
                    continue
                print(f"| {shape} | {name} | {i}: {meta} | {config.num_warps} | "
                      f"{config.num_stages} | {code.registers} | {code.spill_bytes} | "
                      f"{code.shared_bytes / 1024:.0f} | {code.pipelined_loads} | "
                      f"{len(code.sync_loads_in_loops)} | {code.exp2} |", flush=True)


if __name__ == "__main__":
    main()
