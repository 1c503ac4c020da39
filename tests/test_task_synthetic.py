"""MQAR and selective copy: determinism, contract shapes, and targets checked by re-parsing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from harness.tasks import IGNORE_INDEX, TASKS, TaskConfig
from harness.tasks.mqar import sample_without_replacement


def build(name: str, seq_len: int, n: int = 64, **options):
    return TASKS.build(name, TaskConfig(seq_len=seq_len, n_train=n, n_val=n // 2, n_test=n // 2,
                                        options=options))


def take(task, split: str, batch_size: int, seed: int, k: int):
    return list(itertools.islice(task.batches(split, batch_size, seed), k))


def same(a, b) -> bool:
    return all(torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(a, b, strict=True))


CASES = [("mqar", 64, {"n_pairs": 4}), ("selective_copy", 48, {"n_tokens": 8})]


@pytest.mark.parametrize("name,seq_len,options", CASES, ids=[c[0] for c in CASES])
def test_seeded_and_contract(name, seq_len, options):
    task = build(name, seq_len, **options)
    again = build(name, seq_len, **options)
    assert task.head == "lm" and task.pad_id is None
    assert same(take(task, "train", 8, 0, 12), take(again, "train", 8, 0, 12))  # crosses epochs
    assert not same(take(task, "train", 8, 0, 3), take(task, "train", 8, 1, 3))
    # eval sets are fixed: independent of the run seed, distinct from each other
    assert same(take(task, "val", 8, 0, 4), take(again, "val", 8, 5, 4))
    assert not same(take(task, "val", 8, 0, 1), take(task, "test", 8, 0, 1))
    for tokens, targets in take(task, "train", 8, 0, 2):
        assert tokens.shape == targets.shape == (8, seq_len)
        assert tokens.dtype == targets.dtype == torch.long
        assert 0 <= tokens.min() and tokens.max() < task.vocab_size
        supervised = targets[targets != IGNORE_INDEX]
        assert 0 <= supervised.min() and supervised.max() < task.vocab_size


def test_eval_once_and_train_epochs():
    task = build("mqar", 64, n=40, n_pairs=4)
    val = list(task.batches("val", 6, 0))
    assert [len(x) for x, _ in val] == [6, 6, 6, 2]  # once over 20 examples, last batch short
    tokens, _ = task.arrays("train", 3)
    rows = torch.cat([x for x, _ in take(task, "train", 8, 3, 5)])  # exactly one epoch
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, tokens.astype(np.int64).tolist()))
    with pytest.raises(ValueError, match="split"):
        next(task.batches("dev", 4, 0))


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_targets_are_the_paired_values(random_non_queries):
    n_pairs, seq_len, vocab = 6, 96, 128
    task = build("mqar", seq_len, n_pairs=n_pairs, vocab_size=vocab,
                 random_non_queries=random_non_queries)
    tokens, targets = (torch.cat(t) for t in zip(*take(task, "train", 16, 0, 4), strict=True))
    context = 2 * n_pairs
    for row, target in zip(tokens.tolist(), targets.tolist(), strict=True):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == n_pairs and all(1 <= k < vocab // 2 for k in keys)
        assert len(set(values)) == n_pairs and all(vocab // 2 <= v < vocab for v in values)
        pairs = dict(zip(keys, values, strict=True))
        positions = [p for p, t in enumerate(target) if t != IGNORE_INDEX]
        assert len(positions) == n_pairs  # one query per key: n_pairs of L positions supervised
        assert all(p >= context and (p - context) % 2 == 0 for p in positions)
        assert sorted(row[p] for p in positions) == sorted(keys)  # every key queried once
        assert all(target[p] == pairs[row[p]] for p in positions)
        if not random_non_queries:
            assert all(row[p] == 0 for p in range(context, seq_len) if p not in positions)
    supervised = (targets != IGNORE_INDEX).float().mean().item()
    assert supervised == pytest.approx(n_pairs / seq_len)


def test_gap_sampler_matches_numpy_choice():
    """Gumbel top-k == np.random.choice(replace=False, p=p) (Zoology's sampler), per draw."""
    space, k, n, power_a = 6, 3, 20_000, 0.3
    p = np.arange(1, space + 1) ** (power_a - 1)
    p /= p.sum()
    ours = sample_without_replacement(np.random.default_rng(0), n, space, k, np.log(p))
    legacy = np.random.RandomState(0)
    ref = np.stack([legacy.choice(space, size=k, replace=False, p=p) for _ in range(n)])
    for draw in range(k):
        freq = np.bincount(ours[:, draw], minlength=space) / n
        ref_freq = np.bincount(ref[:, draw], minlength=space) / n
        np.testing.assert_allclose(freq, ref_freq, atol=0.015)
    assert all(len(set(r)) == k for r in ours.tolist())


def test_selective_copy_targets_are_data_in_order():
    m, seq_len, vocab = 8, 48, 10
    task = build("selective_copy", seq_len, n_tokens=m, vocab_size=vocab)
    for tokens, targets in take(task, "train", 16, 0, 4):
        for row, target in zip(tokens.tolist(), targets.tolist(), strict=True):
            body = row[:seq_len - m]
            data = [t for t in body if t != 0]
            assert len(data) == m and all(1 <= t <= vocab - 2 for t in data)
            assert row[seq_len - m:] == [vocab - 1] * m  # markers
            assert target[seq_len - m:] == data  # the data tokens, in order
            assert target[:seq_len - m] == [IGNORE_INDEX] * (seq_len - m)


def test_options_validation_and_describe():
    task = build("mqar", 64, n_pairs="4", power_a="0.5")  # CLI strings are coerced
    assert task.options.n_pairs == 4
    assert task.describe()["task_power_a"] == 0.5 and task.describe()["task_vocab_size"] == 256
    assert build("selective_copy", 40).describe()["task_n_tokens"] == 16
    with pytest.raises(ValueError, match="n_pair"):
        build("mqar", 64, n_pair=4)
    with pytest.raises(ValueError, match="even"):
        build("mqar", 63)
    with pytest.raises(ValueError, match="n_pairs"):
        build("mqar", 64, n_pairs=17)
    with pytest.raises(ValueError, match="vocab_size"):
        build("mqar", 64, n_pairs=8, vocab_size=16)
    with pytest.raises(ValueError, match="n_tokens"):
        build("selective_copy", 30, n_tokens=16)


@pytest.mark.parametrize("name", ["mqar", "selective_copy", "pathfinder", "lm-bytes"])
def test_tasks_without_a_file_loader_refuse_data_dir(tmp_path, name):
    """data_dir is a TaskConfig field routed around each task's own option check: a task that
    reads no files must refuse it rather than silently generate its data."""
    with pytest.raises(ValueError, match=f"task '{name}' reads no data_dir.*data_dir="):
        TASKS.build(name, TaskConfig(seq_len=1024, data_dir=str(tmp_path)))


def test_data_dir_refusal_at_the_command_line(tmp_path, capsys):
    from harness.cli import main

    code = main(["train", "--model", "longvq", "--task", "pathfinder", "--quick", "--device",
                 "cpu", "--task-opt", f"data_dir={tmp_path}", "--store", str(tmp_path / "s.db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "task 'pathfinder' reads no data_dir" in err[0]
    assert "listops" in err[0] and "text" in err[0]  # the tasks that do read one
