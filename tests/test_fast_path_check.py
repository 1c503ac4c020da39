"""The fast-path check (harness/fast_path_check.py): a model's fast kernels against its reference
before a cell is timed. A test entry whose "fast" path can be made wrong on demand shows that a
wrong kernel is never timed; the real entries show that their references build, load the same
weights and agree (CPU here; CUDA, with the optional kernels, in the gpu test)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from torch import nn

from harness.backbone import PreNormBlock, SequenceModel
from harness.cli import main
from harness.config import ModelConfig
from harness.fast_path_check import CHECK_LENGTH, FastPathChecks, reference_of
from harness.registry import REGISTRY, Registry
from harness.store import Store
from models.ssm import CHUNKED_MIN_LENGTH
from tests.conftest import requires_cuda

ENTRY = "fast_path_test"
TINY_BACKBONE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ffn": 64}


@dataclass
class PathConfig(ModelConfig):
    impl: str = "fast"  # fast | wrong | reference


class PathMixer(nn.Module):
    """x W^T + b, by a fused addmm ("fast"), by a matmul and an add ("reference"), or off by 30 %
    ("wrong": a kernel bug)."""

    def __init__(self, cfg: PathConfig) -> None:
        super().__init__()
        self.impl = cfg.impl
        self.backend = f"test-{cfg.impl}"
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference":
            return x @ self.proj.weight.T + self.proj.bias
        out = torch.addmm(self.proj.bias, x.flatten(0, 1), self.proj.weight.T).view_as(x)
        return out * 1.3 if self.impl == "wrong" else out


@pytest.fixture
def path_model():
    builds = []

    def build(cfg: PathConfig) -> SequenceModel:
        builds.append(cfg.impl)
        return SequenceModel(cfg, lambda c, _i: PreNormBlock(c, PathMixer(c)))

    REGISTRY.discover()
    REGISTRY.register(ENTRY, family="test", config=PathConfig,
                      reference={"impl": "reference"})(build)
    yield builds
    REGISTRY._entries.pop(ENTRY, None)


def efficiency(tmp_path, impl: str, *extra: str) -> pd.DataFrame:
    store = tmp_path / "b.db"
    assert main(["efficiency", "--models", f"{ENTRY}[impl={impl}]", "--lengths", "16,32",
                 "--batch", "2", "--device", "cpu", "--warmup", "1", "--steps", "1", "--set",
                 *[f"{k}={v}" for k, v in TINY_BACKBONE.items()], "--store", str(store),
                 *extra]) == 0
    return Store(str(store)).dataframe("efficiency").sort_values("seq_len")


def test_a_passing_fast_path_is_timed_and_says_so(tmp_path, path_model, capsys):
    frame = efficiency(tmp_path, "fast")
    assert list(frame["status"]) == ["ok", "ok"] and frame["ms_median"].notna().all()
    assert set(frame["check"]) == {"passed"} and (frame["check_rel_err"] < 1e-5).all()
    assert set(frame["check_reference"]) == {f"{ENTRY} reference (test-reference)"}
    # one check per length below CHECK_LENGTH, each one layer: fast and reference built once
    assert path_model.count("reference") == 2
    assert "fast-path check on cpu fp32 at L=16" in capsys.readouterr().out


def test_a_wrong_fast_path_is_not_timed(tmp_path, path_model):
    frame = efficiency(tmp_path, "wrong")
    assert list(frame["status"]) == ["wrong", "wrong"]
    assert "ms_median" not in frame and set(frame["check"]) == {"failed"}
    assert set(frame["backend"]) == {"test-wrong"}
    assert frame["message"].str.contains("fast path failed its check, not timed").all()
    assert (frame["check_rel_err"] > 0.1).all()
    # not final: a rerun checks again (and, the kernel fixed, would time it)
    before = len(path_model)
    efficiency(tmp_path, "wrong")
    assert len(path_model) > before


def test_skip_check_times_without_checking(tmp_path, path_model):
    frame = efficiency(tmp_path, "wrong", "--skip-check")
    assert list(frame["status"]) == ["ok", "ok"] and set(frame["check"]) == {"skipped"}
    assert "reference" not in path_model


def test_a_check_that_cannot_run_is_an_error_row(tmp_path, path_model, monkeypatch):
    import harness.fast_path_check as module

    def broken(*args, **kwargs):
        raise RuntimeError("reference kernel missing")

    monkeypatch.setattr(module, "compare", broken)
    frame = efficiency(tmp_path, "fast")
    assert set(frame["status"]) == {"error"} and "ms_median" not in frame
    assert frame["message"].str.startswith("fast-path check: RuntimeError").all()


def test_checks_are_cached_per_config_and_length(path_model):
    checks = FastPathChecks()
    entry = REGISTRY.get(ENTRY)
    cfg = entry.make_config(**TINY_BACKBONE)
    for length in (500, 1000, 2000):  # all checked at CHECK_LENGTH: one check
        assert checks.check(entry, cfg, length, "cpu", "fp32", False).status == "passed"
    assert path_model.count("reference") == 1 and len(checks.results) == 1
    assert checks.check(entry, cfg.replace(d_model=16), 500, "cpu", "fp32", False).length \
        == CHECK_LENGTH
    assert path_model.count("reference") == 2


def test_registering_a_bad_reference_fails():
    registry = Registry(packages=())
    with pytest.raises(ValueError, match="reference field 'imp'"):
        registry.register("x", family="test", config=PathConfig, reference={"imp": "ref"})
    with pytest.raises(ValueError, match="not both"):
        registry.register("x", family="test", config=PathConfig, reference={"impl": "ref"},
                          reference_entry="y")


@pytest.mark.parametrize("name", ["longvq", "s4d"])
def test_auto_choices_are_pinned_to_the_timed_length(name):
    """S4D's "auto" conv at the cell's length and device, so the check runs the timed path."""
    entry = REGISTRY.get(name)
    cfg = entry.make_config()
    compiled_from = CHUNKED_MIN_LENGTH["compiled"]
    assert cfg.resolved_for(compiled_from, "cuda", True).ssm_conv == "chunked"
    assert cfg.resolved_for(compiled_from, "cuda", False).ssm_conv == "fft"
    assert cfg.resolved_for(1 << 20, "cpu", True).ssm_conv == "fft"
    assert cfg.replace(ssm_conv="fft").resolved_for(1 << 20, "cuda", True).ssm_conv == "fft"
    pinned = cfg.resolved_for(compiled_from, "cuda", True)
    assert reference_of(entry, pinned)[1].ssm_conv == "fft"  # chunked vs the FFT


def _check_every_entry(device: str, dtype: str, names: list[str]) -> dict[str, str]:
    checks = FastPathChecks()
    statuses = {}
    for name in names:
        entry = REGISTRY.get(name)
        overrides = dict(TINY_BACKBONE) if entry.bidirectional else {**TINY_BACKBONE,
                                                                       "head": "lm"}
        result = checks.check(entry, entry.make_config(**overrides), 96, device, dtype, False)
        assert result.status in {"passed", "reference", "none"}, (name, result)
        statuses[name] = result.status
    return statuses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_entry_passes_its_check_on_cpu(dtype):
    statuses = _check_every_entry("cpu", dtype, REGISTRY.names())
    # the torch fast paths that run on CPU are checked; the references have nothing to check
    assert statuses["longvq"] == statuses["transformer_vq"] == "passed"
    assert statuses["transformer_sdpa"] == "passed"
    assert statuses["transformer_vanilla"] == statuses["mega"] == "none"


@requires_cuda
@pytest.mark.gpu
def test_every_entry_passes_its_check_on_cuda():
    """The tolerances hold for the CUDA kernels (Triton VQ attention, mamba-ssm, fla, SDPA) in
    the dtype the bench times, bf16. mamba2 is left out: its Triton kernels compile for ~2 min
    on a first call (its own tests compare them)."""
    names = [n for n in REGISTRY.names() if n != "mamba2"]
    statuses = _check_every_entry("cuda", "bf16", names)
    assert statuses["longvq"] == statuses["transformer_sdpa"] == "passed"


def test_an_efficiency_sweep_checks_each_config_once(tmp_path, path_model):
    store = str(tmp_path / "b.db")
    assert main(["sweep", "--model", ENTRY, "--grid", "steps=1,2", "--kind", "efficiency",
                 "--device", "cpu", "--set", "seq_len=16", "batch=2", "warmup=1", "d_model=16",
                 "n_layers=1", "n_heads=2", "d_ffn=32", "--store", store]) == 0
    frame = Store(store).dataframe("efficiency")
    assert len(frame) == 2 and set(frame["check"]) == {"passed"}
    assert path_model.count("reference") == 1  # the two cells share the sweep's check


def test_profile_reports_no_kernel_times_of_a_wrong_fast_path(tmp_path, path_model, capsys):
    base = ["efficiency", "--lengths", "16", "--batch", "2", "--device", "cpu", "--warmup", "1",
            "--steps", "1", "--set", *[f"{k}={v}" for k, v in TINY_BACKBONE.items()],
            "--profile-top", "3"]
    assert main([*base, "--profile", f"{ENTRY}[impl=wrong]"]) == 1
    out = capsys.readouterr().out
    assert "fast path failed its check, not timed" in out and "self ms" not in out
    assert main([*base, "--profile", f"{ENTRY}[impl=fast]"]) == 0
    assert "passed, max rel err" in capsys.readouterr().out
