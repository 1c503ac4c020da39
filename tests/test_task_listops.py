"""ListOps task: labels against an independent evaluator, the release's text format, TSV I/O."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.tasks import TASKS, TaskConfig
from harness.tasks.listops import (
    END,
    PAD_ID,
    VOCAB,
    VOCAB_SIZE,
    ListOpsOptions,
    ListOpsTask,
    make_tree,
    median_int,
    sample_examples,
    to_string,
    tokenize,
    write_tsv,
)

FIXTURE = Path(__file__).parent / "fixtures" / "listops_small.tsv"
RELEASE_EXAMPLE = "( ( ( ( [MAX 8 ) ( ( ( [MED 3 ) 6 ) ] ) ) 8 ) ] )"


def evaluate(source: str) -> int:
    """Recursive descent over the bracket tokens, written apart from the generator's evaluation:
    it reads the text (not the tree), and uses np.median itself, as the release's to_value does."""
    words = [w for w in source.split() if w not in "()"]
    pos = 0

    def expr() -> int:
        nonlocal pos
        word = words[pos]
        pos += 1
        if word.isdigit():
            return int(word)
        assert word.startswith("["), word
        args = []
        while words[pos] != "]":
            args.append(expr())
        pos += 1
        assert len(args) >= 2, source
        return {"[MAX": max, "[MIN": min, "[SM": lambda a: sum(a) % 10,
                "[MED": lambda a: int(np.median(a))}[word](args)

    value = expr()
    assert pos == len(words), f"trailing tokens in {source!r}"
    return value


def fixture_rows() -> list[tuple[str, int]]:
    lines = FIXTURE.read_text().splitlines()[1:]
    return [(src, int(tgt)) for src, tgt in (line.split("\t") for line in lines)]


def make_task(tmp_dir: Path | None = None, **options) -> ListOpsTask:
    cfg = TaskConfig(seq_len=96, n_train=64, n_val=20, n_test=12,
                     data_dir=str(tmp_dir) if tmp_dir else None, options=options)
    return TASKS.build("listops", cfg)


def test_release_text_format():
    tree = make_tree("[MAX", [8, make_tree("[MED", [3, 6]), 8])
    assert to_string(tree) == RELEASE_EXAMPLE
    assert evaluate(RELEASE_EXAMPLE) == 8
    ids = tokenize(RELEASE_EXAMPLE)
    assert ids == [VOCAB[w] for w in "[MAX 8 [MED 3 6 ] 8 ]".split()]


@pytest.mark.parametrize("row", fixture_rows(), ids=lambda r: r[0][:24])
def test_fixture_targets_are_right(row):
    source, target = row
    assert evaluate(source) == target


def test_median_is_numpys_truncated_median():
    rng = random.Random(0)
    for _ in range(2000):
        args = [rng.randrange(10) for _ in range(rng.randint(2, 10))]
        assert median_int(args) == int(np.median(args)), args


def test_labels_and_lengths_on_1000_generated():
    opts = ListOpsOptions(min_length=24, max_length=96)
    rows = sample_examples(1000, opts, random.Random(7))
    assert len({s for s, _ in rows}) == 1000  # deduplicated like the release's set
    for source, target in rows:
        assert evaluate(source) == target, source
        assert 24 < len(tokenize(source)) < 96  # strict, as the release
    # every operator and most labels occur (MAX/MIN/MED/SM are all drawn)
    words = {w for s, _ in rows for w in s.split()}
    assert {"[MAX", "[MIN", "[MED", "[SM", END} <= words
    assert len({t for _, t in rows}) == 10


