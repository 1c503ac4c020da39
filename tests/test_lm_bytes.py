"""Byte-level LM task (lm-bytes): corpus, split, windows, bits per byte (hand examples), errors,
the quick CLI run on the stdlib corpus, the report section, the 16K preset/sweep, and the
long-range recall probes (MQAR, selective copy) at 16K and 64K."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import build_parser, main
from harness.commands.train import build_config
from harness.presets import get_preset
from harness.registry import REGISTRY
from harness.store import Store
from harness.sweep import load_sweep_file, plan_sweep
from harness.tasks import IGNORE_INDEX, TASKS, TaskConfig
from harness.tasks.lm_bytes import (
    SEPARATOR,
    bits_per_byte,
    bucket_bpb,
    position_profile,
    profile_edges,
)
from harness.tasks.text import stdlib_dir
from harness.train import TrainConfig, build_task, evaluate, model_config, task_scores, train_cell

REPO = Path(__file__).resolve().parents[1]


def build(seq_len: int = 64, n_eval: int = 8, **options):
    return TASKS.build("lm-bytes", TaskConfig(seq_len=seq_len, n_val=n_eval, n_test=n_eval,
                                              options=options))


def make_corpus(root: Path, n_files: int = 12) -> dict[str, bytes]:
    """Files of distinct printable text (no SEPARATOR byte), some in sub-folders."""
    contents = {}
    for i in range(n_files):
        rel = f"sub{i % 3}/file{i}.txt" if i % 2 else f"file{i}.txt"
        text = "".join(f"line {j} of file {i}: {'abcdefgh'[j % 8] * (j % 5)}\n"
                       for j in range(20 + 7 * i)).encode()
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text)
        contents[rel] = text
    (root / ".hidden").mkdir()
    (root / ".hidden" / "skip.txt").write_bytes(b"never read")
    (root / "empty.txt").write_bytes(b"")
    return contents


# -- bits per byte: hand examples ------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    """A 'model' that returns the same logits for any input (for the evaluation path)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(tokens.size(0), -1, -1)


