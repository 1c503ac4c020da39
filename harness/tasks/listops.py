"""ListOps (Long Range Arena): evaluate a nested prefix expression over digits, 10 classes.

Definition (google-research/long-range-arena, ``lra_benchmarks/data/listops.py``):

    expr  := digit | [OP expr expr ... expr ]        2 <= #args <= max_args
    MAX, MIN                        the usual
    MED(a_1..a_n) = int(np.median(a))   (even n: mean of the two middle values, truncated)
    SM(a_1..a_n)  = (a_1 + ... + a_n) mod 10

A node at depth d < max_depth is an operator with probability VALUE_P = 0.25, else a digit; at
d = max_depth it is always a digit (the root has depth 1). The release keeps a tree only if its
length, counted as 1 per digit and 2 per operator (the operator and its ``]``), satisfies
``min_length < length < max_length`` (strict, 500 and 2000 in the release), and removes
duplicates. :func:`generate_tree` draws from ``random.Random`` in the same order as the official
``generate_tree`` (random(), then choice(VALUES) or randint(2, max_args), children, choice(OPS)).

Text format: the official ``to_string`` writes the tree as nested pairs, e.g.
``( ( ( ( [MAX 8 ) ( ( ( [MED 3 ) 6 ) ] ) ) 8 ) ] )`` for ``[MAX 8 [MED 3 6] 8]`` (= 8).
TSV files (``basic_{train,val,test}.tsv``) have the header ``Source<TAB>Target``; the official
writer is ``csv.writer``, whose default line ending is CRLF, so both CRLF and LF are accepted.

Tokeniser (shared by the generator and the TSV reader): drop ``(`` and ``)``, one token per digit,
operator and ``]``. Vocabulary: pad 0, digits 1..10, MIN MAX MED SM 11..14, ``]`` 15, unknown 16.
This is the S4 / later-LRA-paper convention. The original LRA pipeline (``listops/
input_pipeline.py``) used ``tfds...TokenTextEncoder``, whose tokeniser splits on ``\\W+`` and so
also *drops* ``]``; option ``close_token=False`` reproduces that (the closing tokens vanish and the
expression becomes ambiguous, which is part of why the original baselines scored ~37%).
Sequences longer than ``seq_len`` are truncated to their first ``seq_len`` tokens (the official
``[:max_length]``); a batch is padded with ``pad_id`` to its longest sequence, or to ``seq_len``
with option ``pad_to_seq_len=True`` (the official ``padded_batch`` to a fixed shape).

Splits: with ``config.data_dir`` the three TSVs are read (n_train/n_val/n_test ignored). Otherwise
the train split is ``n_train`` trees drawn from ``seed`` and reshuffled each epoch; val/test are
one fixed draw (independent of the run seed, so every run is scored on the same examples) sliced
like the release's single set, and train trees equal to an evaluation tree are skipped.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.tasks import Batch, Task, TaskConfig, register_task
from harness.tasks._common import SPLITS, check_split, index_batches, parse_options
from harness.tasks._disk_cache import load_or_build

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUE_P = 0.25  # probability that a node above max_depth is an operator

PAD_ID = 0
DIGITS = tuple(str(d) for d in range(10))
VOCAB: dict[str, int] = {str(d): 1 + d for d in range(10)}
VOCAB.update({op: 11 + i for i, op in enumerate(OPERATORS)})
VOCAB[END] = 15
UNK_ID = 16
VOCAB_SIZE = 17

# A tree is the official nested-pair form: a digit (int), or (left, right) where the left spine
# starts with (operator, first argument) and ends with (..., END).
Tree = Any


def median_int(args: Sequence[int]) -> int:
    """int(np.median(args)) for non-negative ints, without numpy's per-call cost."""
    s = sorted(args)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2


