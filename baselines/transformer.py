"""Transformer baselines: one model, two attention cores.

``transformer_vanilla`` materialises the L x L score matrix in float32 (even under autocast) —
the paper's "vanilla Transformer", whose memory grows as L^2. ``transformer_sdpa`` is the same
model with the same parameter layout, its core replaced by
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU).
A state_dict moves between the two unchanged; tests check they compute the same function.

Block: pre-norm, multi-head self-attention with rotary position embeddings (no length limit,
no parameters), then a GELU MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.backbone import PreNormBlock, SequenceModel
from harness.config import ModelConfig
from harness.registry import register


@dataclass
class TransformerConfig(ModelConfig):
    rope: bool = True  # rotary position embeddings on q and k

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding over the last dim of (B, H, L, D), rotating half-pairs."""
    length, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half :]], dim=-1) if dim % 2 else rotated


def attention_vanilla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """softmax(Q K^T / sqrt(D)) V with the (B, H, L, L) scores materialised in float32.

    Half-precision inputs are upcast (autocast is switched off here); float64 stays float64.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
        scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            length = q.shape[-2]
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return (scores.softmax(dim=-1) @ vf).to(v.dtype)


# SDPA kernels tried in this order; the first one that accepts the inputs is used and recorded.
_SDPA_ORDER: tuple[tuple[SDPBackend, str], ...] = (
    (SDPBackend.FLASH_ATTENTION, "sdpa-flash"),
    (SDPBackend.EFFICIENT_ATTENTION, "sdpa-mem-efficient"),
    (SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn"),
    (SDPBackend.MATH, "sdpa-math"),
)


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``core`` is ``vanilla`` or ``sdpa``. Same parameters for both."""

    def __init__(self, cfg: TransformerConfig, core: str) -> None:
        super().__init__()
        if core not in {"vanilla", "sdpa"}:
            raise ValueError(f"unknown attention core {core!r}")
        self.core = core
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.rope = cfg.rope
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.backend = "vanilla-fp32" if core == "vanilla" else "sdpa"
        # which SDPA kernel accepted inputs of a given (device, dtype, grad) signature
        self._sdpa_choice: dict[tuple, int] = {}

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        signature = (q.device.type, q.dtype, torch.is_grad_enabled())
        start = self._sdpa_choice.get(signature, 0)
        for index in range(start, len(_SDPA_ORDER)):
            kernel, name = _SDPA_ORDER[index]
            try:
                with sdpa_kernel([kernel]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            except RuntimeError as exc:
                if "No available kernel" not in str(exc):
                    raise
                continue
            if not torch.compiler.is_compiling():
                # a traced graph keeps the choice it traced; remembering it here too would
                # change the dict that graph is guarded on and recompile it on the next step
                self._sdpa_choice[signature] = index
            self.backend = name
            return out
        raise RuntimeError("no SDPA kernel accepted these inputs")  # MATH always should

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        if self.rope:
            q, k = rotary(q), rotary(k)
        if self.core == "vanilla":
            o = attention_vanilla(q, k, v, self.causal)
        else:
            o = self._sdpa(q, k, v)
        return self.out(o.transpose(1, 2).reshape(batch, length, width))


def build_transformer(cfg: TransformerConfig, core: str) -> SequenceModel:
    return SequenceModel(cfg, lambda c, _i: PreNormBlock(c, SelfAttention(c, core)))


@register("transformer_vanilla", family="transformer", config=TransformerConfig)
def build_vanilla(cfg: TransformerConfig) -> SequenceModel:
    """Transformer, L x L fp32 scores materialised (the paper's vanilla baseline)."""
    return build_transformer(cfg, "vanilla")


@register("transformer_sdpa", family="transformer", config=TransformerConfig,
          reference_entry="transformer_vanilla")
def build_sdpa(cfg: TransformerConfig) -> SequenceModel:
    """Transformer, scaled_dot_product_attention (flash / mem-efficient on GPU)."""
    return build_transformer(cfg, "sdpa")