def score(task, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    tokens = torch.zeros_like(targets)
    result = evaluate(FixedLogits(logits), iter([(tokens, targets)]), 0, torch.device("cpu"),
                      "fp32")
    return {**result, **task_scores(task, result, "")}


def test_uniform_logits_are_exactly_8_bits_per_byte(tmp_path):
    make_corpus(tmp_path)
    task = build(corpus=str(tmp_path))
    targets = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
    scores = score(task, torch.zeros(1, 64, 256), targets)
    # the model's cross-entropy is float32 (ln 256 to ~1e-7); the bpb arithmetic is exact
    assert scores["bpb"] == pytest.approx(8.0, abs=1e-6)
    assert scores["bpb_buckets"] == {"0-1K": pytest.approx(8.0, abs=1e-6)}
    assert all(v == pytest.approx(8.0, abs=1e-6) for _, _, v in scores["bpb_profile"])
    n = 3 * 64
    assert bits_per_byte(n * math.log(256), n) == pytest.approx(8.0, abs=1e-12)
    uniform = np.full(64, 3 * math.log(256))
    assert bucket_bpb(uniform, np.full(64, 3.0)) == {"0-1K": pytest.approx(8.0, abs=1e-12)}


def test_two_position_hand_example(tmp_path):
    """p(target) = 1/2 at position 0 and 1/4 at position 1: (1 + 2) bits / 2 bytes = 1.5."""
    make_corpus(tmp_path)
    task = build(corpus=str(tmp_path))
    logits = torch.full((1, 2, 256), -math.inf)
    logits[0, 0, :4] = torch.log(torch.tensor([3.0, 1.0, 1.0, 1.0]))  # p(0) = 3/6
    logits[0, 1, :4] = 0.0  # p = 1/4 each
    scores = score(task, logits, torch.tensor([[0, 2]]))
    assert scores["loss"] == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert scores["bpb"] == pytest.approx(1.5, abs=1e-6)
    assert scores["position_loss"].tolist() == pytest.approx([math.log(2), math.log(4)], abs=1e-6)
    assert [v for _, _, v in scores["bpb_profile"]] == pytest.approx([1.0, 2.0], abs=1e-6)
    assert bits_per_byte(3 * math.log(2), 2) == pytest.approx(1.5)
    assert math.isnan(bits_per_byte(1.0, 0))


def test_ignored_targets_do_not_count(tmp_path):
    make_corpus(tmp_path)
    task = build(corpus=str(tmp_path))
    targets = torch.tensor([[5, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 9]])
    scores = score(task, torch.zeros(1, 3, 256), targets)
    assert scores["position_count"].tolist() == [1, 0, 2] and scores["targets"] == 3
    assert scores["bpb"] == pytest.approx(8.0)


def test_bucket_breakdown_hand_example():
    """Positions 0..1023 cost 1 bit, 1024..4095 2 bits, 4096..4999 3 bits (2 bytes each, and
    position 10 scored 4 times at 5 bits); buckets beyond the length are absent."""
    length = 5000
    bits = np.where(np.arange(length) < 1024, 1.0, np.where(np.arange(length) < 4096, 2.0, 3.0))
    count = np.full(length, 2.0)
    loss = bits * count * math.log(2)
    loss[10], count[10] = 4 * 5.0 * math.log(2), 4.0
    buckets = bucket_bpb(loss, count)
    first = (1023 * 2 * 1.0 + 4 * 5.0) / (1023 * 2 + 4)  # 1023 other positions below 1K
    assert buckets == pytest.approx({"0-1K": first, "1K-4K": 2.0, "4K-16K": 3.0})
    assert list(bucket_bpb(loss[:1024], count[:1024])) == ["0-1K"]
    assert list(bucket_bpb(loss[:1025], count[:1025])) == ["0-1K", "1K-4K"]
    long = np.ones(70_000) * math.log(2)
    assert bucket_bpb(long, np.ones(70_000)) == pytest.approx(
        {"0-1K": 1.0, "1K-4K": 1.0, "4K-16K": 1.0, "16K-64K": 1.0, "64K+": 1.0})


def test_profile_bins_partition_the_window():
    for length in (1, 2, 7, 1024, 5000, 65536):
        edges = profile_edges(length)
        assert edges[0] == 0 and edges[-1] == length
        assert all(a < b for a, b in itertools.pairwise(edges))
    assert len(profile_edges(65536)) < 80  # log-spaced: a small row in the store
    rng = np.random.default_rng(0)
    loss, count = rng.random(3000) * 4, rng.integers(1, 5, 3000).astype(float)
    profile = position_profile(loss, count)
    total = sum(v * count[int(lo):int(hi)].sum() for lo, hi, v in profile)
    assert total / count.sum() == pytest.approx(bits_per_byte(loss.sum(), count.sum()))


# -- the task ------------------------------------------------------------------------------------
def test_custom_corpus_split_windows_and_seeds(tmp_path):
    contents = make_corpus(tmp_path)
    task = build(seq_len=32, corpus=str(tmp_path))
    assert (task.head, task.vocab_size, task.n_classes, task.pad_id) == ("lm", 256, 256, None)
    split_rel = {s: sorted(p.relative_to(tmp_path).as_posix() for p in f)
                 for s, f in task.split_files.items()}
    assert sorted(sum(split_rel.values(), [])) == sorted(contents)  # no hidden, no empty file
    assert all(split_rel[s] for s in ("train", "val", "test"))
    assert build(seq_len=32, corpus=str(tmp_path)).split_files == task.split_files
    for split, files in task.split_files.items():
        expected = b"".join(p.read_bytes() + bytes([SEPARATOR]) for p in files)
        assert task.buffer(split).tobytes() == expected
        assert task.split_bytes[split] == len(expected)
    train = task.buffer("train").tobytes()
    first = list(itertools.islice(task.batches("train", 4, seed=3), 3))
    again = list(itertools.islice(task.batches("train", 4, seed=3), 3))
    other = next(task.batches("train", 4, seed=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0])
    for tokens, targets in first:
        assert tokens.shape == targets.shape == (4, 32) and tokens.dtype == torch.int64
        assert torch.equal(tokens[:, 1:], targets[:, :-1])  # next-byte targets, all scored
        for row_x, row_y in zip(tokens, targets, strict=True):
            assert bytes(row_x.tolist()) + bytes(row_y[-1:].tolist()) in train
    val = list(task.batches("val", 3, seed=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, task.batches("val", 3, seed=9),
                                                        strict=True))  # seed-independent
    offsets = task.eval_offsets("val")
    assert len(offsets) == min(8, (task.split_bytes["val"] - 1) // 32) == sum(len(b[0])
                                                                           for b in val)
    assert np.all(np.diff(offsets) >= 32)  # non-overlapping
    assert offsets[-1] + 33 <= task.split_bytes["val"]
    described = task.describe()
    assert described["task"] == "lm-bytes" and described["task_corpus"] == str(tmp_path)
    assert described["task_corpus_bytes"] == sum(task.split_bytes.values())
    only_txt = build(seq_len=32, corpus=str(tmp_path), extensions=".md,.txt")
    assert only_txt.split_files == task.split_files
    with pytest.raises(ValueError, match="has 0 non-empty files"):
        build(seq_len=32, corpus=str(tmp_path), extensions=".py")


def test_stdlib_default_corpus():
    task = build(seq_len=1024)
    assert task.root == stdlib_dir()
    files = [p for f in task.split_files.values() for p in f]
    assert len(files) > 500 and all(p.suffix == ".py" for p in files)
    assert not any(part in {"site-packages", "__pycache__"} for p in files for part in p.parts)
    assert sum(task.split_bytes.values()) > 5_000_000
    assert task.describe()["task_corpus"].startswith("cpython-")
    tokens, targets = next(task.batches("val", 2, 0))
    assert tokens.shape == (2, 1024) and torch.equal(tokens[:, 1:], targets[:, :-1])


def test_corpus_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"corpus '{missing}' is not a folder"):
        build(corpus=str(missing))
    with pytest.raises(ValueError, match=f"corpus '{tmp_path}' has 0 non-empty files"):
        build(corpus=str(tmp_path))  # empty folder
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"only one real file")
    with pytest.raises(ValueError, match="has 1 non-empty files"):
        build(corpus=str(tmp_path))
    make_corpus(tmp_path / "small", n_files=3)
    with pytest.raises(ValueError, match=r"split of corpus .* fewer than seq_len \+ 1"):
        build(seq_len=100_000, corpus=str(tmp_path / "small"))
    with pytest.raises(ValueError, match="corpos"):
        build(corpos=str(tmp_path))
    with pytest.raises(ValueError, match="corpus=DIR, not data_dir"):
        TASKS.build("lm-bytes", TaskConfig(seq_len=8, data_dir=str(tmp_path)))


