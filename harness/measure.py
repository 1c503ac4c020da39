"""Efficiency measurement of one cell: a model training on random tokens at one (L, batch).

Method (HARNESS.md): ``warmup`` untimed train steps (fwd + bwd + AdamW step; they also trigger
autotune/compile), then ``steps`` timed steps — CUDA events on GPU, ``perf_counter`` on CPU —
reported as median / p20 / p80 ms per step and tokens/s = batch·L / median.

Peak memory is *allocated* memory, not reserved:
- CUDA: ``synchronize(); reset_peak_memory_stats()`` before the timed steps,
  ``max_memory_allocated()`` after them. With ``cuda_graph`` the reset comes just before the
  capture instead: a graph allocates its memory (a private pool) while it is captured, and its
  replays allocate nothing, so the peak spans the capture and the replays -- the resident
  tensors plus the step's live intermediates, as in eager, without the eager warm-up steps'
  autotune and compile buffers (until 2026-12-04 the reset came before the warm-up; rows say
  which in ``peak_mem_method``).
- CPU (torch keeps no allocator statistics there): the bytes of every tensor alive before the
  step (parameters, optimizer state, batch) plus the growth of the process's resident set
  during one extra, untimed step (after returning free heap pages to the kernel). This counts
  allocator pages rather than tensor bytes, so it is an upper estimate of the same quantity.

Each cell ends ``ok``, ``oom`` (CUDA OOM, Triton out of resources, CPU allocation failure),
``diverged`` (non-finite loss) or ``error`` (any other exception, message kept; also a warm-up
step slower than ``max_step_s``, message ``too-slow: ...``, so that one pathological cell, e.g.
a sequential reference kernel at 64K, cannot eat a GPU session's budget).

``compile=True`` wraps the model's forward in ``torch.compile`` (default mode); the warm-up steps
absorb the compilation. ``cuda_graph=True`` (CUDA) captures the whole training step (forward,
backward, AdamW with ``capturable``) in one CUDA graph on the first warm-up step, after two eager
steps on a side stream (autotune, allocator), and replays it: the step then costs its GPU time,
not the launches of its ~1,000 small kernels (LongVQ at d_model 128 was launch-bound at ~30
ms/step at every L on an H200). :func:`profile_cell` runs torch.profiler over a few steps of
one cell and returns the top kernels (CUDA: by self device time) or ops (CPU: by self CPU
time).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from harness.backbone import task_loss
from harness.cpu_alloc import release_free_heap
from harness.kernel_categories import category_totals
from harness.optim import build_optimizer
from harness.registry import Entry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EfficiencyCell:
    """What one efficiency measurement is; its hash (with the model config) keys the store."""

    model: str
    seq_len: int
    batch: int
    device: str  # "cpu" | "cuda"
    dtype: str  # "fp32" | "bf16" | "fp16": autocast dtype (fp32 = no autocast)
    warmup: int = 3
    steps: int = 10
    seed: int = 0
    lr: float = 1e-3
    compile: bool = False  # torch.compile the model (recorded per row; keyed only when on)
    cuda_graph: bool = False  # replay the train step as one CUDA graph (same; CUDA only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CellOutcome:
    status: str
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class TooSlow(RuntimeError):
    """A warm-up step took longer than the cell's time limit."""


TOO_SLOW = "too-slow"  # message prefix of cells stopped by max_step_s


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    name = type(exc).__name__
    if name == "OutOfResources":  # triton.runtime.errors.OutOfResources
        return True
    text = str(exc).lower()
    return "out of memory" in text or (
        isinstance(exc, RuntimeError) and "defaultcpuallocator: can't allocate memory" in text
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; elsewhere the monotone ru_maxrss)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_step_peak_bytes(step) -> int:
    """Growth of the resident set during one call of ``step`` (CPU), sampled every ~0.5 ms.

    Free heap pages are returned to the kernel first (``malloc_trim``), so every page the step
    allocates shows up as new resident memory; with the heap tuning of harness/cpu_alloc.py the
    heap does not shrink during the step, so the last sample is close to the peak even for
    short-lived temporaries. (An exact count through torch.profiler's allocation events was
    tried first: it needs GBs for op-heavy models such as the sequential Mamba reference.)
    """
    release_free_heap()
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - base


