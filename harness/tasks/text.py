"""Byte-level text classification (LRA "Text" setting: seq_len = 4096 bytes, one label each).

Two sources, both read from disk with no download:

1. Default: the Python standard library of the running interpreter
   (``sysconfig.get_paths()["stdlib"]``), a real corpus present on every machine. The label of a
   window is the stdlib package its file belongs to (``STDLIB_CLASSES``: packages present in every
   CPython 3.x, also in Debian's split ``libpython3.x-stdlib``). Only ``.py`` files are used, so the
   file type is no cue; ``test``/``tests``/``idle_test``/``__pycache__`` folders and empty files
   are skipped (distributions ship them or not). ``options["corpus_dir"]`` points at another
   folder with one sub-folder per class (default classes there: every sub-folder holding at least
   3 files with one of ``options["extensions"]``).

   Split, per class, by file (never by window): files are ranked by sha1 of their path relative
   to the corpus root; the first 15 % (at least 1) are ``test``, the next 15 % (at least 1)
   ``val``, the rest ``train``, so no file is in two splits and the split is the same on every run.
   An example: class y uniform (balanced per chunk of 1024), a file of class y with probability
   ∝ its size (every byte equally likely), a window of seq_len bytes at a uniform offset; files
   shorter than seq_len are used whole and right-padded. train holds n_train windows drawn with the
   run seed; val/test hold n_val/n_test windows drawn with a fixed seed.

2. ``config.data_dir`` given: the IMDB reviews of LRA's text task (LRA loads TFDS
   ``imdb_reviews``; we read the same release in its raw ``aclImdb`` layout:
   ``train/{neg,pos}/*.txt`` and ``test/{neg,pos}/*.txt``, labels neg = 0, pos = 1). Like LRA,
   each review's bytes are truncated to seq_len and right-padded; train = all of ``train/``,
   test = all of ``test/`` (25 000 each in the release; n_train/n_test do not apply),
   val = a fixed subset of n_val reviews from ``test/`` (LRA validates on the test split).

Tokens: byte b -> id b, pad -> 256, so vocab_size = 257. (LRA's ``ByteTextEncoder`` uses
id = b + 1 and pad = 0: the same vocabulary relabelled.)
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.tasks import Batch, Task, TaskConfig, register_task
from harness.tasks._common import (
    ArrayTask,
    check_split,
    index_batches,
    make_rng,
    parse_options,
    to_batch,
)

PAD_ID = 256
VOCAB_SIZE = 257
# Packages with >= 8 non-test modules in every CPython >= 3.10 (smaller ones, e.g. json or
# http, would leave a single file for val and test).
STDLIB_CLASSES = ("asyncio", "email", "encodings", "importlib", "multiprocessing", "unittest",
                  "xml")
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages",
                       "dist-packages"})
MIN_FILES = 3  # one per split
EVAL_FRACTION = 0.15  # of each class's files, for val and for test
IMDB_LAYOUT = "train/neg/*.txt, train/pos/*.txt, test/neg/*.txt, test/pos/*.txt"
IMDB_LABELS = ("neg", "pos")


@dataclass
class TextOptions:
    corpus_dir: str = ""  # "" = the running interpreter's standard library
    classes: str = ""  # comma-separated sub-folders; "" = the default set (see module docstring)
    extensions: str = ".py"  # comma-separated file suffixes that count as corpus files


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _names(value: Any) -> list[str]:
    """Options may arrive as a CLI string "a,b" or, from a sweep file, as a list."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def class_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Non-empty files with a corpus suffix under ``folder``, skipping test/cache folders."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel_dirs = path.relative_to(folder).parts[:-1]
        if any(part in SKIP_DIRS for part in rel_dirs) or path.suffix not in extensions:
            continue
        if path.is_file() and path.stat().st_size > 0:
            found.append(path)
    return found


def split_by_hash(root: Path, files: list[Path]) -> dict[str, list[Path]]:
    """Rank files by sha1 of their root-relative path: test, val, then train (see docstring)."""
    ranked = sorted(files, key=lambda p: (hashlib.sha1(p.relative_to(root).as_posix().encode())
                                          .hexdigest(), p.as_posix()))
    n_eval = max(1, round(EVAL_FRACTION * len(ranked)))
    return {"test": ranked[:n_eval], "val": ranked[n_eval:2 * n_eval],
            "train": ranked[2 * n_eval:]}


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"task 'text': cannot read corpus file {path}: {err.strerror}") from None


def encode(docs: list[bytes], seq_len: int) -> np.ndarray:
    """(len(docs), seq_len) byte ids, each doc truncated to seq_len and right-padded."""
    tokens = np.full((len(docs), seq_len), PAD_ID, dtype=np.int16)
    for row, doc in enumerate(docs):
        window = doc[:seq_len]
        tokens[row, :len(window)] = np.frombuffer(window, dtype=np.uint8)
    return tokens


