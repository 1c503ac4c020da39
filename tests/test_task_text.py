"""Byte-level text task: stdlib corpus split by file, windows from their class, IMDB reader."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from harness.tasks import TASKS, TaskConfig
from harness.tasks.text import PAD_ID, STDLIB_CLASSES, VOCAB_SIZE


def build(seq_len: int = 512, n: int = 64, data_dir: str | None = None, **options):
    return TASKS.build("text", TaskConfig(seq_len=seq_len, n_train=n, n_val=n // 2,
                                          n_test=n // 2, data_dir=data_dir, options=options))


def take(task, split: str, batch_size: int, seed: int, k: int):
    return list(itertools.islice(task.batches(split, batch_size, seed), k))


def unpad(row: torch.Tensor) -> bytes:
    ids = row.tolist()
    length = ids.index(PAD_ID) if PAD_ID in ids else len(ids)
    assert all(t == PAD_ID for t in ids[length:]), "padding only at the tail"
    return bytes(ids[:length])


@pytest.fixture(scope="module")
def stdlib_task():
    return build()


def test_stdlib_split_deterministic_disjoint_complete(stdlib_task):
    task = stdlib_task
    assert task.class_names == list(STDLIB_CLASSES) and task.n_classes == len(STDLIB_CLASSES)
    assert build().split_files == task.split_files  # same files in the same splits, every build
    seen: dict[Path, str] = {}
    for split, per_class in task.split_files.items():
        for name, files in zip(task.class_names, per_class, strict=True):
            assert files, f"class {name} has no {split} file"
            assert all(f.is_relative_to(task.root / name) for f in files)
            for f in files:
                assert f not in seen, f"{f} is in {seen[f]} and {split}"
                seen[f] = split
                assert "test" not in f.relative_to(task.root).parts[:-1]


def test_stdlib_batches_contract_and_seeds(stdlib_task):
    task = stdlib_task
    assert (task.head, task.vocab_size, task.pad_id) == ("cls", VOCAB_SIZE, PAD_ID)
    first = take(task, "train", 16, 0, 4)
    tokens, labels = first[0]
    assert tokens.shape == (16, 512) and labels.shape == (16,)
    assert tokens.dtype == labels.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < VOCAB_SIZE
    train_labels = torch.cat([y for _, y in first])
    assert set(train_labels.tolist()) == set(range(task.n_classes))  # every class in train
    again = take(build(), "train", 16, 0, 4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    assert not torch.equal(take(task, "train", 16, 1, 1)[0][0], tokens)
    val_a, val_b = take(task, "val", 16, 0, 2), take(task, "val", 16, 7, 2)  # seed-independent
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val_a, val_b, strict=True))
    assert sum(len(y) for _, y in task.batches("test", 10, 0)) == 32  # once over n_test


@pytest.mark.parametrize("split", ["train", "val"])
def test_windows_come_from_their_class_files(stdlib_task, split):
    task = stdlib_task
    tokens, labels = next(task.batches(split, 16, 0))
    for row, label in zip(tokens, labels.tolist(), strict=True):
        window = unpad(row)
        assert window
        sources = [f.read_bytes() for f in task.split_files[split][label]]
        assert any(window in text for text in sources), "window not found in its class files"


def make_corpus(root: Path, classes: dict[str, int]) -> None:
    for name, n_files in classes.items():
        (root / name / "sub").mkdir(parents=True)
        for i in range(n_files):
            folder = root / name / ("sub" if i % 2 else "")
            (folder / f"f{i}.py").write_bytes(f"# {name} file {i}\n".encode() * (i + 1))
        (root / name / "notes.txt").write_text("not a corpus file")
        (root / name / "empty.py").write_text("")


def test_custom_corpus_dir(tmp_path):
    make_corpus(tmp_path, {"alpha": 4, "beta": 3, "gamma": 2})  # gamma: too few files, no class
    task = build(seq_len=64, corpus_dir=str(tmp_path))
    assert task.class_names == ["alpha", "beta"]
    assert sum(len(f) for s in task.split_files.values() for f in s) == 7  # .py, non-empty only
    tokens, labels = next(task.batches("train", 8, 0))
    for row, label in zip(tokens, labels.tolist(), strict=True):
        window = unpad(row)  # files shorter than seq_len: whole file, right-padded
        name = task.class_names[label]
        assert any(window in f.read_bytes() for f in task.split_files["train"][label])
        assert window.startswith(f"# {name}".encode())
    with pytest.raises(ValueError, match="gamma.*needs >= 3"):
        build(seq_len=64, corpus_dir=str(tmp_path), classes="alpha,gamma")


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="corpus_dir .*missing.* is not a folder"):
        build(corpus_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs >= 2"):
        build(corpus_dir=str(tmp_path))  # empty folder
    make_corpus(tmp_path, {"alpha": 3, "beta": 3})
    with pytest.raises(ValueError, match="zeta.*not found"):
        build(corpus_dir=str(tmp_path), classes="alpha,zeta")
    with pytest.raises(ValueError, match="corpus_dr"):
        build(corpus_dr=str(tmp_path))


def make_imdb(root: Path) -> dict[Path, int]:
    labels = {}
    for part in ("train", "test"):
        for label, sub in enumerate(("neg", "pos")):
            folder = root / "aclImdb" / part / sub
            folder.mkdir(parents=True)
            for i in range(3):
                path = folder / f"{i}_{7 + 3 * label}.txt"
                path.write_bytes(f"{part} {sub} review {i} <br />caf\u00e9 ".encode() * (i + 1))
                labels[path] = label
    (root / "aclImdb" / "train" / "unsup").mkdir()  # present in the release; not labelled
    return labels


def test_imdb_reader_round_trip(tmp_path):
    labels = make_imdb(tmp_path)
    seq_len = 80
    task = build(seq_len=seq_len, n=4, data_dir=str(tmp_path))
    assert (task.n_classes, task.vocab_size, task.pad_id) == (2, VOCAB_SIZE, PAD_ID)
    expected = {p.read_bytes()[:seq_len]: label for p, label in labels.items()}
    for split, count in (("test", 6), ("val", 2)):
        rows = [(unpad(x), y) for xs, ys in task.batches(split, 4, 0)
                for x, y in zip(xs, ys.tolist(), strict=True)]
        assert len(rows) == count
        assert all(expected[window] == label and b"test" in window for window, label in rows)
    tokens, ys = next(task.batches("train", 6, 0))  # one epoch = the 6 train reviews
    got = sorted((unpad(x), y) for x, y in zip(tokens, ys.tolist(), strict=True))
    want = sorted((p.read_bytes()[:seq_len], lab) for p, lab in labels.items() if "train" in str(p))
    assert got == want and tokens.shape == (6, seq_len)
    assert build(seq_len=seq_len, data_dir=str(tmp_path / "aclImdb")).files == task.files


def test_imdb_malformed(tmp_path):
    make_imdb(tmp_path)
    for path in (tmp_path / "aclImdb" / "test" / "neg").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"no test/neg/\*\.txt files; expected the aclImdb"):
        build(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="aclImdb layout"):
        build(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not both"):
        build(data_dir=str(tmp_path), corpus_dir=str(tmp_path))


def test_imdb_ignores_folders_named_like_reviews(tmp_path):
    """A folder (or dangling link) matching *.txt is no review: it is left out when the task is
    built instead of failing when the split is first read."""
    labels = make_imdb(tmp_path)
    (tmp_path / "aclImdb" / "train" / "pos" / "9_10.txt").mkdir()
    (tmp_path / "aclImdb" / "test" / "neg" / "8_1.txt").symlink_to(tmp_path / "missing")
    task = build(seq_len=32, n=4, data_dir=str(tmp_path))
    assert sorted(p for part in task.files.values() for p, _ in part) == sorted(labels)
    next(task.batches("train", 6, 0))
