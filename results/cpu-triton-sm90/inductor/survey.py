"""Inductor's Triton kernels of one compiled LongVQ training step, compiled for sm_90a on CPU.

Usage (from the repository root): PYTHONPATH=. .venv/bin/python
results/cpu-triton-sm90/inductor/survey.py [MODEL] > OUT.md. Prints a markdown table (kernel,
and per block variant whether Triton compiled it) and, below, the source of each kernel that
failed. See tests/inductor_sm90.py for how the kernels are recorded without a GPU.
"""

from __future__ import annotations

import sys

import torch
import triton

from tests.inductor_sm90 import BLOCK_VARIANTS, DEFAULT_MODEL, compile_all, record_kernels


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
    sources = record_kernels(model)
    print(f"# {model}: inductor's Triton kernels of one compiled training step, for sm_90a\n")
    print(f"torch {torch.__version__}, Triton {triton.__version__}; d_model 32, one layer, "
          "batch 2 x 512 tokens, fp32; num_warps 4.\n")
    print("| kernel | " + " | ".join(BLOCK_VARIANTS) + " |")
    print("|---|" + "---|" * len(BLOCK_VARIANTS))
    failed = {}
    for name, variants in sorted(compile_all(sources).items()):
        cells = ["ok" if error is None else f"**{error}**" for error in variants.values()]
        if any(error is not None for error in variants.values()):
            failed[name] = sources[name]
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    print(f"\n{len(sources)} kernels, {len(failed)} failed.")
    for name, source in failed.items():
        body = source[source.index("@triton.jit"):]
        print(f"\n## `{name}`\n\n```python\n{body.rstrip()}\n```")


if __name__ == "__main__":
    main()
