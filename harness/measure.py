"""Efficiency measurement of one cell: a model training on random tokens at one (L, batch).

Method (HARNESS.md): ``warmup`` untimed train steps (fwd + bwd + AdamW step; they also trigger
autotune/compile), then ``steps`` timed steps — CUDA events on GPU, ``perf_counter`` on CPU —
reported as median / p20 / p80 ms per step and tokens/s = batch·L / median.

Peak memory is *allocated* memory, not reserved:
- CUDA: ``synchronize(); reset_peak_memory_stats()`` before the timed steps,
  ``max_memory_allocated()`` after them.
- CPU (torch keeps no allocator statistics there): the bytes of every tensor alive before the
  step (parameters, optimizer state, batch) plus the growth of the process's resident set
  during one extra, untimed step (after returning free heap pages to the kernel). This counts
  allocator pages rather than tensor bytes, so it is an upper estimate of the same quantity.

Each cell ends ``ok``, ``oom`` (CUDA OOM, Triton out of resources, CPU allocation failure),
``diverged`` (non-finite loss) or ``error`` (any other exception, message kept).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from harness.backbone import task_loss
from harness.cpu_alloc import release_free_heap
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CellOutcome:
    status: str
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


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


def measure(entry: Entry, model_config: Any, cell: EfficiencyCell) -> CellOutcome:
    """Build the model on the cell's device and time training steps. Never raises on OOM."""
    device = torch.device(cell.device)
    try:
        return _measure(entry, model_config, cell, device)
    except Diverged as exc:
        return CellOutcome("diverged", str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure becomes the cell's status
        if is_oom(exc):
            return CellOutcome("oom", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return CellOutcome("error", f"{type(exc).__name__}: {exc}")
    finally:
        free_memory(device)


def _measure(entry: Entry, model_config: Any, cell: EfficiencyCell, device: torch.device):
    torch.manual_seed(cell.seed)
    model = entry.build(model_config).to(device)
    optimizer, groups = build_optimizer(model, lr=cell.lr)
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

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        ctx = (torch.autocast(device.type, dtype=autocast_dtype) if use_autocast
               else contextlib.nullcontext())
        with ctx:
            loss = task_loss(model, model(tokens), targets)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def check(loss: torch.Tensor, when: str) -> None:
        if not math.isfinite(loss.item()):
            raise Diverged(f"loss is {loss.item()} at {when}")

    for i in range(cell.warmup):
        check(step(), f"warm-up step {i}")

    times_ms: list[float] = []
    losses: list[torch.Tensor] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
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
        resident = [*model.parameters(), *model.buffers(), tokens, targets]
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
        "peak_mem_method": "cuda max_memory_allocated" if device.type == "cuda"
        else "cpu resident tensors + resident-set growth during one step",
        "final_loss": float(losses[-1].item()) if losses else float("nan"),
        "optimizer_groups": groups,
    }
    metrics.update(_summarise_stats(model.layer_stats()))
    return CellOutcome("ok", "", metrics)


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