def test_batches_shapes_dtypes_and_padding():
    task = make_task()
    assert (task.head, task.vocab_size, task.n_classes, task.pad_id) == ("cls", VOCAB_SIZE, 10, 0)
    tokens, targets = next(task.batches("train", 8, seed=0))
    assert tokens.dtype == torch.long and targets.dtype == torch.long
    assert tokens.shape[0] == 8 and tokens.shape[1] <= 96 and targets.shape == (8,)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < VOCAB_SIZE
    assert 0 <= int(targets.min()) and int(targets.max()) <= 9
    lengths = (tokens != PAD_ID).sum(1)
    assert int(lengths.max()) == tokens.shape[1]  # padded to the batch's longest
    assert bool((lengths > 24).all())  # default min_length = seq_len // 4
    for row, n in zip(tokens, lengths.tolist(), strict=True):
        assert bool((row[n:] == PAD_ID).all()) and bool((row[:n] != PAD_ID).all())
    val = list(task.batches("val", 8, seed=0))
    assert [len(t) for _, t in val] == [8, 8, 4]  # once over the fixed set, last batch partial
    full, _ = next(make_task(pad_to_seq_len=True).batches("val", 4, seed=0))
    assert full.shape == (4, 96)


def test_seeds_and_split_independence():
    task = make_task()
    first = [b for _, b in zip(range(10), task.batches("train", 16, seed=1), strict=False)]
    again = [b for _, b in zip(range(10), task.batches("train", 16, seed=1), strict=False)]
    other = next(make_task().batches("train", 16, seed=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0][:, :8], other[0][:, :8])
    # val/test are fixed (eval_seed), the same for every run seed, and disjoint from train
    assert task.examples("val", 1) == make_task().examples("val", 2)
    train, val, test = ({s for s, _ in task.examples(split, 1)} for split in ("train", "val",
                                                                            "test"))
    assert (len(train), len(val), len(test)) == (64, 20, 12)
    assert not (train & val) and not (train & test) and not (val & test)


