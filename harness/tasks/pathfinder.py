"""Pathfinder-style images (LRA Pathfinder / Path-X): are the two dots joined by one dashed path?

This is a Pathfinder-*style* generator written for this harness, not the official stimuli of
Linsley et al. (2018) that LRA ships; it keeps their structure and stays fast in numpy:

- Every image holds two main paths and ``n_distractors`` shorter ones. A path is a chain of
  ``paddles`` straight dashes ("paddles") of length ``dash_on`` separated by gaps ``dash_off``;
  the heading turns by U(-max_turn, max_turn) from one paddle to the next, so paths curve smoothly
  and the gaps must be bridged to follow them.
- Label 1: the two dots sit on the two ends of one main path. Label 0: one dot on an end of each
  main path. Both classes have the same ink (same paths, two dots), only the dot placement differs.
- No two paths touch: a new path is kept only if its pixels, and the dot squares its ends may get,
  are not 8-adjacent to anything already placed (up to CANDIDATES x TRIES draws, else the image
  is dropped and another drawn). So, on the gap-bridged masks (``PathfinderImages.path_mask``),
  the dots are 8-connected iff label = 1; :func:`connected` checks exactly that in the tests.

A path is sampled by arc length a in [0, total] with step <= 0.5 px (so consecutive pixels are
8-neighbours): paddle k = floor(a / (on + off)), offset s = a - k (on + off), point = p_k +
s (cos th_k, sin th_k), drawn where s <= on; th_0 is uniform, and the drawn shape is placed at a
uniform position among those that keep it inside the image. Dots are squares of side 3 (32, 64)
or 5 (128) px centred on a main path's end pixel. Pixels are 0 (background) or 255 (dash, dot), the
tokens (vocab 256), flattened row-major to a sequence of resolution^2 (1024 / 4096 / 16384).
Lengths are in pixels; dash_on/dash_off default to 2.5 and 1.5 px scaled by resolution / 32,
so 64 and 128 (Path-X) hold the same drawings at a finer grain and the sequence grows 4x / 16x.

Splits (``mqar.ArrayTask``): train = ``n_train`` images drawn from the run seed (reshuffled each
epoch); val/test are fixed sets, the same for every run seed. Each split is cached in memory once
drawn (uint8, resolution^2 bytes an image).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.tasks import Task, TaskConfig, register_task
from harness.tasks._common import ArrayTask, parse_options

INK = 255
CANDIDATES, TRIES = 8, 6  # paths drawn at once per image, rounds of that, before a drop
STEP = 0.5  # arc-length step when sampling a path: <= 1 px keeps its pixels 8-connected


@dataclass
class PathfinderOptions:
    """``TaskConfig.options`` for Pathfinder (lengths in pixels of the drawn resolution)."""

    resolution: int = 32
    paddles: int = 8  # dashes of a main path
    distractor_paddles: int = 4
    n_distractors: int = 3
    dash_on: float = -1.0  # < 0: 2.5 * resolution / 32
    dash_off: float = -1.0  # < 0: 1.5 * resolution / 32; 0 draws solid paths
    max_turn_deg: float = 30.0

    def validate(self) -> None:
        if not 16 <= self.resolution <= 256:
            raise ValueError(f"pathfinder option resolution={self.resolution}: expected 16..256 "
                             "(32, 64, or 128 for Path-X)")
        for name in ("paddles", "distractor_paddles"):
            if getattr(self, name) < 1:
                raise ValueError(f"pathfinder option {name}={getattr(self, name)}: must be >= 1")
        if self.n_distractors < 0:
            raise ValueError(f"pathfinder option n_distractors={self.n_distractors}: must be >= 0")
        if self.dash_on == 0:
            raise ValueError("pathfinder option dash_on=0: dashes need a length (< 0: default)")


@dataclass
class PathfinderImages:
    """A drawn set; ``path_mask`` (all paths with gaps filled, plus the dots) is for checking."""

    images: np.ndarray  # (n, R, R) uint8, 0 or 255
    labels: np.ndarray  # (n,) int64, 1 = dots on one path
    path_mask: np.ndarray  # (n, R, R) bool
    dots: np.ndarray  # (n, 2, 2) int64: the two dots' (row, col)


def connected(mask: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Is pixel b reachable from pixel a through True pixels of a 2-D mask (8-connectivity)?"""
    rows, cols = mask.shape
    a, b = (int(a[0]), int(a[1])), (int(b[0]), int(b[1]))
    if not (mask[a] and mask[b]):
        return False
    seen = {a}
    todo = deque([a])
    while todo:
        r, c = todo.popleft()
        if (r, c) == b:
            return True
        for nr in (r - 1, r, r + 1):
            for nc in (c - 1, c, c + 1):
                if 0 <= nr < rows and 0 <= nc < cols and mask[nr, nc] and (nr, nc) not in seen:
                    seen.add((nr, nc))
                    todo.append((nr, nc))
    return False


