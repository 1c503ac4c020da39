"""DDP through torch.distributed.run on CPU (gloo): 2 processes with the global batch split
compute the same training run as 1 process with that batch; only rank 0 writes the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from harness.store import Store

REPO = Path(__file__).resolve().parent.parent
ARGS = ["train", "--model", "transformer_sdpa", "--task", "mqar", "--seq-len", "64", "--steps",
        "6", "--batch", "8", "--eval-every", "3", "--eval-batches", "1", "--test-batches", "1",
        "--set", "d_model=32", "n_layers=1", "--task-opt", "n_train=64", "n_val=16",
        "n_test=16", "--device", "cpu"]


def train(tmp_path: Path, name: str, *extra: str) -> dict:
    out, store = tmp_path / name, tmp_path / f"{name}.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "run_bench.py"), *ARGS, "--store",
                           str(store), "--out", str(out), *extra], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    frame = Store(store).dataframe("train")
    assert len(frame) == 1  # one row, from rank 0
    result = json.loads((out / "result.json").read_text())
    return result.get("result", result)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo not available")
def test_two_gloo_processes_match_one_process(tmp_path):
    single = train(tmp_path, "single")
    ddp = train(tmp_path, "ddp", "--nproc", "2")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    losses_single = [c["train_loss"] for c in single["curve"]]
    losses_ddp = [c["train_loss"] for c in ddp["curve"]]
    assert len(losses_single) == len(losses_ddp) == 6
    for step, (a, b) in enumerate(zip(losses_single, losses_ddp, strict=True), start=1):
        assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    assert abs(single["test_acc"] - ddp["test_acc"]) <= 1e-6