def apply_op(op: str, args: Sequence[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return median_int(args)
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def make_tree(op: str, args: Sequence[Tree]) -> Tree:
    """The official pair nesting: ((((op, a1), a2), ...), an), END)."""
    tree: Tree = (op, args[0])
    for arg in args[1:]:
        tree = (tree, arg)
    return (tree, END)


def to_string(tree: Tree) -> str:
    """The release's text: every pair becomes '( left right )'."""
    if isinstance(tree, tuple):
        return f"( {to_string(tree[0])} {to_string(tree[1])} )"
    return str(tree)


class TreeTooLong(Exception):
    """Raised by :func:`generate_tree` once a tree reaches its length budget."""


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int,
                  budget: list[int] | None = None) -> tuple[Tree, int, int]:
    """(tree, length, value), drawing in the official generator's order.

    ``budget`` ([tokens left]) stops a tree as soon as it is too long to be accepted: the kept
    trees are distributed exactly as before (rejection only ever conditions on length), but
    the heavy tail of huge trees no longer costs their full construction.
    """
    r = rng.random() if depth < max_depth else 1.0
    if budget is not None:
        budget[0] -= 1 if r > VALUE_P else 2
        if budget[0] < 0:
            raise TreeTooLong
    if r > VALUE_P:
        value = rng.choice(range(10))
        return value, 1, value
    n_args = rng.randint(2, max_args)
    children, values, length = [], [], 2
    for _ in range(n_args):
        sub, sub_len, sub_val = generate_tree(rng, depth + 1, max_depth, max_args, budget)
        children.append(sub)
        values.append(sub_val)
        length += sub_len
    op = rng.choice(OPERATORS)
    return make_tree(op, children), length, apply_op(op, values)


def tokenize(source: str, close_token: bool = True) -> list[int]:
    """Token ids of a Source string (parentheses dropped; unknown words -> UNK_ID)."""
    words = source.replace("(", " ").replace(")", " ").split()
    if not close_token:
        words = [w for w in words if w != END]
    return [VOCAB.get(w, UNK_ID) for w in words]


@dataclass
class ListOpsOptions:
    """``TaskConfig.options`` for ListOps; min/max_length default to seq_len // 4 and seq_len."""

    min_length: int = 0
    max_length: int = 0
    max_depth: int = 10
    max_args: int = 10
    close_token: bool = True
    pad_to_seq_len: bool = False
    tsv_prefix: str = "basic"  # release file names: basic_train.tsv, basic_val.tsv, ...

    def validate(self) -> None:
        if self.max_depth < 2:
            raise ValueError(f"listops option max_depth={self.max_depth}: must be >= 2 "
                             "(depth 1 is the root, a lone digit)")
        if self.max_args < 2:
            raise ValueError(f"listops option max_args={self.max_args}: must be >= 2")
        if self.min_length < 0 or self.max_length <= self.min_length + 1:
            raise ValueError(f"listops options min_length={self.min_length}, max_length="
                             f"{self.max_length}: need 0 <= min_length < max_length - 1 "
                             "(accepted lengths are min_length < length < max_length)")
        longest = 1
        for _ in range(self.max_depth - 1):  # deepest possible tree, built bottom-up
            longest = 2 + self.max_args * longest
        if longest <= self.min_length:
            raise ValueError(f"listops option min_length={self.min_length}: trees with "
                             f"max_depth={self.max_depth}, max_args={self.max_args} have at most "
                             f"{longest} tokens")


def sample_examples(n: int, opts: ListOpsOptions, rng: random.Random,
                    exclude: frozenset[str] = frozenset()) -> list[tuple[str, int]]:
    """n distinct (Source, Target) pairs by the release's rejection sampling."""
    seen: set[str] = set(exclude)
    out: list[tuple[str, int]] = []
    misses = 0
    while len(out) < n:
        try:  # budget max_length - 1: the longest accepted tree
            tree, length, value = generate_tree(rng, 1, opts.max_depth, opts.max_args,
                                                [opts.max_length - 1])
        except TreeTooLong:
            length = opts.max_length
        if opts.min_length < length < opts.max_length:
            source = to_string(tree)
            if source not in seen:
                seen.add(source)
                out.append((source, value))
                misses = 0
                continue
        misses += 1
        if misses > 200_000:  # a guard: the release window (500, 2000) accepts ~8% of draws
            raise ValueError(f"listops: no new tree with {opts.min_length} < length < "
                             f"{opts.max_length} in 200000 draws after {len(out)} of {n}; widen "
                             "min_length/max_length or lower n")
    return out


def _tsv_rows(path: Path) -> Iterator[tuple[str, int]]:
    """(Source, Target) rows of an LRA ListOps TSV, streamed; a ValueError naming the file, the
    line and what was expected at the first thing that is not one."""
    expected = f"expected a TSV with header 'Source\\tTarget' at {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{expected}: no such file")
    n_rows = 0
    # bytes, decoded line by line: a text stream decodes ahead in chunks and would blame the
    # wrong line for a bad byte. LF or CRLF endings; a UTF-8 byte-order mark is dropped.
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{expected}: line {lineno} is not UTF-8 text") from None
            if lineno == 1:
                if line.removeprefix("\ufeff") != "Source\tTarget":
                    raise ValueError(f"{expected}; line 1 is {line[:60]!r}")
                continue
            if not line.strip():
                continue
            source, sep, target = line.rpartition("\t")
            if not sep or "\t" in source or target.strip() not in DIGITS or not source.strip():
                raise ValueError(f"{path}:{lineno}: expected '<Source>\\t<Target 0-9>', "
                                 f"found {line[:60]!r}")
            n_rows += 1
            yield source, int(target)
    if path.stat().st_size == 0:
        raise ValueError(f"{expected}; the file is empty")
    if not n_rows:
        raise ValueError(f"{expected}: the file has no rows")


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(Source, Target) rows of an LRA ListOps TSV; one clear error if it is not one."""
    return list(_tsv_rows(path))


# files already checked by this process, by (path, size, mtime): a sweep or a tune builds the
# task once per planned cell, and a release split is ~100 MB
_CHECKED_TSVS: set[tuple[str, int, int]] = set()


def check_tsv(path: Path) -> None:
    """Parse the whole file once (keeping nothing), so a malformed file fails when the task is
    built (exit 2 at the command line) rather than as an ``error`` cell mid-run."""
    if not path.is_file():
        raise FileNotFoundError(f"expected a TSV with header 'Source\\tTarget' at {path}: "
                                "no such file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED_TSVS:
        for _ in _tsv_rows(path):
            pass
        _CHECKED_TSVS.add(key)


def write_tsv(path: Path, rows: Sequence[tuple[str, int]], line_end: str = "\r\n") -> None:
    """The release's format (its csv.writer ends lines with CRLF)."""
    body = "".join(f"{source}\t{target}{line_end}" for source, target in rows)
    path.write_text(f"Source\tTarget{line_end}{body}", encoding="utf-8", newline="")


