"""Reliability of the CLI: nothing lost under Ctrl-C/SIGTERM, one status per faulty cell, one
clear line per bad input, concurrent workers on one SQLite store, deterministic CPU numbers.

Invariants checked (the "Reliability" section of the README):
- interrupt (SIGINT or SIGTERM) -> exit 130, finished rows kept, the running cell stored as
  ``interrupted``; a rerun runs only what is left: every cell ends ``ok`` exactly once;
- a cell that OOMs / produces a NaN loss / raises from model code is stored as
  ``oom`` / ``diverged`` / ``error`` with its message, the other cells are ``ok`` and the command
  exits 0 (``--fail-fast``: stops at the first such cell, exit 1);
- bad input: exit code != 0, exactly one stderr line naming the bad value, no traceback;
- N workers on one store: each cell run exactly once (``LONGVQ_SWEEP_RUN_LOG``), one row each.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.backbone import PreNormBlock, SequenceModel
from harness.cli import main
from harness.config import ModelConfig
from harness.registry import REGISTRY
from harness.store import Store

REPO = Path(__file__).resolve().parent.parent
FAULTY = "reliability_faulty"  # test-only registry entry (fixture below)


def tiny(steps: int) -> list[str]:
    """Tiny mqar train cells (as in tests/test_sweep.py). One --set: a second would replace it."""
    return ["--task", "mqar", "--quick", "--device", "cpu", "--set", f"steps={steps}",
            "eval_every=1000", "d_model=16", "n_layers=1", "seq_len=64", "--task-opt",
            "n_train=16", "n_val=8", "n_test=8"]


TINY = tiny(2)
# tiny efficiency cells of the faulty model
TINY_EFF = ["--kind", "efficiency", "--device", "cpu", "--set", "batch=2", "warmup=1",
            "steps=1", "d_model=16", "n_layers=1", "n_heads=2", "d_ffn=32"]


# -- a model that fails on demand ----------------------------------------------------------------
@dataclass
class FaultyConfig(ModelConfig):
    fault: str = "none"  # none | oom | nan | error: what the mixer does in its forward


class FaultyMixer(nn.Module):
    backend = "torch-test"

    def __init__(self, cfg: FaultyConfig) -> None:
        super().__init__()
        self.fault = cfg.fault
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB "
                                         "(simulated)")
        if self.fault == "error":
            raise RuntimeError("simulated bug in model code")
        out = self.proj(x)
        return out * float("nan") if self.fault == "nan" else out


@pytest.fixture
def faulty_model():
    def build(cfg: FaultyConfig) -> SequenceModel:
        return SequenceModel(cfg, lambda c, _i: PreNormBlock(c, FaultyMixer(c)))

    REGISTRY.discover()  # discovery first, so it cannot run later and miss nothing
    REGISTRY.register(FAULTY, family="test", config=FaultyConfig)(build)
    yield FAULTY
    REGISTRY._entries.pop(FAULTY, None)


def rows(store: str, kind: str | None = None):
    return Store(store).dataframe(kind)


EXPECTED = {"none": ("ok", ""), "oom": ("oom", "OutOfMemoryError"),
            "nan": ("diverged", "loss is nan"), "error": ("error", "simulated bug")}


def check_fault_statuses(frame) -> None:
    assert len(frame) == 8 and frame["cell_key"].is_unique
    for _, row in frame.iterrows():
        status, needle = EXPECTED[row["fault"]]
        assert row["status"] == status and needle in row["message"], dict(row)


# -- 2. faults per cell --------------------------------------------------------------------------
def test_efficiency_sweep_faults_become_statuses(tmp_path, faulty_model):
    store = str(tmp_path / "s.db")
    argv = ["sweep", "--model", faulty_model, "--grid", "fault=none,oom,nan,error",
            "seq_len=16,32", *TINY_EFF, "--store", store]
    assert main(argv) == 0
    check_fault_statuses(rows(store, "efficiency"))


def test_train_sweep_faults_become_statuses(tmp_path, faulty_model):
    store = str(tmp_path / "s.db")
    argv = ["sweep", "--model", faulty_model, "--grid", "fault=none,oom,nan,error", "seed=0,1",
            *TINY, "--store", store]
    assert main(argv) == 0
    check_fault_statuses(rows(store, "train"))


def test_efficiency_fail_fast_stops_at_first_bad_cell(tmp_path, faulty_model):
    store = str(tmp_path / "s.db")
    base = ["efficiency", "--models", faulty_model, "--lengths", "16,32,48", "--batch", "2",
            "--device", "cpu", "--warmup", "1", "--steps", "1", "--set", "fault=error",
            "d_model=16", "n_layers=1", "n_heads=2", "d_ffn=32", "--store", store]
    assert main([*base, "--fail-fast"]) == 1
    assert list(rows(store)["status"]) == ["error"]
    assert main(base) == 0  # without the flag: every cell runs, each with its status
    assert list(rows(store)["status"]) == ["error"] * 3


def test_sweep_fail_fast_stops_at_first_bad_cell(tmp_path, faulty_model, capsys):
    store = str(tmp_path / "s.db")
    base = ["sweep", "--model", faulty_model, "--grid", "fault=error", "seq_len=16,32,48",
            *TINY_EFF, "--store", store]
    assert main([*base, "--fail-fast"]) == 1
    assert "Traceback" not in capsys.readouterr().err  # optuna logs no "trial failed" trace
    assert list(rows(store)["status"]) == ["error"]
    assert main(base) == 0
    assert list(rows(store)["status"]) == ["error"] * 3


def test_sweep_runs_an_error_cell_once_per_invocation(tmp_path, faulty_model, monkeypatch,
                                                     capsys):
    """The completion pass must not rerun a cell this invocation already ran (and stored as
    error); the next invocation retries it, once."""
    store, log = str(tmp_path / "s.db"), tmp_path / "ran.log"
    monkeypatch.setenv("LONGVQ_SWEEP_RUN_LOG", str(log))
    argv = ["sweep", "--model", faulty_model, "--grid", "fault=none,error", "seq_len=16",
            *TINY_EFF, "--store", store]
    assert main(argv) == 0
    counts = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert sorted(counts.values()) == [1, 1], counts
    assert sorted(rows(store)["status"]) == ["error", "ok"]
    assert "2/2" in capsys.readouterr().out  # the progress bar, not 3/2
    assert main(argv) == 0  # a rerun retries the error cell, once, and skips the ok one
    counts = Counter(line.split()[0] for line in log.read_text().splitlines())
    error_key = rows(store).set_index("status").loc["error", "cell_key"]
    assert counts[error_key] == 2 and sum(counts.values()) == 3, counts


# -- 3. bad input: one line naming the bad value, no traceback -----------------------------------
SDPA = ["--models", "transformer_sdpa"]
TRAIN = ["train", "--model", "transformer_sdpa", "--task", "listops"]
SWEEP = ["sweep", "--model", "longvq", *TINY]


def bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = [unclosed\n")
    unknown_key = tmp_path / "keys.toml"
    unknown_key.write_text('name = "x"\ngrdi = {seed = [0]}\n')
    folder = tmp_path / "folder"
    folder.mkdir()
    listops = tmp_path / "listops"  # LRA TSVs, basic_val.tsv with a non-digit target on line 3
    listops.mkdir()
    for split in ("train", "val", "test"):
        bad = "( [MIN 1 2 ] )\tx\n" if split == "val" else ""
        (listops / f"basic_{split}.tsv").write_text(f"Source\tTarget\n( [MAX 1 2 ] )\t2\n{bad}")
    return [
        (["frobnicate"], "'frobnicate'"),
        (["efficiency", "--bogus-flag"], "--bogus-flag"),
        (["efficiency", "--models", "nope"], "'nope'"),
        (["train", "--model", "nope", "--task", "mqar"], "'nope'"),
        (["train", "--model", "transformer_sdpa", "--task", "nosuchtask"], "'nosuchtask'"),
        (["train", "--model", "transformer_sdpa", "--preset", "nopreset"], "nopreset"),
        (["efficiency", *SDPA, "--lengths", "12x"], "'12x'"),
        (["efficiency", *SDPA, "--lengths", "-4"], "-4"),
        (["efficiency", *SDPA, "--batch", "0"], "--batch: 0"),
        (["efficiency", *SDPA, "--warmup", "-1"], "--warmup: -1"),
        (["efficiency", *SDPA, "--steps", "0"], "--steps: 0"),
        (["efficiency", *SDPA, "--dtype", "fp64"], "'fp64'"),
        (["efficiency", *SDPA, "--set", "oops"], "'oops'"),
        (["efficiency", *SDPA, "--set", "d_modle=3"], "'d_modle'"),
        (["efficiency", *SDPA, "--set", "n_layers=two"], "'two'"),
        (["efficiency", "--models", "longvq", "--set", "local_bias=maybe"], "'maybe'"),
        (["efficiency", *SDPA, "--store", str(folder)], "is a directory"),
        ([*TRAIN, "--steps", "0"], "steps=0"),
        ([*TRAIN, "--steps", "ten"], "'ten'"),
        ([*TRAIN, "--lr", "-1"], "lr=-1.0"),
        ([*TRAIN, "--batch", "0"], "batch=0"),
        ([*TRAIN, "--seq-len", "0"], "seq_len=0"),
        ([*TRAIN, "--warmup-frac", "1.5"], "warmup_frac=1.5"),
        ([*TRAIN, "--dtype", "fp16"], "'fp16'"),
        ([*TRAIN, "--task-opt", "n_train"], "'n_train'"),
        ([*TRAIN, "--task-opt", "n_train=lots"], "'lots'"),
        ([*SWEEP, "--grid", "seed"], "'seed'"),
        ([*SWEEP, "--grid", "seed=0,,1"], "'seed=0,,1'"),
        ([*SWEEP, "--grid", "codebok_size=1,2"], "'codebok_size'"),
        ([*SWEEP, "--grid", "batch=abc"], "'abc'"),  # not steps: SWEEP --sets it
        ([*SWEEP, "--grid", "seed=0", "--workers", "0"], "--workers: 0"),
        (["sweep", "--model", "transformer_sdpa", *TINY_EFF, "--grid", "seq_len=0,16"],
         "seq_len=0"),
        (["sweep", "--model", "transformer_sdpa", *TINY_EFF, "--grid", "dtype=fp64"], "'fp64'"),
        (["efficiency", *SDPA, "--store", "sqlite:////no/such/dir/x.db"], "cannot open"),
        (["sweep", str(tmp_path / "missing.toml")], "missing.toml"),
        (["sweep", str(bad_toml)], "invalid TOML"),
        (["sweep", str(unknown_key)], "grdi"),
        (["tune", "--model", "longvq", *TINY, "--trials", "0"], "--trials: 0"),
        (["tune", "--model", "longvq", *TINY, "--space", "lr=log:1"], "'log:1'"),
        (["report", "--store", str(tmp_path / "missing.db")], "missing.db"),
        (["tune", "--model", "longvq", *TINY, "--set", "fooo=3"], "'fooo'"),
        (["tune", "--model", "longvq", *TINY, "--space", "foo=int:1:4"], "'foo'"),
        (["tune", "--model", "longvq", *TINY, "--set", "attn_fn=foo"], "'foo'"),
        (["tune", "--model", "longvq", *TINY, "--storage", "nosuch://x"], "nosuch://x"),
        ([*SWEEP, "--grid", "codebook_size=16", "--set", "codebook_size=32"],
         "given in both --set and --grid: codebook_size"),
        ([*TRAIN, "--task-opt", f"data_dir={listops}"], "basic_val.tsv:3: expected"),
        ([*SWEEP, "--grid", "seed=0,1", "--task", "listops", "--task-opt",
          f"data_dir={listops}"], "basic_val.tsv:3: expected"),
        (["train", "--model", "longvq", "--task", "mqar", "--task-opt", f"data_dir={folder}"],
         "task 'mqar' reads no data_dir"),
    ]


def run_captured(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_input_table_one_line_no_traceback(tmp_path, capsys):
    cases = bad_cases(tmp_path)
    if torch.cuda.is_available():
        pytest.skip("the --device cuda case needs a machine without CUDA")
    cases.append((["efficiency", *SDPA, "--device", "cuda"], "--device cuda"))
    assert len(cases) >= 20
    failures = []
    for argv in cases:
        argv, needle = argv
        store = [] if "--store" in argv else ["--store", str(tmp_path / "s.db")]
        code, out, err = run_captured([*argv, *store], capsys)
        lines = err.strip().splitlines()
        if (code == 0 or len(lines) != 1 or needle not in err or "Traceback" in out + err):
            failures.append(f"{argv}: code={code} err={err!r}")
    assert not failures, "\n".join(failures)


# -- 1. interrupts -------------------------------------------------------------------------------
def count_rows(store: Path, status: str | None = None) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(store, timeout=5) as conn:
            query = "SELECT COUNT(*) FROM cells" + (" WHERE status = ?" if status else "")
            return conn.execute(query, (status,) if status else ()).fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def worker_env(log: Path) -> dict[str, str]:
    return {**os.environ, "LONGVQ_SWEEP_RUN_LOG": str(log), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_keeps_finished_rows_and_rerun_completes(tmp_path, signum):
    store, log = tmp_path / "bench.db", tmp_path / "ran.log"
    argv = [sys.executable, str(REPO / "run_bench.py"), "sweep", "--grid",
            "seed=0,1,2,3,4,5", "--model", "longvq", *tiny(60),
            "--store", str(store)]
    proc = subprocess.Popen(argv, env=worker_env(log), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while count_rows(store, "ok") < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err and "interrupted" in out, (out, err)
    finished = count_rows(store, "ok")
    assert 1 <= finished < 6
    assert count_rows(store, "running") == 0  # the running cell was marked interrupted

    rerun = subprocess.run(argv, env=worker_env(log), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    frame = rows(str(store), "train")
    assert len(frame) == 6 and frame["cell_key"].is_unique and set(frame["status"]) == {"ok"}
    runs = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert set(runs) == set(frame["cell_key"])
    assert set(runs.values()) <= {1, 2} and list(runs.values()).count(2) <= 1, runs


# -- 4. concurrency ------------------------------------------------------------------------------
def test_four_workers_24_cells_each_run_once(tmp_path):
    store, log = tmp_path / "bench.db", tmp_path / "ran.log"
    argv = [sys.executable, str(REPO / "run_bench.py"), "sweep", "--model", "longvq",
            "--grid", "seed=0,1,2,3,4,5", "codebook_size=16,32", "attn_fn=softmax,laplace",
            *TINY, "--workers", "4", "--store", str(store)]
    done = subprocess.run(argv, env=worker_env(log), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    frame = rows(str(store), "train")
    assert len(frame) == 24 and frame["cell_key"].is_unique and set(frame["status"]) == {"ok"}
    lines = log.read_text().splitlines()
    runs = Counter(line.split()[0] for line in lines)
    assert set(runs) == set(frame["cell_key"]) and set(runs.values()) == {1}, runs
    assert len({line.split()[1] for line in lines}) >= 2  # the work was shared
    assert set(frame["device_shared_by"]) == {4}  # four workers on one CPU: speeds not clean


# -- 5. determinism on CPU -----------------------------------------------------------------------
def test_efficiency_cell_final_loss_is_deterministic():
    from harness.measure import EfficiencyCell, measure

    entry = REGISTRY.get("transformer_sdpa")
    config = entry.make_config(d_model=16, n_layers=1, n_heads=2, d_ffn=32)
    cell = EfficiencyCell("transformer_sdpa", 32, 2, "cpu", "fp32", 1, 2, 0)
    first, second = measure(entry, config, cell), measure(entry, config, cell)
    assert first.status == second.status == "ok"
    assert first.metrics["final_loss"] == second.metrics["final_loss"]
    other = measure(entry, config, EfficiencyCell("transformer_sdpa", 32, 2, "cpu", "fp32", 1, 2,
                                                  1))
    assert other.metrics["final_loss"] != first.metrics["final_loss"]