def measure(entry: Entry, model_config: Any, cell: EfficiencyCell,
            max_step_s: float | None = None) -> CellOutcome:
    """Build the model on the cell's device and time training steps. Never raises on OOM.

    ``max_step_s``: a warm-up step after the first (which may include compile/autotune) that
    takes longer ends the cell with status ``error`` and a ``too-slow: ...`` message.
    """
    device = torch.device(cell.device)
    try:
        return _measure(entry, model_config, cell, device, max_step_s)
    except Diverged as exc:
        return CellOutcome("diverged", str(exc))
    except TooSlow as exc:
        return CellOutcome("error", str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure becomes the cell's status
        if is_oom(exc):
            return CellOutcome("oom", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return CellOutcome("error", f"{type(exc).__name__}: {exc}")
    finally:
        free_memory(device)


def compile_model(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """``torch.compile`` with its default settings (a function so tests can swap the backend).
    Dynamo's caches are reset first: each cell compiles afresh, so a sweep over lengths neither
    reuses another cell's (or a dynamic-shape) graph nor hits the recompile limit."""
    torch._dynamo.reset()
    return torch.compile(model)


def with_memory_budget(compiled: Callable[..., torch.Tensor],
                       budget: float) -> Callable[..., torch.Tensor]:
    """``compiled`` run under AOTAutograd's ``activation_memory_budget``. torch.compile traces
    and partitions (picks what the forward saves) during the calls that compile, so the setting
    is scoped to every call rather than set process-wide.

    Custom ops (our Triton and FFT kernels) are kept out of the partitioner's cheap
    recomputation passes (``is_non_builtin_to_include``): those passes treat every op that is
    not a matmul as free, so under a budget they re-ran the VQ attention forward and the FFT
    convolution in the backward. The final knapsack pass may still recompute one, weighing it
    by its FLOP formula (registered beside each op) against what it saves."""
    import torch._functorch.config as functorch_config

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        with functorch_config.patch(activation_memory_budget=budget,
                                    is_non_builtin_to_include=True):
            return compiled(*args, **kwargs)
    return forward


@dataclass
class TrainStep:
    """A built model with its optimizer and one fixed random batch; ``step()`` trains once,
    ``forward_loss()`` runs only the step's forward and loss (autocast, compiled if the cell
    is): the autograd graph a backward would walk (harness/memory_accounting.py reads it)."""

    model: Any
    tokens: torch.Tensor
    targets: torch.Tensor
    optimizer: torch.optim.Optimizer
    groups: dict[str, Any]
    step: Callable[[], torch.Tensor]
    forward_loss: Callable[[], torch.Tensor]


def build_step(entry: Entry, model_config: Any, cell: EfficiencyCell,
               device: torch.device) -> TrainStep:
    torch.manual_seed(cell.seed)
    model = entry.build(model_config).to(device)
    optimizer, groups = build_optimizer(model, lr=cell.lr, capturable=cell.cuda_graph)
    generator = torch.Generator().manual_seed(cell.seed)
    tokens = torch.randint(0, model_config.vocab_size, (cell.batch, cell.seq_len),
                           generator=generator).to(device)
    if model_config.head == "lm":
        targets = torch.roll(tokens, -1, dims=1)
    else:
        targets = torch.randint(0, model_config.n_classes, (cell.batch,),
                                generator=generator).to(device)
    autocast_dtype = DTYPES[cell.dtype]
    use_autocast = autocast_dtype != torch.float32
    model.train()
    # the loss still reads the aux losses and head kind from the plain module
    forward = compile_model(model) if cell.compile else model
    if cell.compile and model_config.activation_memory_budget < 1.0:
        forward = with_memory_budget(forward, model_config.activation_memory_budget)

    def forward_loss() -> torch.Tensor:
        ctx = (torch.autocast(device.type, dtype=autocast_dtype) if use_autocast
               else contextlib.nullcontext())
        with ctx:
            return task_loss(model, forward(tokens), targets)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss()
        loss.backward()
        optimizer.step()
        return loss.detach()

    if cell.cuda_graph:
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        step = graphed_step(step, device, before_capture=lambda: _reset_peak_memory(device))
    return TrainStep(model, tokens, targets, optimizer, groups, step, forward_loss)


def _reset_peak_memory(device: torch.device) -> None:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)


def graphed_step(step: Callable[[], torch.Tensor], device: torch.device,
                 before_capture: Callable[[], None] | None = None
                 ) -> Callable[[], torch.Tensor]:
    """``step`` replayed as one CUDA graph (PyTorch's whole-network capture recipe). The first
    call runs two eager steps on a side stream (autotuning, compilation, the allocator's
    pool), captures one step and replays it; every later call replays. The step's inputs
    (batch, parameters, optimizer state) live at fixed addresses, as the graph needs. Returns
    a copy of the loss: the graph overwrites its output on every replay. ``before_capture``
    runs after the eager steps, just before the capture (the peak-memory reset)."""
    graph: torch.cuda.CUDAGraph | None = None
    loss: torch.Tensor | None = None

    def replay() -> torch.Tensor:
        nonlocal graph, loss
        if graph is None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            if before_capture is not None:
                before_capture()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = step()
        graph.replay()
        return loss.clone()

    return replay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(entry: Entry, model_config: Any, cell: EfficiencyCell, device: torch.device,
             max_step_s: float | None = None) -> CellOutcome:
    built = build_step(entry, model_config, cell, device)
    model, optimizer, step = built.model, built.optimizer, built.step

    def check(loss: torch.Tensor, when: str) -> None:
        if not math.isfinite(loss.item()):
            raise Diverged(f"loss is {loss.item()} at {when}")

    graph_memory = device.type == "cuda" and cell.cuda_graph  # reset at the capture
    for i in range(cell.warmup):
        start_s = time.perf_counter()
        loss = step()
        _sync(device)
        took = time.perf_counter() - start_s
        check(loss, f"warm-up step {i}")
        if max_step_s is not None and i > 0 and took > max_step_s:
            raise TooSlow(f"{TOO_SLOW}: warm-up step {i} took {took:.1f} s > limit "
                          f"{max_step_s:g} s (backend {model.backend}); not timed")

    times_ms: list[float] = []
    losses: list[torch.Tensor] = []
    if device.type == "cuda":
        if graph_memory:
            torch.cuda.synchronize(device)
        else:
            _reset_peak_memory(device)
        for _ in range(cell.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize(device)
            times_ms.append(start.elapsed_time(end))
        peak_bytes = torch.cuda.max_memory_allocated(device)
    else:
        for _ in range(cell.steps):
            start_s = time.perf_counter()
            losses.append(step())
            times_ms.append((time.perf_counter() - start_s) * 1e3)
        optimizer.zero_grad(set_to_none=True)
        resident = [*model.parameters(), *model.buffers(), built.tokens, built.targets]
        resident += [t for s in optimizer.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor)]
        peak_bytes = _tensor_bytes(resident) + _cpu_step_peak_bytes(step)
    for i, loss in enumerate(losses):
        check(loss, f"timed step {i}")

    ms_median = statistics.median(times_ms)
    metrics: dict[str, Any] = {
        "backend": model.backend,
        "params": model.num_params(),
        "ms_median": ms_median,
        "ms_p20": _quantile(times_ms, 0.2),
        "ms_p80": _quantile(times_ms, 0.8),
        "tokens_per_s": cell.batch * cell.seq_len / (ms_median / 1e3),
        "peak_mem_mib": peak_bytes / 2**20,
        "peak_mem_method": ("cuda max_memory_allocated, capture + replays"
                            if graph_memory else "cuda max_memory_allocated")
        if device.type == "cuda"
        else "cpu resident tensors + resident-set growth during one step",
        "final_loss": float(losses[-1].item()) if losses else float("nan"),
        "optimizer_groups": built.groups,
    }
    metrics.update(_summarise_stats(model.layer_stats()))
    return CellOutcome("ok", "", metrics)


@dataclass
class KernelProfile:
    """What :func:`profile_cell` found: the top rows, what they rank by, the per-category
    totals of *every* kernel (``harness/kernel_categories.py``) and their sum per step."""

    rows: list[dict[str, Any]]
    what: str  # e.g. "GPU kernels by self device time"
    events: str  # what was profiled: "GPU kernels" or "operators"
    categories: list[dict[str, Any]]
    total_ms_per_step: float


def profile_cell(entry: Entry, model_config: Any, cell: EfficiencyCell,
                 top: int = 20) -> KernelProfile:
    """torch.profiler over ``cell.steps`` training steps after ``cell.warmup`` untimed ones.

    The ``top`` rows sorted by self time: on CUDA GPU kernels by self device time (user
    annotations such as ``Optimizer.step#AdamW.step`` left out: their device time is the span
    of the kernels inside them, counted again), on CPU (no kernels) operators by self CPU time.
    Times are totals over the profiled steps and per step, in ms. Errors (OOM included) raise.
    """
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(cell.device)
    try:
        built = build_step(entry, model_config, cell, device)
        for _ in range(cell.warmup):
            built.step()
        _sync(device)
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(cell.steps):
                built.step()
            _sync(device)
        events = list(prof.key_averages())
    finally:
        free_memory(device)
    on_device = device.type == "cuda"
    if on_device:
        kernels = [e for e in events if getattr(e, "device_type", None) is not None
                   and e.device_type != torch.autograd.DeviceType.CPU
                   and not getattr(e, "is_user_annotation", False)]
        events = kernels or [e for e in events if _self_device_us(e) > 0]
        self_us = _self_device_us
        what = "GPU kernels by self device time"
    else:
        def self_us(e: Any) -> float:
            return float(e.self_cpu_time_total)
        what = "operators by self CPU time (no device kernels on CPU)"
    total_us = sum(self_us(e) for e in events)
    total = total_us or 1.0
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    rows = [{"rank": i + 1, "name": e.key, "calls": int(e.count),
             "self_ms_total": self_us(e) / 1e3, "self_ms_per_step": self_us(e) / 1e3 / cell.steps,
             "self_pct": 100.0 * self_us(e) / total}
            for i, e in enumerate(ranked)]
    categories = category_totals([(e.key, int(e.count), self_us(e)) for e in events], cell.steps)
    return KernelProfile(rows, what, "GPU kernels" if on_device else "operators", categories,
                         total_us / 1e3 / cell.steps)


def _self_device_us(event: Any) -> float:
    value = getattr(event, "self_device_time_total", None)
    if value is None:  # torch < 2.4 names it after CUDA
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _summarise_stats(stats: dict[str, float]) -> dict[str, Any]:
    """Per-layer stats kept as a dict, plus the mean over layers of each stat name."""
    if not stats:
        return {}
    by_name: dict[str, list[float]] = {}
    for key, value in stats.items():
        by_name.setdefault(key.rsplit(".", 1)[-1], []).append(value)
    summary: dict[str, Any] = {"layer_stats": stats}
    for name, values in by_name.items():
        summary[name] = sum(values) / len(values)
    return summary
