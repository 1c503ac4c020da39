"""Shared test fixtures: the registry's entries, tiny configs, CUDA skip marker."""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # torch.profiler chatter (profile tests)

import pytest  # noqa: E402
import torch  # noqa: E402

from harness.cpu_alloc import tune_glibc_malloc  # noqa: E402
from harness.registry import REGISTRY  # noqa: E402

tune_glibc_malloc()  # the same allocator settings as the CLI (see harness/cpu_alloc.py)

# Small enough that every entry builds, steps and measures in well under a second on CPU.
TINY_BACKBONE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 64, "n_classes": 5}

def assert_close(name: str, ref: torch.Tensor, other: torch.Tensor, ratio: float,
                 floor: float = 1e-12) -> None:
    """||ref - other|| / max(||ref||, floor) <= ratio (computed in float64), printed so a run shows
    how far off it was; ``floor`` stands in where the true value is ~0."""
    assert torch.isfinite(other).all(), f"{name}: non-finite values"
    ref, other = ref.double(), other.double()
    error = ((ref - other).norm() / ref.norm().clamp_min(floor)).item()
    print(f"{name}: relative error {error:.2e}")
    assert error <= ratio, f"{name}: relative error {error:.2e} > {ratio}"


def assert_close_max(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    """max |ref - out| / max |ref| <= tol, printed (the element-wise variant)."""
    err = (ref - out).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    print(f"{name:>12} rel err {err:.3e} (tol {tol:.0e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


CUDA_REASON = "needs CUDA"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs CUDA is also a ``gpu`` test, so ``pytest -m gpu`` (how the device
    runs them) collects all of them, also those marked with ``requires_cuda`` alone."""
    for item in items:
        if any(mark.kwargs.get("reason") == CUDA_REASON for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


def registry_entries():
    return REGISTRY.entries()


def entry_modes(entry) -> list[str]:
    """Heads an entry supports: ``cls`` when bidirectional, ``lm`` when causal."""
    return [h for h, ok in (("cls", entry.bidirectional), ("lm", entry.causal)) if ok]


def entry_head_params():
    return [
        pytest.param(entry, head, id=f"{entry.name}-{head}")
        for entry in registry_entries()
        for head in entry_modes(entry)
    ]
