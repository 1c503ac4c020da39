"""Compile the VQ-attention Triton kernels for an H100/H200 (sm_90a) on a machine without a GPU.

Triton lowers a kernel to PTX without a device, and its wheel ships ``ptxas`` and ``cuobjdump``:
so the register count, spills, shared memory, which loads were software-pipelined (cp.async
into shared memory) and the SASS instruction mix of each kernel can be read on CPU. Run time
still needs a GPU; these are the code-generation facts behind it.

The arguments are typed as the launcher types them for bf16 inputs: pointers 16-byte aligned
(Triton's JIT specialises aligned pointer arguments so; without that no load is pipelined),
the kernels' ``do_not_specialize`` integers plain i32.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

# pointer arguments and their element types for bf16 inputs (the forward's code cache U is
# bf16 then; sums, counts, statistics and gradients of the cache are fp32)
BF16_POINTERS = {"Q", "K", "V", "CB", "U", "O", "DO", "DQ", "DK", "DV_OUT"}
FP32_POINTERS = {"CNT", "BIAS", "LSE", "DELTA", "DBIAS", "GCAT", "GTOT", "G", "T", "TCNT",
                 "TOT", "TOT_CNT", "X", "OUT", "START"}
INT32_POINTERS = {"CODES"}
FLOAT_SCALARS = {"sm_scale", "inv_len"}


@dataclass(frozen=True)
class Codegen:
    """What one compiled kernel variant looks like on sm_90a."""

    registers: int
    spill_bytes: int  # spill stores + loads, bytes per thread
    shared_bytes: int
    ttgir: str
    sass: str

    @property
    def pipelined_loads(self) -> int:
        """Loads lowered to cp.async copies into shared memory (issued stages ahead)."""
        return self.ttgir.count("ttg.async_copy_global_to_local")

    @property
    def sync_loads_in_loops(self) -> list[str]:
        """Plain (waited-on) global loads inside a loop body: each stalls its iteration."""
        return [line.strip()[:160] for line in loop_bodies(self.ttgir)
                if re.search(r"= tt\.load ", line)]

    @property
    def exp2(self) -> int:
        return self.sass.count("MUFU.EX2")


def max_loop_depth(ttgir: str) -> int:
    """How deeply ``scf.for`` loops nest (1: no loop inside a loop). Triton software-pipelines
    only innermost loops."""
    depth, deepest, stack = 0, 0, []
    for line in ttgir.splitlines():
        opens, closes = line.count("{"), line.count("}")
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append(depth)
            deepest = max(deepest, len(stack))
        depth += opens - closes
        while stack and depth <= stack[-1]:
            stack.pop()
    return deepest


def loop_bodies(ttgir: str) -> list[str]:
    """The lines of every ``scf.for`` body (nested bodies included once)."""
    lines, depth, inside = [], 0, False
    for line in ttgir.splitlines():
        if not inside and "scf.for" in line and line.rstrip().endswith("{"):
            inside, depth = True, 1
            continue
        if inside:
            depth += line.count("{") - line.count("}")
            if depth <= 0:
                inside = False
                continue
            lines.append(line)
    return lines


def signature(fn, constants: dict) -> dict[str, str]:
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in BF16_POINTERS:
            types[name] = "*bf16"
        elif name in FP32_POINTERS:
            types[name] = "*fp32"
        elif name in INT32_POINTERS:
            types[name] = "*i32"
        elif name in FLOAT_SCALARS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def compile_sm90(fn, constants: dict, num_warps: int, num_stages: int) -> Codegen:
    """``fn`` (a ``triton.jit`` function) compiled for sm_90a with these constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = signature(fn, constants)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in sig.items() if kind.startswith("*")}
    source = ASTSource(fn=fn, signature=sig, constexprs=constants, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    workdir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sm90-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    ptx, cubin = os.path.join(workdir, "k.ptx"), os.path.join(workdir, "k.cubin")
    with open(ptx, "w") as sink:
        sink.write(kernel.asm["ptx"])
    report = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                             cubin], capture_output=True, text=True, check=True)
    info = report.stdout + report.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                          capture_output=True, text=True, check=True).stdout
    return Codegen(registers, spills, kernel.metadata.shared, kernel.asm["ttgir"], sass)


def compile_kernel(name: str, values: dict, config=None, **extra) -> Codegen:
    """VQ-attention kernel ``name`` compiled for sm_90a as its launcher would run it on bf16
    inputs: the constexprs it takes drawn from ``values`` (a shape's, for every kernel), the
    forward's value tile as ``_forward_value_block`` sets it, ``config``'s tile sizes (default:
    the config used without autotuning) and ``extra`` (e.g. DK_PAIRS)."""
    import torch

    from models.vq_attention import triton as vq_triton

    fn = vq_triton._KERNELS[name]
    constants = {k: v for k, v in values.items() if k in fn.arg_names}
    if name == "fwd":
        constants["BLOCK_DV"] = vq_triton._forward_value_block(values["DV"], torch.bfloat16)
    config = config or vq_triton._default_config(name, constants)
    constants.update(config.kwargs, **extra)
    return compile_sm90(fn, constants, config.num_warps, config.num_stages)
