"""Pathfinder-style task: labels checked by flood fill, the drawing's invariants, the contract."""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pytest
import torch

from harness.tasks import TASKS, TaskConfig
from harness.tasks.pathfinder import PathfinderOptions, connected, generate


def ascii_mask(rows: str) -> np.ndarray:
    return np.array([[ch == "#" for ch in line.strip()] for line in rows.strip().splitlines()])


def components(mask: np.ndarray) -> int:
    """8-connected components by BFS (an independent count: not built on connected())."""
    left = mask.copy()
    count = 0
    for start in zip(*np.nonzero(left), strict=True):
        if not left[start]:
            continue
        count += 1
        todo = deque([start])
        left[start] = False
        while todo:
            r, c = todo.popleft()
            for rr in range(max(r - 1, 0), min(r + 2, mask.shape[0])):
                for cc in range(max(c - 1, 0), min(c + 2, mask.shape[1])):
                    if left[rr, cc]:
                        left[rr, cc] = False
                        todo.append((rr, cc))
    return count


def draw(n: int, seed: int = 0, **options) -> tuple[PathfinderOptions, object]:
    opts = PathfinderOptions(**options)
    return opts, generate(n, opts, np.random.default_rng(seed))


def test_connected_on_hand_drawn_masks():
    diagonal = ascii_mask("""
        #....
        .#...
        ..#..
        ...#.
        ....#""")
    assert connected(diagonal, (0, 0), (4, 4))  # corners touch: 8-connectivity
    gap = ascii_mask("""
        ##.##
        .....""")
    assert not connected(gap, (0, 0), (0, 4))
    detour = ascii_mask("""
        #.#
        #.#
        ###""")
    assert connected(detour, (0, 0), (0, 2))  # only through the bottom row
    assert not connected(detour, (0, 0), (0, 1))  # an end off the mask
    two_paths = ascii_mask("""
        ##...
        ...##
        ##...""")
    assert not connected(two_paths, (0, 0), (2, 0))


@pytest.mark.parametrize("resolution", [16, 32])
def test_solid_paths_labels_readable_from_the_image(resolution):
    # no gaps: the image's own ink must join the dots exactly when label = 1
    _, drawn = draw(150, seed=resolution, resolution=resolution, dash_off=0, paddles=5,
                    distractor_paddles=3, n_distractors=1)
    for image, label, (a, b) in zip(drawn.images, drawn.labels, drawn.dots, strict=True):
        assert connected(image > 0, a, b) == bool(label)


def test_labels_match_flood_fill_on_gap_bridged_paths():
    opts, drawn = draw(400, seed=1)
    ink = drawn.images > 0
    for i in range(400):
        a, b = drawn.dots[i]
        assert connected(drawn.path_mask[i], a, b) == bool(drawn.labels[i]), i
        assert ink[i, a[0], a[1]] and ink[i, b[0], b[1]]  # the dots are drawn
    assert not (ink & ~drawn.path_mask).any()  # every ink pixel lies on a path or a dot
    # paths never touch: one component per path (dots belong to their main path)
    assert all(components(m) == 2 + opts.n_distractors for m in drawn.path_mask[:100])
    # the gaps are real: the image alone rarely joins the dots of a positive
    positives = np.flatnonzero(drawn.labels == 1)[:100]
    joined = sum(connected(ink[i], *drawn.dots[i]) for i in positives)
    assert joined < 0.25 * len(positives)
    # both classes carry the same ink (same paths), so counting pixels does not solve it
    per_image = ink.sum(axis=(1, 2))
    mean_pos, mean_neg = (per_image[drawn.labels == k].mean() for k in (1, 0))
    assert abs(mean_pos - mean_neg) < 0.05 * per_image.mean()


def test_path_x_resolution_draws_valid_images():
    opts, drawn = draw(6, seed=3, resolution=128)
    assert drawn.images.shape == (6, 128, 128) and drawn.images.dtype == np.uint8
    assert set(np.unique(drawn.images)) == {0, 255}
    for i in range(6):
        assert connected(drawn.path_mask[i], *drawn.dots[i]) == bool(drawn.labels[i])
        assert components(drawn.path_mask[i]) == 2 + opts.n_distractors


def test_fast_enough_and_balanced():
    start = time.perf_counter()
    _, drawn = draw(4000, seed=2)
    elapsed = time.perf_counter() - start
    assert elapsed < 4.0, f"4000 32x32 images took {elapsed:.2f}s"  # ~1 s on one core
    assert abs(drawn.labels.mean() - 0.5) < 0.03


def make_task(seq_len: int = 1024, **options):
    cfg = TaskConfig(seq_len=seq_len, n_train=300, n_val=64, n_test=40, options=options)
    return TASKS.build("pathfinder", cfg)


def test_batches_contract_and_determinism():
    task = make_task()
    assert (task.head, task.vocab_size, task.n_classes, task.pad_id) == ("cls", 256, 2, None)
    tokens, labels = next(task.batches("train", 16, seed=0))
    assert tokens.shape == (16, 1024) and tokens.dtype == torch.long
    assert labels.shape == (16,) and labels.dtype == torch.long
    assert set(tokens.unique().tolist()) == {0, 255} and set(labels.tolist()) <= {0, 1}
    again = next(make_task().batches("train", 16, seed=0))
    other = next(make_task().batches("train", 16, seed=1))
    assert torch.equal(tokens, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(tokens, other[0])
    val = list(task.batches("val", 30, seed=0))
    assert [len(y) for _, y in val] == [30, 30, 4]
    val_other_seed = torch.cat([x for x, _ in make_task().batches("val", 64, seed=9)])
    assert torch.equal(torch.cat([x for x, _ in val]), val_other_seed)  # fixed eval set
    all_labels = torch.cat([y for _, y in make_task().batches("test", 64, seed=0)])
    assert 0.3 < all_labels.float().mean() < 0.7
    # row-major flattening: token r * R + c is pixel (r, c)
    image = generate(1, PathfinderOptions(), np.random.default_rng(5)).images[0]
    assert np.array_equal(image.reshape(-1).reshape(32, 32), image)


def test_resolution_and_seq_len():
    tokens, _ = next(make_task(seq_len=4096, resolution=64).batches("test", 2, seed=0))
    assert tokens.shape == (2, 4096)
    tokens, _ = next(make_task(seq_len=2048).batches("test", 2, seed=0))
    assert tokens.shape == (2, 1024)  # a longer seq_len is fine: sequences stay R^2
    with pytest.raises(ValueError, match="resolution 64 needs seq_len >= 4096.*got seq_len=1024"):
        make_task(resolution=64)
    with pytest.raises(ValueError, match="resolution=8"):
        make_task(resolution=8)
    with pytest.raises(ValueError, match="task 'pathfinder': unknown config field 'resolutoin'"):
        make_task(resolutoin=64)
    assert make_task(resolution=64, seq_len=4096).describe()["task_seq_len"] == 4096