class ListOpsTask(Task):
    name = "listops"
    head = "cls"
    vocab_size = VOCAB_SIZE
    n_classes = 10
    pad_id = PAD_ID

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        defaults = ListOpsOptions(min_length=config.seq_len // 4, max_length=config.seq_len)
        self.opts = parse_options(defaults, config.options, "listops")
        self._cache: dict[tuple[str, int], tuple[list[np.ndarray], np.ndarray]] = {}
        self._rows: dict[str, list[tuple[str, int]]] = {}
        self.data_dir = Path(config.data_dir) if config.data_dir else None
        if self.data_dir is not None:
            names = ", ".join(f"{self.opts.tsv_prefix}_{s}.tsv" for s in SPLITS)
            if not self.data_dir.is_dir():
                raise FileNotFoundError(f"ListOps data_dir {self.data_dir} is not a folder: "
                                        f"expected one holding {names} (LRA listops-1000)")
            for split in SPLITS:  # a missing file first: it says more than a bad row
                path = self._tsv_path(split)
                if not path.is_file():
                    raise FileNotFoundError(f"expected a TSV with header 'Source\\tTarget' at "
                                            f"{path}: no such file")
            for split in SPLITS:  # fail at construction, not mid-training
                check_tsv(self._tsv_path(split))

    def _tsv_path(self, split: str) -> Path:
        assert self.data_dir is not None
        return self.data_dir / f"{self.opts.tsv_prefix}_{split}.tsv"

    def _eval_rows(self) -> list[tuple[str, int]]:
        """val + test as one deduplicated draw, sliced like the release's single set."""
        if "eval" not in self._rows:
            rng = random.Random("listops:eval")
            self._rows["eval"] = sample_examples(self.config.n_val + self.config.n_test,
                                                 self.opts, rng)
        return self._rows["eval"]

    def examples(self, split: str, seed: int) -> list[tuple[str, int]]:
        """The split's (Source, Target) pairs as text (what the TSV holds)."""
        check_split(split, 1)
        if self.data_dir is not None:
            return read_tsv(self._tsv_path(split))
        eval_rows = self._eval_rows()
        if split == "val":
            return eval_rows[:self.config.n_val]
        if split == "test":
            return eval_rows[self.config.n_val:]
        rng = random.Random(f"listops:train:{seed}")
        exclude = frozenset(source for source, _ in eval_rows)
        return sample_examples(self.config.n_train, self.opts, rng, exclude)

    def _data(self, split: str, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
        key = (split, seed if split == "train" and self.data_dir is None else 0)
        if key not in self._cache:
            def build() -> tuple[list[np.ndarray], np.ndarray]:
                rows = self.examples(split, seed)
                limit = self.config.seq_len
                tokens = [np.asarray(tokenize(s, self.opts.close_token)[:limit], dtype=np.uint8)
                          for s, _ in rows]
                return tokens, np.asarray([t for _, t in rows], dtype=np.int64)

            if self.data_dir is not None:  # files: reading them is fast, and they may change
                self._cache[key] = build()
            else:  # generated: everything the draw depends on keys the on-disk cache
                params = {"task": "listops", "split": split, "seed": key[1],
                          "seq_len": self.config.seq_len, "n_train": self.config.n_train,
                          "n_val": self.config.n_val, "n_test": self.config.n_test,
                          "options": asdict(self.opts)}
                self._cache[key] = load_or_build(params, build)
        return self._cache[key]

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        check_split(split, batch_size)
        tokens, targets = self._data(split, seed)
        for idx in index_batches(len(targets), split, batch_size, seed):
            width = (self.config.seq_len if self.opts.pad_to_seq_len
                     else max(len(tokens[i]) for i in idx))
            out = np.full((len(idx), width), PAD_ID, dtype=np.int64)
            for row, i in enumerate(idx):
                out[row, :len(tokens[i])] = tokens[i]
            yield torch.from_numpy(out), torch.from_numpy(targets[idx])

    def describe(self) -> dict[str, Any]:
        source = str(self.data_dir) if self.data_dir is not None else "generated"
        return {**super().describe(), "task_source": source,
                "task_min_length": self.opts.min_length, "task_max_length": self.opts.max_length,
                "task_max_depth": self.opts.max_depth, "task_max_args": self.opts.max_args}


@register_task("listops", data_dir="the LRA TSVs basic_{train,val,test}.tsv")
def build_listops(config: TaskConfig) -> Task:
    return ListOpsTask(config)
