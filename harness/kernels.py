"""Op-level benchmark: time of the VQ-attention implementations (and two reference attention
kernels) against sequence length, forward and forward + backward.

Checks the complexity claim directly: the linear ops should grow ~2x per doubling of L, the naive
op (L x L matrix) and exact attention ~4x. Before timing, each VQ implementation is compared with
the naive oracle at a small length on the same device and dtype (outputs, and the gradients when
a backward is timed); a failing implementation is reported as ``wrong`` and not timed (never
report the speed of a wrong kernel).

Implementations (``IMPLS``):
  naive, linear, linear-window, triton, triton-window, triton-split, triton-dense  VQ attention
      (models/vq_attention): the oracle, the torch linear path, the fused Triton kernels;
      "-window" = key_grad="window" (Transformer-VQ's key gradient, fully in Triton), otherwise
      key_grad="ste"; "-split": ste with the far query rows of dK in a second kernel
      (key_grad_strategy="split", what "triton" picks up to 64K); "-dense": every query row of
      dK in the dk/dv kernel;
  sdpa-flash  exact softmax attention, ``scaled_dot_product_attention`` forced to the flash
      backend (no bias, no VQ: the quadratic reference speed), CUDA only;
  fla-linear  fla's ``chunk_linear_attn`` on elu+1 features (causal only; no normaliser: the raw
      kernel), when fla imports on CUDA.

Achieved bandwidth (VQ forward rows): the bytes the op must move at least, read q, k_hat
(B H L D each), v (B H L Dv), codes (B H L, int64), the codebook (H S D) and write O (B H L Dv)
plus, for softmax, the fp32 log-sum-exp (B H L), divided by the time; ``bw_frac`` is that over
``peak_gbps`` (by device name, ``peak_bandwidth_gbps``: H100 SXM HBM3 3350 GB/s, H200 HBM3e
4800 GB/s).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.measure import free_memory, is_oom
from models.vq_attention import triton_available, vq_attention_linear, vq_attention_naive

H100_PEAK_GBPS = 3350.0
# vendor peak HBM bandwidth by a substring of torch.cuda.get_device_name (first match wins)
PEAK_GBPS_BY_DEVICE = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", H100_PEAK_GBPS),
                       ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0))


def peak_bandwidth_gbps(device_name: str) -> float | None:
    """The vendor's peak memory bandwidth of a GPU named ``device_name``, None if unknown."""
    for key, gbps in PEAK_GBPS_BY_DEVICE:
        if key in device_name:
            return gbps
    return None
MODES = ("fwd", "fwd+bwd")
# relative error (norm) vs the oracle below which an implementation is timed; float32 allows
# TF32 in torch's matmuls, half precision its rounding of weights, outputs and gradients
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}


@dataclass(frozen=True)
class OpShape:
    batch: int = 1
    heads: int = 1
    dim: int = 64
    value_dim: int = 64
    codebook_size: int = 256
    window: int = 128
    attn_fn: str = "softmax"
    causal: bool = False
    local_bias: bool = True


@dataclass(frozen=True)
class Impl:
    name: str
    vq: bool  # a VQ-attention op (checked against the oracle) or a reference kernel
    key_grad: str = "ste"
    description: str = ""
    strategy: str = "auto"  # Triton key_grad="ste": how dK over the far keys is computed


def _vq_fn(impl: str) -> Callable:
    name = IMPLS[impl].name
    if name == "naive":
        return vq_attention_naive
    if name.startswith("linear"):
        return vq_attention_linear
    from models.vq_attention.triton import vq_attention_triton

    return functools.partial(vq_attention_triton, key_grad_strategy=IMPLS[impl].strategy)


IMPLS: dict[str, Impl] = {impl.name: impl for impl in (
    Impl("naive", True, description="VQ attention, quadratic oracle"),
    Impl("linear", True, description="VQ attention, torch linear path (key_grad=ste)"),
    Impl("linear-window", True, "window", "VQ attention, torch linear path (key_grad=window)"),
    Impl("triton", True, description="VQ attention, fused Triton kernels (key_grad=ste, "
         "strategy auto: split up to 64K)"),
    Impl("triton-dense", True, description="VQ attention, Triton kernels (key_grad=ste), every "
         "query row of dK in the dk/dv kernel", strategy="dense"),
    Impl("triton-window", True, "window", "VQ attention, fused Triton kernels (key_grad=window)"),
    Impl("triton-split", True, description="VQ attention, Triton kernels (key_grad=ste), the far "
         "rows of dK in their own kernel spread over many programs", strategy="split"),
    Impl("sdpa-flash", False, description="exact softmax attention, SDPA flash backend, no bias"),
    Impl("fla-linear", False, description="fla chunk_linear_attn (elu+1 features), causal"),
)}
DEFAULT_IMPLS = {"cuda": "triton,triton-dense,triton-window,linear,sdpa-flash,fla-linear",
                 "cpu": "naive,linear"}


