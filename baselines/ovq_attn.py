"""OVQ attention (Zyphra 2026, seed paper 002): a causal mixer with an online k-means memory.

Block: pre-norm, then per head q, k, v = x W_q, x W_k, x W_v (one fused projection), optional
QK-norm, ``models.ovq.ovq_attention_chunked`` (equations in ``models/ovq.py``), output
projection; then the backbone's GELU MLP. Causal only: the memory is written after each chunk is
read, so the registry entry refuses the (bidirectional) classification head.

Choices the abstract leaves open — each one a config field, default in brackets:
- ``chunk_size`` [64]: T, positions read exactly (causal softmax) before their chunk is written.
- ``n_components`` [1024]: N, memory slots per head; state O(N D) whatever the length.
- ``new_threshold`` [1.0]: a key opens a new component when d(k, c) = ||k - c||^2 / D exceeds
  it for every centroid present at the chunk's start (and slots remain). With ``qk_norm`` keys
  have RMS 1, d = 2 (1 - cos) between keys: 1.0 means cosine < 0.5 to every centroid.
- ``qk_norm`` [on]: q and k RMS-normalised per head (k without gain, so distances and the
  threshold keep one scale while training; q with a learnable gain, which sets the softmax
  sharpness). Off: raw projections, and the threshold is in their units.
- ``grad_through_memory`` [on]: gradients reach k, v through the centroids and value means (both
  means of the written keys/values given the hard assignment); off: memory built from detached
  k, v (gradient to k, v only from the in-chunk exact attention).
Fixed, not fields: the memory starts empty for every sequence (the first key opens component 0;
no learned prior components); the chunk is written AFTER it is read (writing before would let a
query see later keys of its own chunk through the memory); within a chunk, assignments use the
start-of-chunk centroids plus the earlier openers, and new keys are not tested against each
other (models/ovq.py); tau = 1/sqrt(D); no position encoding (the memory merges keys from all
positions, so rotating keys by position would scatter one content over many centroids).

``last_stats`` per layer: ``active_components`` (fraction of the N slots in use after the last
chunk, mean over batch and heads) and ``mean_count`` (keys merged per active component).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.backbone import PreNormBlock, SequenceModel
from harness.config import ModelConfig
from harness.registry import register
from models.ovq import OVQState, ovq_attention_chunked


@dataclass
class OVQAttnConfig(ModelConfig):
    chunk_size: int = 64
    n_components: int = 1024
    new_threshold: float = 1.0
    qk_norm: bool = True
    grad_through_memory: bool = True

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        if not self.new_threshold >= 0:
            raise ValueError(f"new_threshold must be >= 0, got {self.new_threshold}")


class OVQAttention(nn.Module):
    """Multi-head OVQ attention mixer: (B, L, d_model) -> (B, L, d_model)."""

    def __init__(self, cfg: OVQAttnConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.q_gain = nn.Parameter(torch.ones(self.head_dim)) if cfg.qk_norm else None
        self.backend = "torch-chunked"
        self.last_state: OVQState | None = None  # memory after the last forward (detached)
        # 0-d tensors (no host sync in forward); layer_stats() turns them into floats
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        if self.q_gain is not None:
            q = F.rms_norm(q, (self.head_dim,), self.q_gain, eps=1e-6)
            k = F.rms_norm(k, (self.head_dim,), eps=1e-6)
        o, state = ovq_attention_chunked(
            q, k, v,
            chunk_size=self.cfg.chunk_size,
            n_components=self.cfg.n_components,
            new_threshold=self.cfg.new_threshold,
            grad_through_memory=self.cfg.grad_through_memory,
        )  # fmt: skip
        self.last_state = state
        with torch.no_grad():
            active = state.active.float()
            self.last_stats = {
                "active_components": active.mean() / self.cfg.n_components,
                "mean_count": (state.counts.sum(-1) / active.clamp_min(1.0)).mean(),
            }
        return self.out(o.transpose(1, 2).reshape(batch, length, width))


@register("ovq_attn", family="attention", config=OVQAttnConfig, causal=True, bidirectional=False)
def build(cfg: OVQAttnConfig) -> SequenceModel:
    """OVQ attention: chunked causal attention + online k-means memory of N components."""
    return SequenceModel(cfg, lambda c, _i: PreNormBlock(c, OVQAttention(c)))
