"""models/triton_precompile.py: each tuning compiles all its configs in parallel threads first,
once, and launches that do not tune compile nothing. CPU only: a real ``triton.autotune``
whose kernel is never launched (a stand-in times it) and whose compiles are recorded."""

from __future__ import annotations

import threading

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
torch = pytest.importorskip("torch")

from models import triton_precompile  # noqa: E402


@triton.jit
def _scale_kernel(X, Y, N, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * SCALE, mask=offs < N)


def _autotuner(n_configs: int, compiled: list, fail_block: int | None = None):
    """An autotuner over ``_scale_kernel`` whose timing and launch are stand-ins; its compiles
    append (BLOCK, thread) to ``compiled``."""
    configs = [triton.Config({"BLOCK": 16 * 2**i}, num_warps=4) for i in range(n_configs)]
    tuned = triton.autotune(configs, key=["N"])(_scale_kernel)
    tuned._do_bench = lambda kernel_call, quantiles: [1.0, 1.0, 1.0]
    tuned.fn.run = lambda *args, **kwargs: None

    def warmup(*args, grid, **kwargs):
        assert kwargs["SCALE"] == 2 and kwargs["num_warps"] == 4 and "warmup" not in kwargs
        if kwargs["BLOCK"] == fail_block:
            raise RuntimeError("out of resources")
        compiled.append((kwargs["BLOCK"], threading.get_ident()))

    tuned.fn.warmup = warmup
    return tuned


def _launch(tuned, n: int) -> None:
    tuned[(1,)](torch.zeros(n), torch.zeros(n), n, SCALE=2)


def test_each_tuning_compiles_every_config_once_in_threads(monkeypatch):
    monkeypatch.setattr(triton_precompile, "compile_workers", lambda: 3)
    compiled = []
    tuned = triton_precompile.precompiling(_autotuner(4, compiled))
    _launch(tuned, 40)
    assert sorted(block for block, _ in compiled) == [16, 32, 64, 128]
    assert len({thread for _, thread in compiled}) >= 2
    compiled.clear()
    _launch(tuned, 40)  # tuned already: nothing compiled
    assert compiled == []
    _launch(tuned, 41)  # another key, another tuning: compiled again, once
    assert sorted(block for block, _ in compiled) == [16, 32, 64, 128]


def test_every_autotuner_of_the_process_while_active_then_triton_restored(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(triton_precompile, "compile_workers", lambda: 2)
    bench = Autotuner._bench
    compiled = []
    tuned = _autotuner(3, compiled)  # a library's kernel: not wrapped itself
    with triton_precompile.for_every_autotuner():
        _launch(tuned, 40)
    assert sorted(block for block, _ in compiled) == [16, 32, 64]
    assert Autotuner._bench is bench


def test_a_config_that_fails_to_compile_is_left_to_the_autotuner(monkeypatch):
    monkeypatch.setattr(triton_precompile, "compile_workers", lambda: 2)
    compiled = []
    tuned = triton_precompile.precompiling(_autotuner(3, compiled, fail_block=32))
    _launch(tuned, 8)
    assert sorted(block for block, _ in compiled) == [16, 64]
    assert tuned.cache  # the tuning finished


def test_parallel_compile_can_be_turned_off(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setenv("LONGVQ_PARALLEL_COMPILE", "0")
    assert triton_precompile.compile_workers() == 1
    bench = Autotuner._bench
    with triton_precompile.for_every_autotuner():
        assert Autotuner._bench is bench
    compiled = []
    _launch(triton_precompile.precompiling(_autotuner(3, compiled)), 8)
    assert compiled == []


def test_a_librarys_pruned_configs_are_not_compiled(monkeypatch):
    monkeypatch.setattr(triton_precompile, "compile_workers", lambda: 2)
    compiled = []
    tuned = _autotuner(4, compiled)
    tuned.early_config_prune = lambda configs, named_args, **kwargs: configs[:2]
    triton_precompile.precompiling(tuned)
    _launch(tuned, 8)
    assert sorted(block for block, _ in compiled) == [16, 32]


def test_the_vq_kernels_tune_each_config_briefly(monkeypatch):
    """Each VQ kernel's tuning times a config for TUNE_WARMUP_MS + TUNE_REP_MS (Triton's default
    25 + 100 ms made a LongVQ cell's retuning ~5 s at every new length of a sweep)."""
    import triton.testing

    from models.vq_attention import triton as vq

    seen = []
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, quantiles: seen.append((warmup, rep)) or [1.0])
    for tuned in vq._TUNED.values():
        tuned.do_bench(lambda: None, quantiles=(0.5,))
    assert seen == [(vq.TUNE_WARMUP_MS, vq.TUNE_REP_MS)] * len(vq._TUNED)
    assert vq.TUNE_REP_MS < 100