def _fla_kernel() -> Callable | None:
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # noqa: BLE001 - missing package or broken Triton build alike
        return None
    return chunk_linear_attn


def unavailable(impl: str, shape: OpShape, device: str) -> str | None:
    """Why ``impl`` cannot run here (None when it can)."""
    name = IMPLS[impl].name
    if name.startswith("triton"):
        if device != "cuda":
            return "needs CUDA"
        if not triton_available():
            return "triton does not import"
    if name == "sdpa-flash" and device != "cuda":
        return "flash SDPA needs CUDA"
    if name == "fla-linear":
        if device != "cuda":
            return "needs CUDA"
        if not shape.causal:
            return "fla linear attention is causal only"
        if _fla_kernel() is None:
            return "fla does not import"
    return None


def make_inputs(shape: OpShape, length: int, device: str, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    q = randn(shape.batch, shape.heads, length, shape.dim)
    codebook = randn(shape.heads, shape.codebook_size, shape.dim)
    codes = torch.randint(0, shape.codebook_size, (shape.batch, shape.heads, length),
                          generator=generator).to(device)
    k_hat = torch.gather(codebook.expand(shape.batch, -1, -1, -1), 2,
                         codes[..., None].expand(-1, -1, -1, shape.dim))
    v = randn(shape.batch, shape.heads, length, shape.value_dim)
    bias = randn(2 * shape.window - 1) * 0.1 if shape.local_bias else None
    return q, k_hat, v, codebook, codes, bias


def _differentiable(inputs: tuple) -> tuple:
    """q, k_hat, v and bias as leaves that require grad."""
    return tuple(t.detach().requires_grad_() if t is not None and i in (0, 1, 2, 5) else t
                 for i, t in enumerate(inputs))


def run_op(impl: str, inputs, shape: OpShape, backward: bool) -> torch.Tensor:
    """One call of ``impl`` (and its backward with an all-ones upstream gradient: the input
    gradients are returned by ``torch.autograd.grad``, not accumulated into ``.grad``, so the
    time holds the op's kernels and no gradient-accumulation adds)."""
    q, k_hat, v, codebook, codes, bias = inputs
    name = IMPLS[impl].name
    if IMPLS[impl].vq:
        out = _vq_fn(impl)(q, k_hat, v, codebook, codes, bias, attn_fn=shape.attn_fn,
                           causal=shape.causal, window=shape.window,
                           key_grad=IMPLS[impl].key_grad)
    elif name == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k_hat, v, is_causal=shape.causal)
    else:  # fla-linear: inputs already in fla's (B, T, H, D) layout with positive features
        out, _ = _fla_kernel()(q, k_hat, v, scale=1.0, normalize=False)
    if backward:
        leaves = [t for t in (q, k_hat, v, bias) if t is not None and t.requires_grad]
        # allow_unused: sdpa and fla read no bias
        torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    return out


def _reference_inputs(impl: str, inputs: tuple) -> tuple:
    """sdpa/fla read plain q, k, v: random keys instead of codes (fla: elu+1, (B, T, H, D))."""
    q, k_hat, v, codebook, codes, bias = inputs
    if IMPLS[impl].name == "fla-linear":
        q, k_hat, v = (t.transpose(1, 2).contiguous() for t in (q, k_hat, v))
        q, k_hat = F.elu(q) + 1.0, F.elu(k_hat) + 1.0
    return q, k_hat, v, codebook, codes, bias


def check_length(shape: OpShape) -> int:
    """L of the correctness check: several windows and Triton chunks (~256 positions)."""
    return 2 * max(256, shape.window) + 3 * shape.window + 5