class CorpusTextTask(ArrayTask):
    """Which class folder (stdlib package) a window of seq_len bytes comes from."""

    name = "text"
    head = "cls"
    vocab_size = VOCAB_SIZE
    pad_id = PAD_ID

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.options = parse_options(TextOptions(), config.options, self.name)
        self.root = Path(self.options.corpus_dir).expanduser() if self.options.corpus_dir \
            else stdlib_dir()
        extensions = tuple(_names(self.options.extensions))
        if not self.root.is_dir():
            raise ValueError(f"task 'text': corpus_dir {self.root} is not a folder; expected a "
                             f"folder with one sub-folder of {'/'.join(extensions)} files per "
                             "class")
        self.class_names = self._resolve_classes(extensions)
        self.n_classes = len(self.class_names)
        # split -> class index -> files
        self.split_files: dict[str, list[list[Path]]] = {s: [] for s in ("train", "val", "test")}
        for name in self.class_names:
            files = class_files(self.root / name, extensions)
            if len(files) < MIN_FILES:
                raise ValueError(f"task 'text': class folder {self.root / name} has {len(files)} "
                                 f"non-empty {'/'.join(extensions)} files; needs >= {MIN_FILES} "
                                 "(one per split)")
            for split, chosen in split_by_hash(self.root, files).items():
                self.split_files[split].append(chosen)
        self._docs: dict[str, list[list[bytes]]] = {}

    def _resolve_classes(self, extensions: tuple[str, ...]) -> list[str]:
        names = _names(self.options.classes)
        if not names and not self.options.corpus_dir:
            names = list(STDLIB_CLASSES)
        if not names:  # a custom corpus: every sub-folder with enough files is a class
            names = [d.name for d in sorted(self.root.iterdir())
                     if d.is_dir() and d.name not in SKIP_DIRS and not d.name.startswith(".")
                     and len(class_files(d, extensions)) >= MIN_FILES]
        missing = [n for n in names if not (self.root / n).is_dir()]
        if missing:
            raise ValueError(f"task 'text': class folder(s) {', '.join(missing)} not found in "
                             f"{self.root}")
        if len(names) < 2:
            raise ValueError(f"task 'text': corpus {self.root} has {len(names)} class folder(s) "
                             f"with >= {MIN_FILES} {'/'.join(extensions)} files; needs >= 2")
        return names

    def docs(self, split: str) -> list[list[bytes]]:
        """File contents of one split, per class (read once)."""
        if split not in self._docs:
            self._docs[split] = [[read_bytes(p) for p in files]
                                 for files in self.split_files[split]]
        return self._docs[split]

    def generate(self, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        seq_len, docs = self.config.seq_len, self.docs(split)
        labels = rng.permutation(np.arange(n) % self.n_classes)
        windows: list[bytes] = [b""] * n
        for label, class_docs in enumerate(docs):
            rows = np.flatnonzero(labels == label)
            sizes = np.array([len(d) for d in class_docs], dtype=np.float64)
            picks = rng.choice(len(class_docs), size=len(rows), p=sizes / sizes.sum())
            for row, pick in zip(rows, picks, strict=True):
                doc = class_docs[pick]
                start = int(rng.integers(0, max(len(doc) - seq_len, 0) + 1))
                windows[row] = doc[start:start + seq_len]
        return encode(windows, seq_len), labels.astype(np.int16)

    def describe(self) -> dict[str, Any]:
        corpus = (f"cpython-{'.'.join(map(str, sys.version_info[:3]))}-stdlib"
                  if not self.options.corpus_dir else str(self.root))
        return {**super().describe(), "task_corpus": corpus,
                "task_class_names": ",".join(self.class_names)}


class ImdbTextTask(Task):
    """LRA IMDB sentiment at byte level, read from the raw aclImdb release."""

    name = "text"
    head = "cls"
    vocab_size = VOCAB_SIZE
    n_classes = 2
    pad_id = PAD_ID

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        root = Path(str(config.data_dir)).expanduser()
        if (root / "aclImdb").is_dir():  # accept the folder the tarball was unpacked into
            root = root / "aclImdb"
        self.root = root
        self.files: dict[str, list[tuple[Path, int]]] = {}
        for part in ("train", "test"):
            self.files[part] = []
            for label, sub in enumerate(IMDB_LABELS):
                folder = root / part / sub
                # files only: a folder or dangling link named *.txt would fail mid-run
                found = (sorted(p for p in folder.glob("*.txt") if p.is_file())
                         if folder.is_dir() else [])
                if not found:
                    raise ValueError(f"task 'text': IMDB data_dir {config.data_dir}: no "
                                     f"{part}/{sub}/*.txt files; expected the aclImdb layout "
                                     f"{IMDB_LAYOUT}")
                self.files[part] += [(p, label) for p in found]
        self._docs: dict[str, list[bytes]] = {}

    def _split_items(self, split: str) -> list[tuple[Path, int]]:
        if split == "train":
            return self.files["train"]
        if split == "test":
            return self.files["test"]
        keep = make_rng(1, 0).permutation(len(self.files["test"]))[:self.config.n_val]
        return [self.files["test"][i] for i in sorted(keep)]

    def batches(self, split: str, batch_size: int, seed: int) -> Iterator[Batch]:
        check_split(split, batch_size)
        items = self._split_items(split)
        labels = np.array([label for _, label in items], dtype=np.int64)
        part = "train" if split == "train" else "test"
        if part not in self._docs:
            self._docs[part] = [read_bytes(p) for p, _ in self.files[part]]
        by_path = dict(zip((p for p, _ in self.files[part]), self._docs[part], strict=True))
        docs = [by_path[p] for p, _ in items]
        for idx in index_batches(len(items), split, batch_size, seed):
            yield to_batch(encode([docs[i] for i in idx], self.config.seq_len), labels[idx])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "task_corpus": "aclImdb"}


@register_task("text", data_dir="the aclImdb release of IMDB reviews")
def build_text(config: TaskConfig) -> Task:
    if config.data_dir:
        if config.options.get("corpus_dir"):
            raise ValueError("task 'text': give data_dir (IMDB) or options corpus_dir, not both")
        return ImdbTextTask(config)
    return CorpusTextTask(config)
