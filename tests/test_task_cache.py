"""The on-disk cache of generated splits returns exactly what the generator returns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from harness.tasks import TASKS, TaskConfig
from harness.tasks._disk_cache import cache_key, load_or_build


def _rows(n: int = 5, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, 20, size=int(rng.integers(0, 9)), dtype=np.uint8) for _ in range(n)]
    return tokens, rng.integers(0, 10, size=n)


def _same(a, b) -> bool:
    same_tokens = len(a[0]) == len(b[0]) and all(
        np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))
    return same_tokens and np.array_equal(a[1], b[1])


def test_hit_returns_the_built_rows_and_skips_the_build(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVQ_CACHE_DIR", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return _rows()

    first = load_or_build({"task": "t", "seed": 0}, build)
    second = load_or_build({"task": "t", "seed": 0}, build)
    assert len(calls) == 1 and _same(first, second) and _same(first, _rows())
    load_or_build({"task": "t", "seed": 1}, build)  # another key: built again
    assert len(calls) == 2


def test_corrupt_entry_is_rebuilt_and_off_disables(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVQ_CACHE_DIR", str(tmp_path))
    load_or_build({"task": "t"}, _rows)
    (entry,) = (tmp_path / "tasks").glob("t-*.npz")
    entry.write_bytes(b"not an npz")
    assert _same(load_or_build({"task": "t"}, _rows), _rows())
    monkeypatch.setenv("LONGVQ_CACHE_DIR", "off")
    calls = []
    load_or_build({"task": "t"}, lambda: calls.append(1) or _rows())
    assert calls == [1]


def test_key_depends_on_every_param():
    base = {"task": "listops", "seed": 0, "options": {"min_length": 10}}
    assert cache_key(base) != cache_key({**base, "seed": 1})
    assert cache_key(base) != cache_key({**base, "options": {"min_length": 11}})


@pytest.mark.parametrize("split", ["train", "test"])
def test_listops_split_is_identical_with_and_without_cache(tmp_path, monkeypatch, split):
    config = TaskConfig(seq_len=96, n_train=40, n_val=8, n_test=8)  # lengths in (24, 96)
    monkeypatch.setenv("LONGVQ_CACHE_DIR", "off")
    fresh = list(itertools.islice(TASKS.build("listops", config).batches(split, 8, 3), 6))
    monkeypatch.setenv("LONGVQ_CACHE_DIR", str(tmp_path))
    TASKS.build("listops", config).batches(split, 8, 3).__next__()  # fills the cache
    cached = list(itertools.islice(TASKS.build("listops", config).batches(split, 8, 3), 6))
    assert len(fresh) == len(cached)
    for (xa, ya), (xb, yb) in zip(fresh, cached, strict=True):
        assert xa.equal(xb) and ya.equal(yb)