def check_against_naive(impl: str, shape: OpShape, device: str, dtype: torch.dtype,
                        backward: bool) -> float:
    """Largest relative error (norm) of ``impl`` vs the oracle in float32 on the same (rounded)
    inputs at ``check_length``: the output and, with ``backward``, the gradients wrt q, k_hat, v
    and the bias (random upstream gradient)."""
    inputs = make_inputs(shape, check_length(shape), device, dtype, seed=123)
    options = dict(attn_fn=shape.attn_fn, causal=shape.causal, window=shape.window,
                   key_grad=IMPLS[impl].key_grad)
    fn = _vq_fn(impl)

    def outputs(op, tensors, upstream):
        tensors = _differentiable(tensors)
        with torch.enable_grad():
            out = op(*tensors, **options)
            if not backward:
                return [out.detach()]
            leaves = [t for i, t in enumerate(tensors) if i in (0, 1, 2, 5) and t is not None]
            return [out.detach(), *torch.autograd.grad(out, leaves, upstream.to(out.dtype))]

    generator = torch.Generator().manual_seed(7)
    upstream = torch.randn(*inputs[2].shape, generator=generator).to(device)
    reference = outputs(vq_attention_naive, tuple(
        t.float() if t is not None and t.is_floating_point() else t for t in inputs), upstream)
    result = outputs(fn, inputs, upstream)
    errors = [((r.float() - o.float()).norm() / r.float().norm().clamp_min(1e-12)).item()
              for r, o in zip(reference, result, strict=True)]
    return max(errors)


def min_bytes(shape: OpShape, length: int, dtype: torch.dtype) -> int:
    """Bytes a VQ-attention forward must move at least (module docstring)."""
    size = torch.tensor([], dtype=dtype).element_size()
    per_position = (2 * shape.dim + 2 * shape.value_dim) * size + 8
    if shape.attn_fn == "softmax":
        per_position += 4
    positions = shape.batch * shape.heads * length
    return positions * per_position + shape.heads * shape.codebook_size * shape.dim * size


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    ms_median: float
    runs: int
    peak_mem_mib: float | None
    seconds: float  # wall time of the whole cell, warm-up (compile, autotune) included


