"""Serial against parallel compilation of the VQ forward kernel's autotune configs for sm_90a on
this CPU, through the path the autotuner's launches take (``JITFunction.warmup``, as
models/triton_precompile.py calls it), with a stand-in CUDA driver: there is no GPU here,
and compiling needs only the target. The #9 shape (causal, bias, D = Dv = 64, S 256, W 64), bf16.

Usage (from the repository root; TRITON_ALWAYS_COMPILE=1: Triton's disk cache is not read):
    TRITON_ALWAYS_COMPILE=1 PYTHONPATH=. \
        python results/cpu-triton-sm90/precompile/precompile_cpu.py THREADS
THREADS = 1: one config after another, as Triton 3.6's autotuner compiles them.
"""

from __future__ import annotations

import sys
import time

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class StandInDriver:
    """What compiling (not launching) asks of the active driver."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


def main(workers: int) -> None:
    driver.set_active(StandInDriver())
    from models import triton_precompile as _precompile
    from models.vq_attention import triton as vq

    bh, length, dim, size, window, chunk = 8, 1024, 64, 256, 64, 128
    spec = vq._Spec(batch_heads=bh, heads=8, length=length, dim=dim, value_dim=dim, size=size,
                    window=window, chunk=chunk, attn_fn="softmax", causal=True, mode="past",
                    has_bias=True, key_grad="window", strategy="dense", cb_per_head=1)
    bf16 = {"dtype": torch.bfloat16}
    q = torch.zeros(bh, length, dim, **bf16)
    n = length // chunk
    table, stride, y0 = vq._bias_table(torch.zeros(2 * window - 1), window)
    args = (q, q.clone(), q.clone(), torch.zeros(bh, size, dim, **bf16),
            torch.zeros(bh, n, size, dim, **bf16), torch.zeros(bh, n, size), table,
            torch.zeros_like(q), torch.zeros(bh, length), length, 8, size, window, chunk, n, 1,
            dim**-0.5, 1.0 / length, spec.length_bucket, stride, y0)
    kwargs = {"HAS_BIAS": True, **spec.constants(torch.bfloat16), "BLOCK_DV": dim}
    tuned = vq._TUNED["fwd"]
    start = time.perf_counter()
    if workers == 1:
        for config in tuned.configs:
            tuned.fn.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
    else:
        _precompile.compile_configs(tuned, args, kwargs, workers=workers)
    seconds = time.perf_counter() - start
    compiled = sum(len(caches[0]) for caches in tuned.fn.device_caches.values())
    print(f"{workers} thread(s): {len(tuned.configs)} configs, {compiled} kernels in the JIT "
          f"cache, {seconds:.1f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]))
