"""Named efficiency presets: ``efficiency --preset NAME`` (``--quick`` for the CPU-sized version).

    preset          lengths              batch                      what it reproduces
    paper-text4k    4096                 8                          the paper's speed/memory table
    scaling         1K 2K 4K ... 64K     65536 / L (64K tokens)     time and memory vs L, crossovers

paper-text4k is the LRA Text setting of the LongVQ paper's efficiency claim (5.3x faster training,
10x less memory than a vanilla Transformer at L = 4096): byte-level tokens (vocab 257 = 256 bytes
+ pad, as harness/tasks/text.py), classification head (2 classes, LRA Text = IMDB neg/pos), one
backbone for every registry entry. The backbone (d_model 128, 2 layers, FFN 256, 4 heads) is the
size of the committed H100 reference runs (results/h100/), so the numbers compare with them;
batch 8 is fixed rather than "as large as vanilla allows": the vanilla Transformer (L x L fp32
scores) needs about 10.5 GiB at this size on an H100, so batch 8 is safe on an 80 GB GPU and the
same batch for every model keeps the ratios per-step.

scaling keeps batch x L = 65536 tokens per step, so a model whose cost is linear in L has a flat
time curve and a quadratic one grows ~8x from 8K to 64K. Its ``growth`` lengths give the issue's
test: time per *sequence* from 8K to 64K (step time x batch ratio) must grow <= 9x for a linear
model (a quadratic one grows ~64x).

Once a model ran out of memory (or was too slow, see ``max_step_s``) at some length, longer
lengths of the same model are recorded without running them (harness/runner.py, "skip after
failure"), which keeps the GPU sweep inside its 10-minute budget.

Causal-only entries (no bidirectional mode, e.g. ovq_attn) run with their LM head: the runner
picks it, since they cannot build a classification head.

With ``--models all`` (the default) both presets add ``variants``: LongVQ and Transformer-VQ with
``key_grad=window`` (Transformer-VQ's key gradient, linear time in training) beside their
defaults (``key_grad=ste``: the exact straight-through gradient of the quadratic formula, whose
backward is O(L^2), models/vq_attention/triton.py). The paper claims linear-time training, so
its speed figures are the ``[key_grad=window]`` rows; the default rows say what exactness costs.
With ``--compile`` paper-text4k also adds ``compiled_variants``: LongVQ[key_grad=window] whose
compiled backward recomputes cheap ops to keep half the activations
(``activation_memory_budget=0.5``), the memory-lean row of the paper's table.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from harness.tasks.text import VOCAB_SIZE as TEXT_VOCAB  # byte-level text: 256 bytes + pad

REFERENCE_MODELS = ("transformer_vanilla", "transformer_sdpa")
# The VQ models' default key gradient is the exact straight-through one (every query, O(L^2) in
# the backward); Transformer-VQ's linear-time training (keys get gradient from their local
# blocks only, models/vq_attention) is what a linear-time speed claim measures: both are rows.
VQ_WINDOW_VARIANTS = ("longvq[key_grad=window]", "transformer_vq[key_grad=window]")
CROSSOVER_REFERENCE = "transformer_sdpa"
# With --compile, the Text-4K table also has LongVQ trading recomputation for memory: its
# compiled backward keeps half of what the partitioner saves by default (ModelConfig's
# activation_memory_budget; the recomputed ops are the cheap elementwise ones).
LEAN_VARIANTS = ("longvq[key_grad=window;activation_memory_budget=0.5]",)


@dataclass(frozen=True)
class EfficiencyPreset:
    """Everything an efficiency preset fixes; the command's explicit flags cannot change the
    shapes (that would be another table), only --models, --set, --warmup, --steps."""

    name: str
    description: str
    lengths: tuple[int, ...]
    backbone: dict[str, Any]  # model-config overrides shared by every entry
    batch: int = 0  # fixed batch at every length, or
    tokens_per_step: int = 0  # batch = max(1, tokens_per_step // L) (constant batch x L)
    warmup: int = 3
    steps: int = 10
    skip_after_failure: bool = True  # record longer L as skipped after an oom / too-slow cell
    max_step_s: float | None = None  # a warm-up step slower than this ends the cell (error)
    growth: tuple[int, int] | None = None  # (short L, long L) of the time-growth column
    profile_len: int = 0  # L used by --profile
    crossover: bool = False  # report the crossover length vs transformer_sdpa
    # model variants added to --models all (harness/registry.py ModelSpec), reported by label
    variants: tuple[str, ...] = VQ_WINDOW_VARIANTS
    compiled_variants: tuple[str, ...] = ()  # added to --models all only with --compile
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if (self.batch > 0) == (self.tokens_per_step > 0):
            raise ValueError(f"preset {self.name!r}: give exactly one of batch, tokens_per_step")

    def batch_for(self, seq_len: int) -> int:
        if self.batch:
            return self.batch
        return max(1, self.tokens_per_step // seq_len)

    def shapes(self) -> list[tuple[int, int]]:
        """(L, batch) of every cell, L ascending (the skip-after-failure rule relies on it)."""
        return [(length, self.batch_for(length)) for length in sorted(self.lengths)]

    def describe_backbone(self) -> str:
        b = self.backbone
        batch = (f"batch {self.batch}" if self.batch
                 else f"batch = {self.tokens_per_step} tokens / L (min 1)")
        return (f"d_model {b['d_model']}, {b['n_layers']} layers, FFN {b['d_ffn']}, "
                f"{b['n_heads']} heads, {batch}, vocab {b['vocab_size']}, classification head "
                f"({b['n_classes']} classes; causal-only entries: LM head)")


# vocab and classes of the Text-4K setting; d_model/layers/FFN/heads of the committed H100 runs
TEXT_HEAD = {"vocab_size": TEXT_VOCAB, "n_classes": 2}
GPU_BACKBONE = {"d_model": 128, "n_layers": 2, "d_ffn": 256, "n_heads": 4, **TEXT_HEAD}
# CPU smoke size: every entry builds at it (2 heads divide 32; the VQ/SSM widths are per-model)
QUICK_BACKBONE = {"d_model": 32, "n_layers": 1, "d_ffn": 64, "n_heads": 2, **TEXT_HEAD}

PRESETS: dict[str, EfficiencyPreset] = {
    "paper-text4k": EfficiencyPreset(
        name="paper-text4k",
        description="LRA Text setting (L=4096, byte vocab, classification): the paper's "
        "speed x / memory x table against transformer_vanilla and transformer_sdpa",
        lengths=(4096,), batch=8, backbone=GPU_BACKBONE, warmup=3, steps=10,
        max_step_s=10.0, profile_len=4096, compiled_variants=LEAN_VARIANTS,
    ),
    "scaling": EfficiencyPreset(
        name="scaling",
        description="L = 1K..64K at 65536 tokens per step: time and memory vs L, the crossover "
        "with transformer_sdpa, time growth 8K -> 64K",
        lengths=(1024, 2048, 4096, 8192, 16384, 32768, 65536), tokens_per_step=65536,
        backbone=GPU_BACKBONE, warmup=3, steps=5, max_step_s=5.0, growth=(8192, 65536),
        profile_len=16384, crossover=True,
    ),
}

# --quick: the same tables at CPU-smoke size (a CI run of all entries in well under a minute)
QUICK_PRESETS: dict[str, EfficiencyPreset] = {
    "paper-text4k": EfficiencyPreset(
        name="paper-text4k",
        description="--quick: L=256 stand-in for the Text-4K table, tiny backbone",
        lengths=(256,), batch=2, backbone=QUICK_BACKBONE, warmup=1, steps=2, profile_len=256,
        compiled_variants=LEAN_VARIANTS,
    ),
    "scaling": EfficiencyPreset(
        name="scaling",
        description="--quick: L = 128..1024 at 1024 tokens per step, tiny backbone",
        lengths=(128, 256, 512, 1024), tokens_per_step=1024, backbone=QUICK_BACKBONE,
        warmup=1, steps=2, growth=(128, 1024), profile_len=512, crossover=True,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_efficiency_preset(name: str, quick: bool = False) -> EfficiencyPreset:
    """The preset (its --quick version when ``quick``); unknown names suggest the closest."""
    table = QUICK_PRESETS if quick else PRESETS
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"--preset: unknown efficiency preset {name!r}.{hint} "
                         f"Known: {', '.join(preset_names())}")
    return table[name]