class _Drawer:
    """Vectorised path sampling and rasterisation for one resolution and option set."""

    def __init__(self, opts: PathfinderOptions) -> None:
        self.res = opts.resolution
        scale = opts.resolution / 32
        self.on = opts.dash_on if opts.dash_on > 0 else 2.5 * scale
        self.off = opts.dash_off if opts.dash_off >= 0 else 1.5 * scale
        self.turn = math.radians(opts.max_turn_deg)
        self.dot = max(1, opts.resolution // 64)  # dot = (2 dot + 1)^2 square: 3x3, 3x3, 5x5
        self.opts = opts

    def curves(self, n: int, n_paddles: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """n paths: pixel (row, col) (n, S, 2), dash flags (n, S), ends (n, 2, 2), fits (n,).

        The shape is drawn first (uniform heading, then the turns), then placed at a uniform
        position among those keeping every point >= dot px from the border (room for a dot
        square at either end); fits is False when no such position exists.
        """
        res, period = self.res, self.on + self.off
        turns = rng.uniform(-self.turn, self.turn, size=(n, n_paddles)).astype(np.float32)
        turns[:, 0] = rng.uniform(0, 2 * np.pi, size=n)
        heading = np.cumsum(turns, axis=1)  # (n, K)
        step = period * np.stack([np.sin(heading), np.cos(heading)], axis=-1)  # (row, col)
        paddle_start = np.cumsum(step, axis=1) - step  # (n, K, 2), path starts at 0
        total = n_paddles * period - self.off  # no gap after the last dash
        arc = np.linspace(0.0, total, int(math.ceil(total / STEP)) + 1, dtype=np.float32)
        k = np.minimum((arc // period).astype(np.int64), n_paddles - 1)
        offset = arc - k * period
        points = paddle_start[:, k, :] + offset[None, :, None] * (step[:, k, :] / period)
        low = self.dot - points.min(axis=1)  # (n, 2): allowed start range per axis
        high = res - self.dot - points.max(axis=1)
        fits = (high > low).all(axis=1)
        start = low + rng.uniform(0, 1, size=(n, 2)) * np.maximum(high - low, 0)
        pixels = np.floor(points + start[:, None, :].astype(np.float32)).astype(np.int64)
        np.clip(pixels, self.dot, res - 1 - self.dot, out=pixels)  # float rounding at the edge
        dash = np.broadcast_to(offset <= self.on, pixels.shape[:2])
        return pixels, dash, pixels[:, [0, -1], :], fits

    def raster(self, pixels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """(n, S, 2) pixel lists -> (n, R, R) masks (only points where keep, if given)."""
        mask = np.zeros((pixels.shape[0], self.res, self.res), dtype=bool)
        self.paint(mask, np.arange(pixels.shape[0]), pixels, keep)
        return mask

    @staticmethod
    def paint(masks: np.ndarray, which: np.ndarray, pixels: np.ndarray,
              keep: np.ndarray | None = None) -> None:
        """Set masks[which[i]] at pixels[i] (where keep[i], if given)."""
        img = np.broadcast_to(which[:, None], pixels.shape[:2])
        sel = (slice(None),) if keep is None else (keep,)
        masks[img[sel], pixels[..., 0][sel], pixels[..., 1][sel]] = True

    def around(self, centres: np.ndarray, radius: int) -> np.ndarray:
        """(n, m, 2) pixels -> (n, m * (2 radius + 1)^2, 2): their squares, clipped to the image."""
        span = np.arange(-radius, radius + 1)
        offsets = np.stack(np.meshgrid(span, span, indexing="ij"), axis=-1).reshape(-1, 2)
        out = centres[:, :, None, :] + offsets[None, None, :, :]
        out = out.reshape(centres.shape[0], centres.shape[1] * len(offsets), 2)
        return np.clip(out, 0, self.res - 1)

    def place(self, todo: np.ndarray, n_paddles: int, is_main: bool, occupied: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """CANDIDATES paths for each image of todo; the first that touches nothing is kept.

        Returns the images that got a path and its pixels, dash flags, ends and footprint.
        """
        pixels, dash, ends, inside = self.curves(todo.size * CANDIDATES, n_paddles, rng)
        footprint = np.concatenate([pixels, self.around(ends, self.dot)], 1) if is_main else pixels
        owner = np.repeat(todo, CANDIDATES)
        hit = occupied[owner[:, None], footprint[..., 0], footprint[..., 1]].any(axis=1)
        ok = (inside & ~hit).reshape(todo.size, CANDIDATES)
        got = ok.any(axis=1)
        pick = np.flatnonzero(got) * CANDIDATES + ok.argmax(axis=1)[got]
        return todo[got], pixels[pick], dash[pick], ends[pick], footprint[pick]

    def draw(self, n: int, rng: np.random.Generator) -> PathfinderImages:
        """Up to n images (fewer if some could not fit a path in TRIES x CANDIDATES draws)."""
        res, opts = self.res, self.opts
        occupied = np.zeros((n, res, res), dtype=bool)  # placed footprints, dilated by 1 px
        strokes = np.zeros_like(occupied)  # the dashes (what the image shows)
        bridged = np.zeros_like(occupied)  # the paths with gaps filled
        main_ends = np.zeros((n, 2, 2, 2), dtype=np.int64)  # main path, end, (row, col)
        alive = np.ones(n, dtype=bool)
        plan = [(opts.paddles, True)] * 2 + [(opts.distractor_paddles, False)] * opts.n_distractors
        for index, (n_paddles, is_main) in enumerate(plan):
            todo = np.flatnonzero(alive)
            for _ in range(TRIES):
                if todo.size == 0:
                    break
                done, pixels, dash, ends, footprint = self.place(todo, n_paddles, is_main,
                                                                 occupied, rng)
                self.paint(occupied, done, self.around(footprint, 1))
                self.paint(bridged, done, pixels)
                self.paint(strokes, done, pixels, dash)
                if is_main:
                    main_ends[done, index] = ends
                todo = np.setdiff1d(todo, done, assume_unique=True)
            alive[todo] = False
        keep = np.flatnonzero(alive)
        m = keep.size
        labels = rng.permutation(np.arange(m) % 2)
        first = rng.integers(0, 2, size=m)  # which main path carries the first dot
        end_a, end_b = rng.integers(0, 2, size=m), rng.integers(0, 2, size=m)
        path_b = np.where(labels == 1, first, 1 - first)
        end_b = np.where(labels == 1, 1 - end_a, end_b)  # same path: the other end
        ends = main_ends[keep]
        rows = np.arange(m)
        dots = np.stack([ends[rows, first, end_a], ends[rows, path_b, end_b]], axis=1)
        marks = self.raster(self.around(dots, self.dot))
        images = np.where(strokes[keep] | marks, INK, 0).astype(np.uint8)
        return PathfinderImages(images, labels.astype(np.int64), bridged[keep] | marks, dots)


def generate(n: int, opts: PathfinderOptions, rng: np.random.Generator) -> PathfinderImages:
    """Exactly n images, drawn in chunks (bounded memory at 128 x 128)."""
    drawer = _Drawer(opts)
    chunk = max(64, (1 << 22) // opts.resolution ** 2)
    parts: list[PathfinderImages] = []
    have = 0
    while have < n:
        part = drawer.draw(min(chunk, (n - have) * 5 // 4 + 16), rng)  # ~80% fit at 32
        if part.labels.size == 0:
            raise ValueError(f"pathfinder: no image fits {opts.n_distractors} distractors at "
                             f"resolution {opts.resolution}; lower n_distractors or paddles")
        parts.append(part)
        have += part.labels.size
    joined = [np.concatenate([getattr(p, f) for p in parts])[:n]
              for f in ("images", "labels", "path_mask", "dots")]
    return PathfinderImages(*joined)


class PathfinderTask(ArrayTask):
    name = "pathfinder"
    head = "cls"
    vocab_size = 256
    n_classes = 2
    pad_id = None  # every sequence is exactly resolution^2 long

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.opts = parse_options(PathfinderOptions(), config.options, "pathfinder")
        self.seq_len = self.opts.resolution ** 2
        if config.seq_len < self.seq_len:
            res = self.opts.resolution
            raise ValueError(f"pathfinder at resolution {res} needs seq_len >= {self.seq_len} "
                             f"({res}x{res} pixels), got seq_len={config.seq_len}")

    def generate(self, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        drawn = generate(n, self.opts, rng)
        return drawn.images.reshape(n, self.seq_len), drawn.labels

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "task_seq_len": self.seq_len,
                "task_resolution": self.opts.resolution}


@register_task("pathfinder")
def build_pathfinder(config: TaskConfig) -> Task:
    return PathfinderTask(config)
