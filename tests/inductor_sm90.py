"""The Triton kernels inductor writes for a compiled LongVQ training step, compiled for sm_90a on
a machine without a GPU.

On CUDA, ``--compile`` has inductor write Triton kernels that Triton then compiles for the GPU; a
kernel Triton cannot compile fails the whole step. Session 16's H100 run failed so: a reduction
of a constant (the sum of a tensor of ones, folded by inductor) made Triton 3.6's
TritonGPURemoveLayoutConversions pass fail ("PassManager::run failed") for a one-row block of
1,024 columns. Inductor writes the same kernel bodies for ``cpu_backend="triton"``: here each is
recorded (``record_kernels``, not run) and compiled for sm_90a (``compile_for_sm90``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import types
from contextlib import ExitStack
from unittest import mock

# the block sizes each kernel is compiled with: one-row blocks (what inductor picks on CUDA for
# a reduction to a scalar, and where session 16's kernel failed) and 16-wide ones
BLOCK_VARIANTS = {"blocks-1": 1, "blocks-16": 16}
DEFAULT_MODEL = "longvq[key_grad=window]"  # the model of the GPU test that failed


class _ZerosKernel:
    """A recorded kernel's stand-in: a launch fills its outputs with zeros instead of running
    (only the code is wanted; zeros keep the step's indices valid, so its later graphs and its
    backward are still generated)."""

    def __init__(self, name: str, source: str) -> None:
        header = re.search(rf"def {name}\((.*?)\)", source).group(1)
        names = [arg.split(":")[0].strip() for arg in header.split(",")]
        self.outputs = [i for i, arg in enumerate(names)
                        if arg.startswith(("out_ptr", "in_out_ptr"))]

    def run(self, *args, **kwargs) -> None:
        for index in self.outputs:
            args[index].zero_()


def record_kernels(model: str = DEFAULT_MODEL, seq_len: int = 512) -> dict[str, str]:
    """Inductor's Triton source of every kernel of one compiled training step (forward and
    backward) of ``model`` (d_model 32, one layer, batch 2, fp32) on CPU, keyed by kernel name.
    The kernels are not run (their outputs are zeros). 2 x 512 tokens: session 16's kernel
    failed at a 1,024-wide block (it compiles at 64)."""
    import torch
    import torch._inductor.async_compile as async_compile
    import torch._inductor.config as inductor_config

    from harness.measure import EfficiencyCell, build_step
    from harness.registry import parse_model_spec

    sources: dict[str, str] = {}

    def recording_triton(self, kernel_name, source_code, device_str="cuda"):
        sources[kernel_name] = source_code
        return _ZerosKernel(kernel_name, source_code)

    spec = parse_model_spec(model)
    head = {} if spec.entry.bidirectional else {"head": "lm"}  # causal-only entries
    config = spec.entry.make_config(d_model=32, n_layers=1, n_heads=2, d_ffn=64, **head,
                                    **dict(spec.overrides))
    cell = EfficiencyCell(spec.label, seq_len, 2, "cpu", "fp32", seed=3, compile=True)
    with ExitStack() as stack:
        # no GPU driver: inductor only hashes the backend into its cache keys
        stack.enter_context(mock.patch("torch.utils._triton.triton_hash_with_backend",
                                       lambda: "sm90-on-cpu"))
        stack.enter_context(mock.patch.object(async_compile.AsyncCompile, "triton",
                                              recording_triton))
        stack.enter_context(inductor_config.patch({"cpu_backend": "triton",
                                                   "compile_threads": 1,
                                                   "fx_graph_cache": False}))
        torch._dynamo.reset()
        try:
            build_step(spec.entry, config, cell, torch.device("cpu")).step()
        finally:
            torch._dynamo.reset()
    return sources


def _capture_heuristics() -> tuple[types.SimpleNamespace, dict]:
    """A stand-in for inductor's ``triton_heuristics`` decorators that keeps their metadata."""
    captured: dict = {}

    def decorator(**kwargs):
        def wrap(fn):
            captured[fn.__name__] = kwargs
            return fn
        return wrap

    return types.SimpleNamespace(pointwise=decorator, reduction=decorator,
                                 persistent_reduction=decorator, template=decorator,
                                 split_scan=decorator, foreach=decorator,
                                 cooperative_reduction=decorator), captured


def compile_for_sm90(name: str, source: str, block: int, num_warps: int = 4) -> str | None:
    """Compile one recorded inductor kernel for sm_90a with every block constexpr = ``block``;
    None when it compiles, else the error's first line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    heuristics, captured = _capture_heuristics()
    text = source.replace("triton_helpers.set_driver_to_cpu()", "").replace(
        "@triton_heuristics.", "@_heuristics.")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(text)  # triton.jit reads the kernel's source from its file
    try:
        spec = importlib.util.spec_from_file_location(f"_inductor_{name}", handle.name)
        module = importlib.util.module_from_spec(spec)
        module._heuristics = heuristics
        spec.loader.exec_module(module)
        fn = getattr(module, name)
        meta = captured[name]["triton_meta"]
        signature = dict(meta["signature"])
        constexprs = dict(meta["constants"])
        for arg, kind in signature.items():
            if kind == "constexpr" and arg not in constexprs:
                constexprs[arg] = block
        constexprs = {(fn.arg_names.index(arg),): value for arg, value in constexprs.items()}
        attrs = meta["configs"][0] if meta.get("configs") else {}
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                     attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": 1})
        except Exception as error:  # noqa: BLE001 - the test reports it
            return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return None
    finally:
        os.unlink(handle.name)


def compile_all(sources: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """``compile_for_sm90`` of every recorded kernel at every block variant: kernel name ->
    variant -> None (compiled) or the error's first line."""
    return {name: {variant: compile_for_sm90(name, source, block)
                   for variant, block in BLOCK_VARIANTS.items()}
            for name, source in sources.items()}