def time_op(impl: str, shape: OpShape, length: int, device: str, dtype: torch.dtype,
            backward: bool, warmup: int, repeats: int, slow_s: float = 1.0) -> Timing:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones (at least one: compiles
    and autotunes; ``_warm_up``); an op slower than ``slow_s`` a call gets 2 timed calls.

    On CUDA the timed calls run back to back, each between two CUDA events, with one
    synchronisation after the last (HARNESS.md's method): the time is the device's, not the
    host's Python and launch preamble of every call, which a synchronisation per call would
    add (~0.6 ms of a 2.9 ms forward at 32K on an H100). On CPU: perf_counter per call."""
    started = time.perf_counter()
    inputs = _reference_inputs(impl, make_inputs(shape, length, device, dtype, seed=0))
    if backward:
        inputs = _differentiable(inputs)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    context = torch.enable_grad() if backward else torch.no_grad()
    with context:
        repeats = min(repeats, 2) if _warm_up(
            lambda: run_op(impl, inputs, shape, backward), warmup, slow_s, device) else repeats
        times = (_timed_calls_cuda if device.startswith("cuda") else _timed_calls_host)(
            lambda: run_op(impl, inputs, shape, backward), repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return Timing(statistics.median(times), len(times), peak, time.perf_counter() - started)


def _warm_up(call: Callable[[], object], warmup: int, slow_s: float, device: str) -> bool:
    """``max(1, warmup)`` untimed calls; True when the op itself is slow: two calls in a row
    over ``slow_s`` (the warm-up stops there). One slow call is compile or autotune: one more
    call follows it, so that the timed calls never come right after it (call47 did, and
    reported 6.7 ms for a ~1 ms forward)."""
    calls, i, slow_in_a_row = max(1, warmup), 0, 0
    while i < calls:
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        if time.perf_counter() - start > slow_s:
            slow_in_a_row += 1
            if slow_in_a_row == 2:
                return True
            calls = max(calls, i + 2)
        else:
            slow_in_a_row = 0
        i += 1
    return False


def _timed_calls_cuda(call: Callable[[], object], repeats: int) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    call()  # untimed: while the device runs it the host queues the timed calls ahead
    for begin, end in events:
        begin.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in events]


def _timed_calls_host(call: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@dataclass
class KernelRow:
    impl: str
    mode: str  # fwd | fwd+bwd
    seq_len: int
    status: str  # ok | oom | wrong | unavailable | skipped
    ms_median: float | None = None
    runs: int = 0
    growth: float | None = None  # time(L) / time(L/2) when the previous length was measured
    rel_err_vs_naive: float | None = None  # None for the reference kernels
    gbps: float | None = None  # VQ forward rows: min_bytes / time
    bw_frac: float | None = None  # gbps / peak
    peak_mem_mib: float | None = None
    note: str = field(default="")


def benchmark(impls: Sequence[str], lengths: Sequence[int], shape: OpShape, device: str,
              dtype: torch.dtype, modes: Sequence[str] = ("fwd",), warmup: int = 2,
              repeats: int = 5, tolerance: float | None = None,
              peak_gbps: float = H100_PEAK_GBPS, cell_budget_s: float = 60.0,
              on_row: Callable[[KernelRow], None] | None = None) -> list[KernelRow]:
    """Rows per (impl, mode, L). A cell that took longer than ``cell_budget_s`` (warm-up
    included) skips the longer lengths of that impl and mode (status ``skipped``)."""
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    rows: list[KernelRow] = []

    def emit(row: KernelRow) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    for impl in impls:
        reason = unavailable(impl, shape, device)
        error, wrong = None, None
        if reason is None and IMPLS[impl].vq:
            try:
                error = check_against_naive(impl, shape, device, dtype, "fwd+bwd" in modes)
            except Exception as exc:  # noqa: BLE001 - a crashing kernel is not timed either
                if not is_oom(exc):
                    wrong = f"check failed: {type(exc).__name__}: {exc}"[:200]
            finally:
                free_memory(torch.device(device))
            if error is not None and not error <= tolerance:  # NaN is wrong too
                wrong = f"rel err {error:.1e} > {tolerance:.0e} vs naive"
        for mode in modes:
            previous: tuple[int, float] | None = None
            over_budget = False
            for length in lengths:
                row = KernelRow(impl, mode, length, "ok", rel_err_vs_naive=error)
                if reason is not None:
                    row.status, row.note = "unavailable", reason
                elif wrong is not None:
                    row.status, row.note = "wrong", wrong
                elif over_budget:
                    row.status, row.note = "skipped", f"a shorter L took > {cell_budget_s:.0f} s"
                else:
                    try:
                        timing = time_op(impl, shape, length, device, dtype, mode == "fwd+bwd",
                                         warmup, repeats)
                        row.ms_median, row.runs = timing.ms_median, timing.runs
                        row.peak_mem_mib = timing.peak_mem_mib
                        if previous and previous[0] * 2 == length:
                            row.growth = timing.ms_median / previous[1]
                        previous = (length, timing.ms_median)
                        over_budget = timing.seconds > cell_budget_s
                        if IMPLS[impl].vq and mode == "fwd":
                            row.gbps = min_bytes(shape, length, dtype) / timing.ms_median / 1e6
                            row.bw_frac = row.gbps / peak_gbps
                    except Exception as exc:  # noqa: BLE001 - a failure ends this cell only
                        # the finished rows are kept; the cell says what went wrong
                        if is_oom(exc):
                            row.status, row.note = "oom", type(exc).__name__
                        else:
                            row.status = "error"
                            row.note = f"{type(exc).__name__}: {exc}"[:200]
                        previous = None
                    finally:
                        free_memory(torch.device(device))
                emit(row)
    return rows


def rows_as_dicts(rows: Sequence[KernelRow], shape: OpShape, extra: dict) -> list[dict]:
    return [{**asdict(row), **asdict(shape), **extra} for row in rows]


def plot_rows(rows: Sequence[KernelRow], path: Path, title: str) -> Path:
    """ms vs L (log-log), one panel per mode, one line per impl; OOM as a cross on the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.6 * len(modes), 4.2), squeeze=False)
    impls = list(dict.fromkeys(r.impl for r in rows))
    palette = plt.get_cmap("tab10")
    for ax, mode in zip(axes[0], modes, strict=True):
        for index, impl in enumerate(impls):
            cells = [r for r in rows if r.impl == impl and r.mode == mode]
            ok = [r for r in cells if r.status == "ok"]
            color = palette(index % 10)
            if ok:
                ax.plot([r.seq_len for r in ok], [r.ms_median for r in ok], marker="o",
                        color=color, label=impl)
            oom = [r.seq_len for r in cells if r.status == "oom"]
            if oom:
                ax.scatter(min(oom), 1.0, marker="x", s=60, color=color, clip_on=False,
                           transform=ax.get_xaxis_transform(), label=f"{impl} OOM")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("ms (median)")
        ax.set_title(mode, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
