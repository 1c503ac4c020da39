"""Transformer-VQ (Lingle 2023): a pre-norm Transformer whose keys are vector-quantised, so
attention runs in linear time through per-code value sums and a per-block cache.

    Q, K, V = X W_q, X W_k, X W_v                 (per head, width D = d_model / n_heads)
    K̂ = STVQ(K; C_h)                              one codebook per head, EMA k-means
    O = Attn(Q, K̂, V, B)                          LongVQ's VQ attention op (models/vq_attention)
    X = X + W_o O;  X = X + FFN(Norm(X))

No SSM and no gates (that is LongVQ's addition). Position information comes from the learned
local bias B inside the window (Lingle uses relative biases too); rotary embeddings cannot be
used, because rotating keys by position would break the "one of S codes" structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.backbone import PreNormBlock, SequenceModel
from harness.config import ModelConfig
from harness.registry import register
from models.vq import VectorQuantizer
from models.vq_attention import IMPLS, check_window, kernel_inputs, resolve_impl, vq_attention


@dataclass
class TransformerVQConfig(ModelConfig):
    codebook_size: int = 256
    window: int = 64  # block size of the cache and width of the local bias; 0: no local part
    local_bias: bool = True
    attn_fn: str = "softmax"  # softmax | laplace
    commitment: float = 1e-3
    vq_decay: float = 0.99
    attn_impl: str = "auto"  # auto (triton on CUDA, else linear) | linear | naive | triton
    key_grad: str = "ste"  # ste (every query) | window (Lingle's: only the exact local blocks)

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.attn_fn not in ("softmax", "laplace"):
            raise ValueError(f"attn_fn={self.attn_fn!r}; choose softmax or laplace")
        if self.attn_impl not in IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}; choose one of {', '.join(IMPLS)}")
        if self.key_grad not in ("ste", "window"):
            raise ValueError(f"key_grad={self.key_grad!r}; choose ste or window")
        check_window(self.window, self.local_bias, self.key_grad, bias_name="local_bias")


class VQSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.quantizer = VectorQuantizer(head_dim, cfg.codebook_size, heads=cfg.n_heads,
                                         decay=cfg.vq_decay, commitment=cfg.commitment)
        self.rel_bias = (nn.Parameter(torch.empty(2 * cfg.window - 1).normal_(0.0, 0.02))
                         if cfg.local_bias else None)
        self.backend = f"vq-{'linear' if cfg.attn_impl == 'auto' else cfg.attn_impl}"
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D)
        quantized = self.quantizer(k)
        impl = resolve_impl(self.cfg.attn_impl, q)
        self.backend = f"vq-{impl}"
        q, k_hat, v = kernel_inputs(impl, q, quantized.k_hat, v)
        o = vq_attention(q, k_hat, v, quantized.codebook, quantized.codes,
                         self.rel_bias, attn_fn=self.cfg.attn_fn, causal=self.cfg.causal,
                         window=self.cfg.window, impl=impl,
                         key_grad=self.cfg.key_grad)
        self.aux_loss = quantized.commit_loss
        self.last_stats = {"codebook_utilisation": quantized.utilisation,
                           "codebook_perplexity": quantized.perplexity}
        return self.out(o.transpose(1, 2).reshape(batch, length, width))


@register("transformer_vq", family="transformer", config=TransformerVQConfig,
          reference={"attn_impl": "naive"})
def build_transformer_vq(cfg: TransformerVQConfig) -> SequenceModel:
    """Transformer-VQ: VQ keys + per-block cache, linear time (Lingle 2023)."""
    return SequenceModel(cfg, lambda c, _layer: PreNormBlock(c, VQSelfAttention(c)))
