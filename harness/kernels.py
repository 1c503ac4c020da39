"""Op-level benchmark: time of the VQ-attention implementations against sequence length.

Checks the complexity claim directly: the linear op should grow ~2x per doubling of L, the
naive op (L x L matrix) ~4x. Before timing, each implementation is compared with the naive
oracle at a small length on the same device; a failing implementation is reported as
``wrong`` and not timed (never report the speed of a wrong kernel).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from harness.measure import free_memory, is_oom
from models.vq_attention import vq_attention_linear, vq_attention_naive

IMPLS: dict[str, Callable] = {"naive": vq_attention_naive, "linear": vq_attention_linear}


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


def run_op(impl: str, inputs, shape: OpShape, backward: bool) -> torch.Tensor:
    q, k_hat, v, codebook, codes, bias = inputs
    out = IMPLS[impl](q, k_hat, v, codebook, codes, bias, attn_fn=shape.attn_fn,
                      causal=shape.causal, window=shape.window)
    if backward:
        out.backward(torch.ones_like(out))
    return out


def check_against_naive(impl: str, shape: OpShape, device: str, dtype: torch.dtype) -> float:
    """Relative error of ``impl`` vs the naive oracle (outputs) at L = 3·window + 5."""
    inputs = make_inputs(shape, 3 * shape.window + 5, device, dtype, seed=123)
    with torch.no_grad():
        ref = run_op("naive", inputs, shape, backward=False).float()
        out = run_op(impl, inputs, shape, backward=False).float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_op(impl: str, shape: OpShape, length: int, device: str, dtype: torch.dtype,
            backward: bool, warmup: int, repeats: int) -> float:
    inputs = make_inputs(shape, length, device, dtype, seed=0)
    if backward:
        inputs = tuple(t.requires_grad_() if t is not None and t.is_floating_point()
                       and i in (0, 1, 2, 5) else t for i, t in enumerate(inputs))
    times = []
    context = torch.enable_grad() if backward else torch.no_grad()
    with context:
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            run_op(impl, inputs, shape, backward)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class KernelRow:
    impl: str
    seq_len: int
    status: str
    ms_median: float | None
    growth: float | None  # time(L) / time(L/2) when the previous length was measured
    rel_err_vs_naive: float


def benchmark(impls: Sequence[str], lengths: Sequence[int], shape: OpShape, device: str,
              dtype: torch.dtype, backward: bool, warmup: int = 2, repeats: int = 5,
              tolerance: float = 1e-3, on_row: Callable[[KernelRow], None] | None = None
              ) -> list[KernelRow]:
    rows: list[KernelRow] = []
    for impl in impls:
        error = check_against_naive(impl, shape, device, dtype)
        previous: tuple[int, float] | None = None
        for length in lengths:
            if error > tolerance:
                row = KernelRow(impl, length, "wrong", None, None, error)
            else:
                try:
                    ms = time_op(impl, shape, length, device, dtype, backward, warmup, repeats)
                    growth = (ms / previous[1] if previous and previous[0] * 2 == length
                              else None)
                    row = KernelRow(impl, length, "ok", ms, growth, error)
                    previous = (length, ms)
                except Exception as exc:  # noqa: BLE001 - an OOM ends this impl's sweep only
                    if not is_oom(exc):
                        raise
                    row = KernelRow(impl, length, "oom", None, None, error)
                    previous = None
                finally:
                    free_memory(torch.device(device))
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def rows_as_dicts(rows: Sequence[KernelRow], shape: OpShape, extra: dict) -> list[dict]:
    return [{**asdict(row), **asdict(shape), **extra} for row in rows]
