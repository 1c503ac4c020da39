"""models/triton_precompile.py: the autotuner's key, replicated, and which launches
compile their configs in parallel. CPU only: the kernels are never launched (a stand-in times
them) and their compilation is recorded, not run."""

from __future__ import annotations

import threading

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
torch = pytest.importorskip("torch")

from models import triton_precompile as _precompile  # noqa: E402


@triton.jit
def _copy_kernel(X, Y, N, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * SCALE, mask=offs < N)


def _autotuner(n_configs: int = 3):
    configs = [triton.Config({"BLOCK": 16 * 2**i}, num_warps=4) for i in range(n_configs)]
    tuned = triton.autotune(configs, key=["N"])(_copy_kernel)
    tuned._do_bench = lambda kernel_call, quantiles: [1.0, 1.0, 1.0]  # never launched
    tuned.fn.run = lambda *args, **kwargs: None
    return tuned


def test_tuning_key_is_the_key_the_autotuner_files_its_tuning_under():
    tuned = _autotuner()
    x, y = torch.zeros(40), torch.zeros(40, dtype=torch.float64)
    args, kwargs = (x, y, 40), {"SCALE": 2}
    tuned[(1,)](*args, **kwargs)
    assert list(tuned.cache) == [_precompile.tuning_key(tuned, args, kwargs)]
    assert _precompile.tuning_key(tuned, args, kwargs) == (40, "torch.float32", "torch.float64")
    # another N is another tuning, which the autotuner has not done
    assert _precompile.tuning_key(tuned, (x, y, 41), kwargs) not in tuned.cache


def test_precompile_compiles_every_config_once_in_threads_only_when_it_will_tune():
    tuned = _autotuner(4)
    compiled, threads = [], set()

    def warmup(*args, grid, **kwargs):
        compiled.append(kwargs["BLOCK"])
        threads.add(threading.get_ident())
        assert kwargs["SCALE"] == 2 and kwargs["num_warps"] == 4

    tuned.fn.warmup = warmup
    args, kwargs = (torch.zeros(40), torch.zeros(40), 40), {"SCALE": 2}
    assert _precompile.precompile(tuned, args, kwargs, workers=1) == 0  # nothing to overlap
    assert _precompile.precompile(tuned, args, kwargs, workers=3) == 4
    assert sorted(compiled) == [16, 32, 64, 128] and len(threads) >= 2
    tuned[(1,)](*args, **kwargs)  # tuned now: the next launch compiles nothing
    compiled.clear()
    assert _precompile.precompile(tuned, args, kwargs, workers=3) == 0 and compiled == []


def test_a_config_that_fails_to_compile_is_left_to_the_autotuner():
    tuned = _autotuner(3)

    def warmup(*args, grid, **kwargs):
        if kwargs["BLOCK"] == 32:
            raise RuntimeError("out of resources")

    tuned.fn.warmup = warmup
    assert _precompile.precompile(tuned, (torch.zeros(8), torch.zeros(8), 8), {"SCALE": 1},
                                  workers=2) == 3


def test_for_every_autotuner_precompiles_any_autotuned_kernel_and_restores_triton():
    """run_bench.py's commands run inside it: a library's autotuned kernel (here a stand-in)
    compiles all its configs before its first tuning, and Triton's Autotuner is restored after."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run
    tuned = _autotuner(3)
    compiled = []
    tuned.fn.warmup = lambda *args, grid, **kwargs: compiled.append(kwargs["BLOCK"])
    args = (torch.zeros(40), torch.zeros(40), 40)
    with _precompile.for_every_autotuner():
        tuned[(1,)](*args, SCALE=2)
        assert sorted(compiled) == [16, 32, 64] or _precompile.compile_workers() < 2
        compiled.clear()
        tuned[(1,)](*args, SCALE=2)  # tuned: nothing compiled again
        assert compiled == []
    assert Autotuner.run is original


def test_parallel_compile_can_be_turned_off(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setenv("LONGVQ_PARALLEL_COMPILE", "0")
    assert _precompile.compile_workers() == 1
    original = Autotuner.run
    with _precompile.for_every_autotuner():
        assert Autotuner.run is original
    tuned = _autotuner(3)
    tuned.fn.warmup = lambda *args, grid, **kwargs: pytest.fail("compiled")
    assert _precompile.precompile(tuned, (torch.zeros(8), torch.zeros(8), 8), {"SCALE": 1}) == 0