def write_release_dir(folder: Path, rows: list[tuple[str, int]], line_end: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        write_tsv(folder / f"basic_{split}.tsv", rows, line_end)
    return folder


@pytest.mark.parametrize("line_end", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_tsv_round_trip(tmp_path, line_end):
    rows = fixture_rows()
    folder = write_release_dir(tmp_path / "listops-1000", rows, line_end)
    raw = (folder / "basic_val.tsv").read_bytes()
    assert raw.startswith(b"Source\tTarget" + line_end.encode())
    assert raw.count(b"\r\n") == (len(rows) + 1 if line_end == "\r\n" else 0)
    task = make_task(folder)
    assert task.examples("test", 0) == rows
    tokens, targets = next(task.batches("val", len(rows), seed=0))
    assert targets.tolist() == [t for _, t in rows]
    for row, (source, _) in zip(tokens.tolist(), rows, strict=True):
        ids = tokenize(source)
        assert row[:len(ids)] == ids and set(row[len(ids):]) <= {PAD_ID}
    train = next(task.batches("train", 3, seed=0))[1].tolist()
    assert set(train) <= {t for _, t in rows}  # train from the file, shuffled


def test_fixture_file_reads_as_is(tmp_path):
    for split in ("train", "val", "test"):  # the LF fixture, copied without rewriting
        shutil.copy(FIXTURE, tmp_path / f"basic_{split}.tsv")
    assert make_task(tmp_path).examples("train", 0) == fixture_rows()


def test_truncation_and_dropped_close_token(tmp_path):
    rows = [(RELEASE_EXAMPLE, 8)]
    folder = write_release_dir(tmp_path / "d", rows, "\n")
    cfg = TaskConfig(seq_len=5, data_dir=str(folder))
    tokens, _ = next(TASKS.build("listops", cfg).batches("val", 1, seed=0))
    assert tokens.tolist() == [tokenize(RELEASE_EXAMPLE)[:5]]  # first seq_len tokens kept
    no_close = make_task(folder, close_token=False)
    tokens, _ = next(no_close.batches("val", 1, seed=0))
    assert VOCAB[END] not in tokens.tolist()[0] and tokens.shape[1] == 6


def test_loader_errors_name_path_and_expectation(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*basic_train.tsv"):
        make_task(missing)
    folder = write_release_dir(tmp_path / "d", fixture_rows(), "\n")
    (folder / "basic_test.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"header 'Source\\tTarget' at .*basic_test.tsv"):
        make_task(folder)
    write_tsv(folder / "basic_test.tsv", fixture_rows())
    (folder / "basic_val.tsv").write_text("src\ttgt\n( [MAX 1 2 ] )\t2\n")
    with pytest.raises(ValueError, match=r"header 'Source\\tTarget' at .*basic_val.tsv"):
        list(make_task(folder).batches("val", 2, seed=0))
    bad_rows = ("( ( [SM 1 ) 2 ) ] )\tx", "( ( [SM 1 ) 2 ) ] )\t]", "( ( [SM 1 ) 2 ) ] ) 3",
                "( [SM 1 2 ] )\t11", "\t4")
    for bad in bad_rows:
        (folder / "basic_val.tsv").write_text(f"Source\tTarget\r\n{bad}\r\n")
        with pytest.raises(ValueError, match=r"basic_val.tsv:2: expected"):
            make_task(folder).examples("val", 0)


@pytest.mark.parametrize(("content", "needle"), [
    (b"Source\n( [MAX 1 2 ] )\n", r"header 'Source\\tTarget' at .*basic_val.tsv; line 1 is "
                                   r"'Source'"),  # no Target column
    (b"src\ttgt\n( [MAX 1 2 ] )\t2\n", r"basic_val.tsv; line 1 is 'src\\ttgt'"),
    (b"Source\tTarget\r\n( [MAX 1 2 ] )\t2\r\n( [MIN 1 2 ] )\tseven\r\n",
     r"basic_val.tsv:3: expected '<Source>\\t<Target 0-9>', found"),
    (b"Source\tTarget\n( [MAX 1 2 ] )\t2\n( [MIN 1 2 ] )\n", r"basic_val.tsv:3: expected"),
    (b"Source\tTarget\n" + b"( [MAX 1 2 ] )\t2\n" * 99 + b"( [MAX 1 2 ] )\t\xff\n",
     r"basic_val.tsv: line 101 is not UTF-8"),
    (b"Source\tTarget\n", r"basic_val.tsv: the file has no rows"),
    (b"", r"basic_val.tsv; the file is empty"),
], ids=["no-target-column", "wrong-header", "non-digit-target", "no-tab", "not-utf8", "no-rows",
        "empty"])
def test_malformed_tsv_fails_when_the_task_is_built(tmp_path, content, needle):
    """Not later, mid-training: the CLI then exits 2 with this one message (HARNESS.md)."""
    folder = write_release_dir(tmp_path / "d", fixture_rows(), "\n")
    (folder / "basic_val.tsv").write_bytes(content)
    with pytest.raises(ValueError, match=needle):
        make_task(folder)


def test_tsv_check_reruns_when_the_file_changes(tmp_path):
    folder = write_release_dir(tmp_path / "d", fixture_rows(), "\n")
    make_task(folder)  # valid: checked once, remembered by (path, size, mtime)
    (folder / "basic_train.tsv").write_text("Source\tTarget\n( [MAX 1 2 ] )\t22\n")
    with pytest.raises(ValueError, match=r"basic_train.tsv:2: expected"):
        make_task(folder)


def test_malformed_tsv_train_exits_2_and_stores_nothing(tmp_path, capsys):
    from harness.cli import main
    from harness.store import Store

    folder = write_release_dir(tmp_path / "d", fixture_rows(), "\n")
    (folder / "basic_test.tsv").write_text("Source\tTarget\n( [MAX 1 2 ] )\tx\n")
    store = str(tmp_path / "s.db")
    for command in (["train"], ["sweep", "--grid", "seed=0,1"]):
        code = main([*command, "--model", "transformer_sdpa", "--task", "listops", "--quick",
                     "--device", "cpu", "--task-opt", f"data_dir={folder}", "--store", store])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "basic_test.tsv:2: expected" in err[0], err
    assert len(Store(store).dataframe()) == 0


def test_option_validation():
    with pytest.raises(ValueError, match="task 'listops': unknown config field 'max_lenght'"):
        make_task(max_lenght=50)
    with pytest.raises(ValueError, match="min_length=90, max_length=91"):
        make_task(min_length=90, max_length=91)
    with pytest.raises(ValueError, match="at most 4 tokens"):
        make_task(max_depth=2, max_args=2, min_length=10)
    with pytest.raises(ValueError, match="unknown split"):
        next(make_task().batches("dev", 2, seed=0))
    described = make_task(max_depth=6).describe()
    assert described["task"] == "listops" and described["task_max_depth"] == 6
