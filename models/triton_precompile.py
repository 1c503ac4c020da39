"""Compile every autotune config of a Triton kernel in parallel, before the autotuner times them.

``precompiling`` does it for one autotuned kernel (the VQ attention's kernels);
``for_every_autotuner`` for every autotuned Triton kernel the process launches, the libraries'
too (mamba-ssm's Mamba-2 kernels compiled ~130 s on a cold H100 host; every run_bench command
runs inside it).

Triton 3.6's autotuner compiles its candidate configs one by one, lazily, inside its serial
benchmark loop (parallel compilation is still an open pull request upstream:
triton-lang/triton#9612, #11847). Compilation spends its time in LLVM and ptxas, which release
the GIL, so threads overlap it. Compiled for sm_90a on a 2-core CPU, the 8 forward configs took
5.4-5.7 s one after another and 3.5 s on 2 threads (results/cpu-triton-sm90/precompile/). A
cold first call of the VQ attention compiles ~46 configs: LongVQ's first scaling-sweep cell took
88 s on an H100 host with 16 cores (results/h100/session18/).

Only launches that tune are precompiled: the hook sits where the autotuner times a config, so
a launch whose tuning is cached never reaches it. The kernels then come from the
JIT's cache when the autotuner times them. A config that fails to compile is left to the
autotuner, which skips it as before.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

MAX_WORKERS = 8
DISABLE_ENV = "LONGVQ_PARALLEL_COMPILE"  # "0": compile as Triton does, one config at a time
_LAUNCH_ONLY = ("grid", "warmup")  # the keywords Autotuner.run takes besides the kernel's


def compile_workers() -> int:
    """Threads for parallel compilation: this process's CPUs, at most MAX_WORKERS; 1 (Triton's
    own serial compiles) with LONGVQ_PARALLEL_COMPILE=0."""
    if os.environ.get(DISABLE_ENV) == "0":
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(MAX_WORKERS, cpus or 1)


def compile_configs(tuned: Any, args: tuple, kwargs: dict, workers: int | None = None,
                    configs: list | None = None) -> int:
    """Compile ``configs`` (default: all) of autotuner ``tuned`` for a launch's arguments
    (``kwargs``: the kernel's keyword arguments, no grid or warmup), ``workers`` threads at a
    time. Returns how many configs were compiled here: 0 with one config or one worker."""
    configs = list(tuned.configs if configs is None else configs)
    workers = compile_workers() if workers is None else workers
    if len(configs) < 2 or workers < 2:
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


def _precompiling_bench(bench: Callable) -> Callable:
    """``Autotuner._bench``, which times one config of a tuning, that first compiles all of the
    tuning's configs in parallel (``compile_configs``) when it is given the first of them
    (``Autotuner.run`` times the pruned configs in order, once per tuning)."""

    def first_compiles_all(self: Any, *args: Any, config: Any, **meta: Any) -> Any:
        try:  # the configs this tuning times (a library's early pruning may drop some)
            configs = self.prune_configs(meta)
        except Exception:  # noqa: BLE001 -- then leave the compiles to Triton
            configs = []
        if configs and config == configs[0]:
            compile_configs(self, args, {k: v for k, v in meta.items() if k not in _LAUNCH_ONLY},
                            configs=configs)
        return bench(self, *args, config=config, **meta)

    return first_compiles_all


def precompiling(tuned: Any) -> Any:
    """``tuned`` (a ``triton.autotune`` kernel) compiling every config of each tuning in
    parallel threads before timing them: its ``_bench`` wrapped on the instance (no other
    autotuner changes; launches that do not tune do not reach it)."""
    tuned._bench = types.MethodType(_precompiling_bench(type(tuned)._bench), tuned)
    return tuned


@contextlib.contextmanager
def for_every_autotuner() -> Iterator[None]:
    """While active, every ``triton.autotune`` kernel of the process (mamba-ssm's, fla's)
    compiles the configs of each tuning in parallel first, as ``precompiling`` does for one:
    Triton's ``Autotuner._bench`` is wrapped, and restored on exit. Does nothing without
    Triton, in its interpreter or with one worker."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        yield
        return
    if os.environ.get("TRITON_INTERPRET") == "1" or compile_workers() < 2:
        yield
        return
    bench = Autotuner._bench
    Autotuner._bench = _precompiling_bench(bench)
    try:
        yield
    finally:
        Autotuner._bench = bench