def cli(tmp_path: Path, *extra: str) -> int:
    return main(["train", "--model", "transformer_sdpa", "--task", "lm-bytes", "--device", "cpu",
                 "--quick", "--store", str(tmp_path / "s.db"), *extra])


@pytest.mark.parametrize(("extra", "needle"), [
    (["--task-opt", "corpus=/no/such/dir"], "'/no/such/dir' is not a folder"),
    (["--task-opt", "corpus={empty}"], "has 0 non-empty files"),
    (["--eval-seq-len", "-1"], "eval_seq_len=-1"),
    (["--model", "test_lm_bidir_only"], "no causal mode"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, needle):
    (tmp_path / "empty").mkdir()
    sdpa = REGISTRY.get("transformer_sdpa")
    REGISTRY.register("test_lm_bidir_only", family="test", config=sdpa.config_cls,
                      causal=False)(sdpa.builder)
    try:
        code = cli(tmp_path, *[e.format(empty=tmp_path / "empty") for e in extra])
    finally:
        REGISTRY._entries.pop("test_lm_bidir_only", None)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


# -- the quick run, stored and reported ------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`train --model transformer_sdpa --task lm-bytes --quick --seq-len 1024` (40 steps x 8
    windows, the small backbone) on the stdlib corpus, also tested at 2048 (~25 s on 2 cores)."""
    root = tmp_path_factory.mktemp("lm")
    code = cli(root, "--seq-len", "1024", "--eval-seq-len", "2048", "--out", str(root / "out"))
    assert code == 0
    return root, json.loads((root / "out" / "result.json").read_text())


def test_quick_run_learns_below_8_bits_per_byte(quick_run):
    _, result = quick_run
    assert result["status"] == "ok" and result["steps_done"] == 40
    assert result["selected_by"] == "val_loss"
    val_curve = [r["val_bpb"] for r in result["curve"] if "val_bpb" in r]
    assert len(val_curve) == 2 and val_curve[-1] < val_curve[0]
    # unigram byte statistics of Python source are ~5 bits; the untrained model is ~8
    assert result["val_bpb"] < 6.5 and result["test_bpb"] < 6.5, (result["val_bpb"],
                                                                  result["test_bpb"])
    assert result["val_bpb"] == pytest.approx(result["val_loss_final"] / math.log(2))
    assert result["test_bpb"] == pytest.approx(result["test_loss"] / math.log(2))
    assert list(result["test_bpb_buckets"]) == ["0-1K"]
    assert result["eval_seq_len"] == 2048 and result["test_long_status"] == "ok"
    assert result["test_long_batch"] == 4  # 8 x 1024 tokens per batch, as in training
    assert list(result["test_long_bpb_buckets"]) == ["0-1K", "1K-4K"]
    assert result["test_long_bpb"] < 6.5
    assert result["tokens_per_s"] > 0 and result["peak_mem_mib"] > 0


def test_quick_run_row_and_report(quick_run):
    root, result = quick_run
    with Store(root / "s.db") as store:
        rows = store.records(kind="train")
    assert len(rows) == 1
    stored = json.loads(rows[0]["result"])
    assert stored["test_bpb"] == result["test_bpb"] and stored["test_long_bpb_profile"]
    assert json.loads(rows[0]["cell"])["eval_seq_len"] == 2048
    assert main(["report", "--store", str(root / "s.db"), "--out", str(root / "report")]) == 0
    text = (root / "report" / "REPORT.md").read_text()
    section = text.split("## Byte-level language modelling", 1)[1]
    assert "bpb 0-1K" in section and "bpb 1K-4K" in section
    assert f"{result['test_bpb']:.3f}" in section and f"{result['test_long_bpb']:.3f}" in section
    assert (root / "report" / "plots" / "lm_lm-bytes_position.png").stat().st_size > 5000


def test_eval_seq_len_is_keyed_only_when_set():
    base = TrainConfig(model="transformer_sdpa", task="lm-bytes", seq_len=64)
    assert "eval_seq_len" not in base.to_dict()  # keys of cells stored before it existed hold
    assert TrainConfig(model="transformer_sdpa", task="lm-bytes", seq_len=64,
                       eval_seq_len=128).to_dict()["eval_seq_len"] == 128


def test_long_eval_failure_keeps_the_cell_ok(tmp_path):
    """A model that cannot run at eval_seq_len (Mega's full attention stops at max_positions)."""
    make_corpus(tmp_path, n_files=30)
    cfg = TrainConfig(model="mega", task="lm-bytes", seq_len=32, eval_seq_len=96, steps=2,
                      batch=2, eval_every=2, eval_batches=1, test_batches=1,
                      model_overrides={"d_model": 16, "n_layers": 1, "max_positions": 64},
                      task_options={"corpus": str(tmp_path)})
    with pytest.warns(UserWarning, match="eval_seq_len=96 failed"):
        outcome = train_cell(cfg)
    assert outcome.status == "ok", outcome.message
    assert outcome.metrics["test_long_status"] == "error"
    assert "test_long_bpb" not in outcome.metrics and outcome.metrics["test_bpb"] > 0


# -- the 16K preset and sweep; long-range recall probes ------------------------------------------
def test_preset_and_sweep_at_16k():
    args = build_parser().parse_args(["train", "--model", "longvq", "--preset", "lm-bytes-16k",
                                      "--device", "cpu"])
    cfg = build_config(args)
    assert (cfg.task, cfg.seq_len, cfg.eval_seq_len) == ("lm-bytes", 16384, 65536)
    assert get_preset("lm-bytes-16k")["seq_len"] == 16384
    _, model_cfg = model_config(cfg, build_task(cfg))
    assert model_cfg.head == "lm" and model_cfg.causal  # longvq's causal mode, from the task
    cells = {}  # two sweeps (FFN width differs so that parameter counts match)
    for spec in load_sweep_file(REPO / "sweeps" / "lm_bytes_16k.toml"):
        cells.update(plan_sweep(spec, "cpu", "fp32", quick=False))  # builds tasks and configs
    assert sorted(c.model for c in cells.values()) == sorted(
        ["longvq", "transformer_vq", "ovq_attn", "transformer_sdpa", "mamba2", "linear_attn"])
    budgets = {(c.describe["steps"], c.describe["batch"], c.describe["seq_len"],
                c.describe["eval_seq_len"], c.describe["task"]) for c in cells.values()}
    assert budgets == {(300, 4, 16384, 65536, "lm-bytes")}  # one token budget for all
    params = []  # the fairness rule: parameter counts within 10 %
    for spec in load_sweep_file(REPO / "sweeps" / "lm_bytes_16k.toml"):
        for name in spec.grid["model"]:
            entry = REGISTRY.get(name)
            fields = entry.config_cls.__dataclass_fields__
            sizes = {k: v for k, v in spec.base.items() if k in fields}
            model = entry.build(entry.make_config(**sizes, head="lm", vocab_size=256,
                                                  n_classes=256))
            params.append(sum(t.numel() for t in model.parameters()))
    assert len(params) == 6 and max(params) <= 1.1 * min(params), params


@pytest.mark.parametrize(("task", "options"), [
    ("mqar", {"n_pairs": 127}),
    ("mqar", {"n_pairs": 1024, "vocab_size": 8192}),
    ("selective_copy", {"n_tokens": 1024, "vocab_size": 64}),
])
@pytest.mark.parametrize("seq_len", [16384, 65536])
def test_recall_probes_generate_at_long_lengths(task, options, seq_len):
    built = TASKS.build(task, TaskConfig(seq_len=seq_len, n_train=4, n_val=2, n_test=2,
                                         options=options))
    tokens, targets = next(built.batches("train", 2, 0))
    assert tokens.shape == (2, seq_len) and int(tokens.max()) < built.vocab_size
    n_targets = options.get("n_pairs", options.get("n_tokens"))
    assert ((targets != IGNORE_INDEX).sum(1) == n_targets).all()


def test_recall_probe_trains_at_16k():
    cfg = TrainConfig(model="linear_attn", task="mqar", seq_len=16384, steps=1, batch=1,
                      eval_every=1, eval_batches=1, test_batches=1,
                      model_overrides={"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ffn": 32},
                      task_options={"n_pairs": 64, "n_train": 2, "n_val": 1, "n_test": 1})
    outcome = train_cell(cfg)
    assert outcome.status == "ok", outcome.message
    assert outcome.metrics["test_targets"] == 64
