"""The training loop and the `train` command on tiny test-only tasks (CPU, a few seconds each).

``test_majority`` (cls): a sequence whose label c in {0..3} fills ~35 % of the positions, the rest
uniform noise over 8 tokens — learnable by a mean-pooled model in ~100 steps.
``test_prev_token`` (lm): the target at position t is the token at t - 1, scored only at even
t >= 2 (IGNORE_INDEX elsewhere) — exercises the masked token accuracy.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

import harness.train
from harness.backbone import SequenceModel
from harness.cli import build_parser, main
from harness.commands.train import build_config
from harness.evaluate import correct_and_count
from harness.presets import PRESETS, get_preset
from harness.registry import REGISTRY
from harness.store import Store
from harness.tasks import IGNORE_INDEX, TASKS, Task
from harness.train import (
    StopTraining,
    TrainConfig,
    TrainInterrupted,
    lr_scale,
    train_cell,
)
from harness.train_runner import run_train, train_cell_key
from tests.conftest import requires_cuda

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ffn": 64}


class _SyntheticTask(Task):
    """Train batches forever; val/test a fixed number of examples; split and seed pick the data."""

    def make(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def batches(self, split, batch_size, seed):
        offset = {"train": 0, "val": 1, "test": 2}[split]
        generator = torch.Generator().manual_seed(1000 * seed + offset)
        if split == "train":
            while True:
                yield self.make(batch_size, generator)
        remaining = self.config.n_val if split == "val" else self.config.n_test
        while remaining > 0:
            yield self.make(min(batch_size, remaining), generator)
            remaining -= batch_size


class MajorityTask(_SyntheticTask):
    name, head, vocab_size, n_classes = "test_majority", "cls", 8, 4

    def make(self, batch, generator):
        labels = torch.randint(0, 4, (batch,), generator=generator)
        length = self.config.seq_len
        tokens = torch.randint(0, 8, (batch, length), generator=generator)
        planted = torch.rand(batch, length, generator=generator) < 0.35
        return torch.where(planted, labels[:, None], tokens), labels


class PrevTokenTask(_SyntheticTask):
    name, head, vocab_size, n_classes = "test_prev_token", "lm", 8, 8

    def make(self, batch, generator):
        tokens = torch.randint(0, 8, (batch, self.config.seq_len), generator=generator)
        targets = torch.roll(tokens, 1, dims=1)
        targets[:, 0] = IGNORE_INDEX
        targets[:, 1::2] = IGNORE_INDEX
        return tokens, targets


@pytest.fixture(autouse=True, scope="module")
def test_entries():
    TASKS.register("test_majority")(MajorityTask)
    TASKS.register("test_prev_token")(PrevTokenTask)
    sdpa = REGISTRY.get("transformer_sdpa")
    REGISTRY.register("test_bidir_only", family="test", config=sdpa.config_cls,
                      causal=False)(sdpa.builder)
    yield
    TASKS._factories.pop("test_majority", None)
    TASKS._factories.pop("test_prev_token", None)
    REGISTRY._entries.pop("test_bidir_only", None)


def tiny(**changes) -> TrainConfig:
    base = {"model": "transformer_sdpa", "task": "test_majority", "seq_len": 24, "steps": 150,
            "batch": 32, "lr": 3e-3, "eval_every": 50, "eval_batches": 4,
            "model_overrides": dict(TINY), "task_options": {"n_val": 128, "n_test": 128}}
    return TrainConfig(**{**base, **changes})


def test_learns_the_task_and_reports_everything():
    outcome = train_cell(tiny())
    m = outcome.metrics
    assert outcome.status == "ok", outcome.message
    assert m["val_acc_best"] >= 0.9 and m["test_acc"] >= 0.85, (m["val_acc_best"], m["test_acc"])
    assert m["steps_done"] == 150 and len(m["curve"]) == 150
    assert [r["step"] for r in m["curve"] if "val_acc" in r] == [50, 100, 150]
    assert m["curve"][-1]["train_loss"] < m["curve"][0]["train_loss"] / 3
    assert m["val_targets"] == 128 and m["test_targets"] == 128
    assert m["tokens_per_s"] > 0 and m["peak_mem_mib"] > 0 and m["params"] > 0
    assert m["backend"].startswith("sdpa") and m["optimizer_groups"]
    json.dumps(m)  # the store keeps it as JSON


def test_lm_accuracy_counts_only_scored_positions():
    m = train_cell(tiny(task="test_prev_token", seq_len=12, steps=20, eval_every=10,
                        eval_batches=10, task_options={"n_val": 20, "n_test": 20})).metrics
    assert m["val_targets"] == 20 * 5 and m["test_targets"] == 20 * 5  # t = 2, 4, 6, 8, 10
    logits = torch.full((1, 4, 3), -1.0)
    logits[0, torch.arange(4), torch.tensor([0, 1, 2, 0])] = 1.0
    targets = torch.tensor([[0, 2, IGNORE_INDEX, 0]])  # right, wrong, ignored, right
    assert [int(v) for v in correct_and_count(logits, targets)] == [2, 3]


def test_lm_task_needs_a_causal_model(tmp_path):
    cfg = tiny(model="test_bidir_only", task="test_prev_token")
    with pytest.raises(ValueError, match="no causal mode"), Store(tmp_path / "s.db") as store:
        run_train(cfg, store)
    assert train_cell(cfg).status == "error"


def test_nan_loss_is_diverged_and_keeps_the_curve(monkeypatch):
    real = harness.train.task_loss
    calls = {"n": 0}

    def nan_from_step_4(model, logits, targets):
        calls["n"] += 1
        loss = real(model, logits, targets)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(harness.train, "task_loss", nan_from_step_4)
    outcome = train_cell(tiny(steps=20))
    assert outcome.status == "diverged" and "step 4" in outcome.message
    curve = outcome.metrics["curve"]
    assert len(curve) == 4 and math.isnan(curve[-1]["train_loss"])
    assert outcome.metrics["steps_done"] == 4


def test_oom_status_keeps_the_curve(monkeypatch):
    real = SequenceModel.forward
    calls = {"n": 0}

    def oom_on_third(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, tokens)

    monkeypatch.setattr(SequenceModel, "forward", oom_on_third)
    outcome = train_cell(tiny(steps=20))
    assert outcome.status == "oom" and "OutOfMemoryError" in outcome.message
    assert len(outcome.metrics["curve"]) == 2 and outcome.metrics["params"] > 0


def test_callback_can_stop_training_as_pruned():
    def prune_at_first_eval(record):
        if "val_acc" in record:
            raise StopTraining("pruned by the test")

    outcome = train_cell(tiny(steps=20, eval_every=5), on_step=prune_at_first_eval)
    assert outcome.status == "pruned" and outcome.message == "pruned by the test"
    assert len(outcome.metrics["curve"]) == 5 and outcome.metrics["curve"][-1]["val_acc"] >= 0


def test_bad_model_config_is_an_error_status():
    outcome = train_cell(tiny(model_overrides={**TINY, "d_model": 33}))
    assert outcome.status == "error" and "d_model=33" in outcome.message


def test_memory_budget_is_rejected_for_eager_training():
    outcome = train_cell(tiny(model_overrides={**TINY, "activation_memory_budget": 0.5}))
    assert outcome.status == "error" and "activation_memory_budget=0.5" in outcome.message


def test_same_seed_same_numbers_other_seed_differs():
    def numbers(seed):
        m = train_cell(tiny(steps=30, eval_every=15, seed=seed)).metrics
        return m["curve"], m["val_acc_final"], m["test_acc"], m["final_train_loss"]

    first = numbers(0)
    assert numbers(0) == first
    assert numbers(1)[0] != first[0]


def test_lr_schedule_is_warmup_then_cosine():
    steps, frac = 100, 0.1
    scales = [lr_scale(s, steps, frac) for s in range(steps)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == scales[10] == 1.0
    assert all(b > a for a, b in zip(scales[:10], scales[1:10], strict=False))
    assert all(b < a for a, b in zip(scales[10:], scales[11:], strict=False))
    assert scales[55] == pytest.approx(0.5) and 0 < scales[-1] < 1e-3
    curve = train_cell(tiny(steps=20, eval_every=20, lr=1e-2, warmup_frac=0.25)).metrics["curve"]
    expected = [1e-2 * lr_scale(s, 20, 0.25) for s in range(20)]
    assert [r["lr"] for r in curve] == pytest.approx(expected)  # what the optimizer used


def test_batched_read_back_and_subsampled_curve(monkeypatch):
    """Losses read back every 7 steps (as on GPU) and one record per 4 steps (long runs)."""
    per_step = train_cell(tiny(steps=20, eval_every=10)).metrics["curve"]
    monkeypatch.setattr(harness.train, "CPU_SYNC_EVERY", 7)
    monkeypatch.setattr(harness.train, "MAX_CURVE_POINTS", 5)
    curve = train_cell(tiny(steps=20, eval_every=10)).metrics["curve"]
    assert [r["step"] for r in curve] == [4, 8, 10, 12, 16, 20]  # evals force a record
    losses = [r["train_loss"] for r in per_step]
    assert curve[0]["train_loss"] == pytest.approx(sum(losses[0:4]) / 4)
    assert curve[2]["train_loss"] == pytest.approx(sum(losses[8:10]) / 2)
    assert curve[2]["val_acc"] == per_step[9]["val_acc"]


def test_time_limit_stops_early_and_evaluates():
    m = train_cell(tiny(steps=50, time_limit_s=1e-9)).metrics
    assert m["stopped_early"] and m["steps_done"] == 1 and "val_acc" in m["curve"][-1]


def test_time_limit_clock_starts_after_the_first_step(monkeypatch):
    """Step 1 (one-off compiles on a GPU) takes 1 s here; a 0.5 s limit still trains all steps."""
    real_loss, calls = harness.train.task_loss, []

    def slow_first_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(harness.train, "task_loss", slow_first_step)
    m = train_cell(tiny(steps=6, eval_every=6, time_limit_s=0.5)).metrics
    assert not m["stopped_early"] and m["steps_done"] == 6


def test_store_one_row_and_rerun_skips(tmp_path):
    cfg = tiny(steps=10, eval_every=5)
    with Store(tmp_path / "s.db") as store:
        record, key = run_train(cfg, store, extra_cell={"sweep": "s1"})
        assert record is not None and record.status == "ok" and record.kind == "train"
        assert record.cell["sweep"] == "s1"  # recorded, not part of the key
        assert key == train_cell_key(cfg, harness.train_runner.device_name(torch.device("cpu")))
        again, key_again = run_train(cfg, store)
        assert again is None and key_again == key
        assert len(store.records(kind="train")) == 1
        frame = store.dataframe("train")
        assert frame.loc[0, "task"] == "test_majority" and frame.loc[0, "d_model"] == 32
        assert "git_commit" in frame and frame.loc[0, "test_acc"] >= 0
        assert train_cell_key(tiny(steps=10, eval_every=5, seed=1), "x") != train_cell_key(cfg, "x")


def test_key_is_the_resolved_config_not_the_overrides():
    cfg = tiny(steps=10)
    spelled = tiny(steps=10, model_overrides={**TINY, "dropout": 0.0,
                                              "d_model": str(TINY["d_model"])})
    assert train_cell_key(spelled, "x") == train_cell_key(cfg, "x")  # a default, a string
    changed = tiny(steps=10, model_overrides={**TINY, "dropout": 0.1})
    assert train_cell_key(changed, "x") != train_cell_key(cfg, "x")


def test_interrupt_writes_interrupted_row_and_rerun_trains(tmp_path, monkeypatch):
    real = SequenceModel.forward
    calls = {"n": 0}

    def interrupt_third(self, tokens):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, tokens)

    cfg = tiny(steps=10, eval_every=5)
    with Store(tmp_path / "s.db") as store:
        monkeypatch.setattr(SequenceModel, "forward", interrupt_third)
        with pytest.raises(TrainInterrupted):
            run_train(cfg, store)
        row = store.records(kind="train")[0]
        assert row["status"] == "interrupted" and len(json.loads(row["result"])["curve"]) == 2
        monkeypatch.setattr(SequenceModel, "forward", real)
        record, _ = run_train(cfg, store)
        assert record is not None and record.status == "ok"
        assert len(store.records(kind="train")) == 1


def test_config_validation_names_the_field():
    for change, name in [({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"batch": 0}, "batch"),
                         ({"warmup_frac": 1.0}, "warmup_frac"), ({"dtype": "fp16"}, "dtype")]:
        with pytest.raises(ValueError, match=name):
            tiny(**change).validate()


def test_presets_fill_defaults_and_flags_override():
    for name, preset in PRESETS.items():
        TrainConfig(model="transformer_sdpa", **preset).validate()
        assert get_preset(name) == preset and get_preset(name) is not preset
    args = build_parser().parse_args(["train", "--model", "transformer_sdpa", "--preset",
                                      "mqar-small", "--steps", "7", "--task-opt", "n_pairs=4",
                                      "--device", "cpu"])
    cfg = build_config(args)
    assert (cfg.task, cfg.seq_len, cfg.batch, cfg.steps) == ("mqar", 128, 64, 7)
    assert cfg.task_options == {"n_pairs": 4}
    assert get_preset("pathx-16k")["seq_len"] == 128 * 128


def cli(tmp_path, *extra: str) -> int:
    return main(["train", "--model", "transformer_sdpa", "--task", "test_majority", "--seq-len",
                 "16", "--steps", "12", "--eval-every", "6", "--device", "cpu", "--quick",
                 "--task-opt", "n_val=16", "n_test=16", "--store", str(tmp_path / "s.db"),
                 *extra])


def test_cli_trains_writes_files_and_resumes(tmp_path, capsys):
    assert cli(tmp_path, "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "val acc" in out
    lines = (tmp_path / "out" / "curve.csv").read_text().splitlines()
    assert lines[0].startswith("step,train_loss,grad_norm,lr,val_loss,val_acc")
    assert len(lines) == 1 + 12
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "ok"
    assert cli(tmp_path) == 0
    assert "already in store" in capsys.readouterr().out
    with Store(tmp_path / "s.db") as store:
        assert len(store.records(kind="train")) == 1


@pytest.mark.parametrize(("extra", "needle"), [
    (["--steps", "0"], "steps=0"),
    (["--lr", "0"], "lr=0.0"),
    (["--lr", "-1"], "lr=-1.0"),
    (["--batch", "0"], "batch=0"),
    (["--set", "oops"], "'oops'"),
    (["--set", "d_modle=3"], "'d_modle'"),
    (["--task-opt", "oops"], "'oops'"),
    (["--task-opt", "n_val=ten"], "n_val='ten'"),
    (["--model", "test_bidir_only", "--task", "test_prev_token"], "no causal mode"),
    (["--task", "nope"], "'nope'"),
    (["--model", "transformer_sdp"], "transformer_sdpa"),
    (["--preset", "listops-3k"], "listops-2k"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, needle):
    assert cli(tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_real_lm_task_plumbs_through():
    """MQAR (when its module is present): the lm head, masked targets and task options."""
    if "mqar" not in TASKS.names():
        pytest.skip("harness/tasks/mqar.py not present")
    m = train_cell(tiny(task="mqar", seq_len=64, steps=4, eval_every=2, eval_batches=1,
                        task_options={"n_pairs": 4, "n_train": 64, "n_val": 16, "n_test": 16}))
    assert m.status == "ok", m.message
    assert 0 < m.metrics["val_targets"] < 16 * 64  # only the query positions are scored


@requires_cuda
def test_cuda_bf16_trains_and_measures():
    m = train_cell(tiny(device="cuda", dtype="bf16", steps=60, eval_every=30)).metrics
    assert m["val_acc_best"] >= 0.8 and m["peak_mem_mib"] > 0
    assert m["peak_mem_method"].startswith("cuda") and m["tokens_per_s"] > 0
    assert len(m["curve"]) == 60  # losses read back in chunks of CUDA_SYNC_EVERY, none lost
