"""Compile every autotune config of a Triton kernel in parallel, before the autotuner times them.

``precompile`` does it for one launch (the VQ attention's launcher calls it);
``for_every_autotuner`` for every autotuned Triton kernel the process launches, the libraries'
too (mamba-ssm's Mamba-2 kernels compiled ~130 s on a cold H100 host; the run_bench CLI turns it
on).

Triton 3.6's autotuner compiles its candidate configs one by one, lazily, inside its serial
benchmark loop (parallel compilation is still an open pull request upstream:
triton-lang/triton#9612, #11847). Compilation spends its time in LLVM and ptxas, which release
the GIL, so threads overlap it. Compiled for sm_90a on a 2-core CPU, the 8 forward configs took
5.8 s one after another and 3.2 s on 2 threads. A cold first call of the VQ attention compiles
~46 configs: LongVQ's first scaling-sweep cell took 88 s on an H100 host with 16 cores
(results/h100/session18/).

Only launches the autotuner will tune (their tuning key is not cached) are precompiled; the
kernels then come from the JIT's cache when the autotuner benchmarks them. A config that fails
to compile is left to the autotuner, which skips it as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

MAX_WORKERS = 8
DISABLE_ENV = "LONGVQ_PARALLEL_COMPILE"  # "0": compile as Triton does, one config at a time
_LAUNCH_ONLY = ("grid", "warmup")  # the keywords Autotuner.run takes besides the kernel's


def tuning_key(tuned: Any, args: tuple, kwargs: dict) -> tuple:
    """The key ``triton.runtime.autotuner.Autotuner.run`` (Triton 3.6) files a tuning under:
    the values of its key arguments, then the dtype of every tensor argument, in order."""
    named = {**dict(zip(tuned.arg_names, args, strict=False)), **kwargs}
    named = {name: value for name, value in named.items() if name in tuned.arg_names}
    key = [named[name] for name in tuned.keys if name in named]
    key += [str(value.dtype) for value in named.values() if hasattr(value, "dtype")]
    return tuple(key)


def compile_workers() -> int:
    """Threads for parallel compilation: this process's CPUs, at most MAX_WORKERS; 1 (Triton's
    own serial compiles) with LONGVQ_PARALLEL_COMPILE=0."""
    if os.environ.get(DISABLE_ENV) == "0":
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(MAX_WORKERS, cpus or 1)


def precompile(tuned: Any, args: tuple, kwargs: dict, workers: int | None = None) -> int:
    """Compile every config of autotuner ``tuned`` for this launch (``args``, ``kwargs`` as the
    launch passes them), ``workers`` at a time, when the launch will tune. Returns how many
    configs were compiled here: 0 when the key is cached, there is one config, or one worker."""
    configs = tuned.configs
    if len(configs) < 2 or tuning_key(tuned, args, kwargs) in tuned.cache:  # ~8 us a launch
        return 0
    workers = compile_workers() if workers is None else workers
    if workers < 2:
        return 0

    device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)

    def compile_one(config: Any) -> None:
        # a new thread's current CUDA device is device 0: the launch's, so that the kernels
        # land in the JIT cache of the device the autotuner times them on
        context = torch.cuda.device(device) if device is not None else contextlib.nullcontext()
        try:
            with context:
                tuned.fn.warmup(*args, grid=(1,), **kwargs, **config.all_kwargs())
        except Exception:  # noqa: BLE001 -- the autotuner compiles it again and decides
            pass

    # the first alone: it creates the JIT's per-device cache, which threads would race to make
    compile_one(configs[0])
    with ThreadPoolExecutor(min(workers, len(configs) - 1)) as pool:
        list(pool.map(compile_one, configs[1:]))
    return len(configs)


@contextlib.contextmanager
def for_every_autotuner() -> Iterator[None]:
    """While active, every ``triton.autotune`` kernel that is about to tune compiles its configs
    in parallel first (``precompile``): Triton's ``Autotuner.run`` is wrapped, and restored on
    exit. Does nothing without Triton or in its interpreter."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        yield
        return
    if os.environ.get("TRITON_INTERPRET") == "1" or compile_workers() < 2:
        yield
        return
    original = Autotuner.run

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("warmup", False):
            precompile(self, args, {k: v for k, v in kwargs.items() if k not in _LAUNCH_ONLY})
        return original(self, *args, **kwargs)

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = original
