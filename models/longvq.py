"""LongVQ (arXiv 2404.11163): a Mega-family gated block whose memory is an SSM and whose
attention reads vector-quantised keys, so attention costs O(L·(S + W)·D) instead of O(L²·D).

One layer, top to bottom (MODELS.md, "LongVQ"):

    X' = silu(SSM(X))                 structured memory: S4D (K*X + D·X) or Mega's damped EMA
                                      (whose module already returns silu(EMA(X) + ω·X)); the silu
                                      makes both memories produce Mega's `mx`
    Z  = silu(Linear_z(X'))           shared representation, width z_dim
    Q  = κ_q ⊙ Z + μ_q                per-dim scale/offset (Mega)
    K  = κ_k ⊙ Z + μ_k
    V  = silu(Linear_v(X))            width v_dim
    Ga = silu(Linear_a(Z))            attention gate, width v_dim
    K̂  = STVQ(K; C)                   nearest of S codes, straight-through (dK = dK̂ for every key)
    O  = Attn(Q, K̂, V, B) ⊙ Ga        softmax or Laplace, local bias B inside the window W
    Go = sigmoid(Linear_o(X'))        output gate
    H  = silu(Linear_h(X') + Linear_u(O))
    Y  = Go ⊙ H + (1 − Go) ⊙ X        gated residual
    Y  = Norm(Y);  Y = Norm(Y + FFN(Y))

Linear_z, Linear_h and Linear_o read the same X' and are one Linear (``proj_mx``, as Mega's
``mx_proj``), split by width: the same maps, one GEMM instead of three each way.

The codebook is trained by EMA k-means (models/vq.py) with a commitment loss β‖K − sg(K̂)‖²
added to the task loss. Ablation fields (each changes the computation; tests prove it):
``codebook_size``, ``attn_fn`` (softmax|laplace), ``local_bias``, ``window``, ``ssm``
(s4d|ema), ``vq`` (off: full quadratic attention on the un-quantised K — the "no VQ"
ablation), ``gate`` (off: no attention gate Ga and no output gate Go, Y = X + H — the "no SSM
gate" ablation, since both gates are computed from the SSM output).

``attn_impl`` picks the VQ attention op: ``auto`` (default: ``triton`` on CUDA when triton
imports, else ``linear``), ``linear`` (O(L·(S+W)·D) torch, custom backward with full
straight-through key gradients), ``triton`` (fused kernels, CUDA) or ``naive`` (materialises the
L×L matrix: the oracle). ``backend`` records the one that ran (``...+vq-triton``).
``key_norm`` (off by default, not in the paper): K is scaled to norm √z_dim before quantising,
as Transformer-VQ normalises its keys; an experiment against the codebook collapse seen on MQAR.
``key_grad``: ``ste`` (default, dK = dK̂ from every query) or ``window`` (Transformer-VQ's
semantics: keys get gradient only from the queries of their exact local blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.backbone import FeedForward, SequenceModel
from harness.config import ModelConfig
from harness.registry import register
from models.ssm import S4D_CONVS, build_memory, resolve_s4d_conv
from models.vq import VectorQuantizer
from models.vq_attention import (
    check_window,
    kernel_inputs,
    resolve_impl,
    vq_attention,
    vq_attention_naive,
)

ATTN_FNS = ("softmax", "laplace")
MEMORIES = ("s4d", "ema")
ATTN_IMPLS = ("auto", "linear", "naive", "triton")
KEY_GRADS = ("ste", "window")


@dataclass
class LongVQConfig(ModelConfig):
    z_dim: int = 64  # width of Q, K and the codes
    v_dim: int = 0  # width of V and O; 0 -> 2 * d_model (Mega's hidden_dim)
    codebook_size: int = 256  # S
    attn_fn: str = "softmax"  # softmax | laplace
    local_bias: bool = True  # learned relative bias b_{i-j} for |i - j| < window
    window: int = 64  # W: local window (and block size of the causal cache); 0: no local part
    ssm: str = "s4d"  # s4d | ema
    d_state: int = 64  # S4D state size N (ssm=s4d)
    ssm_conv: str = "auto"  # S4D conv: auto (by L, device) | fft | chunked (models.s4d_chunked)
    ema_ndim: int = 16  # EMA dimensions (ssm=ema)
    ssm_lr: float = 1e-3  # optimizer hint for SSM parameters (S4 convention)
    vq: bool = True  # off: full attention on un-quantised keys (quadratic ablation)
    gate: bool = True  # off: no attention/output gates (plain residual)
    commitment: float = 1e-3  # beta of the commitment loss
    key_norm: bool = False  # on: K scaled to norm sqrt(z_dim) before quantising (codes on a sphere)
    vq_decay: float = 0.99  # EMA k-means decay
    dead_code_threshold: float = 0.0  # restart codes whose EMA count falls below this (0: never)
    codebook_init: str = "batch"  # batch: codes copied from the first training batch's keys
    attn_impl: str = "auto"  # auto (triton on CUDA, else linear) | linear | naive | triton
    key_grad: str = "ste"  # ste (every query) | window (only the exact local blocks)

    def validate(self) -> None:
        for name, value, allowed in (("attn_fn", self.attn_fn, ATTN_FNS),
                                     ("ssm", self.ssm, MEMORIES),
                                     ("ssm_conv", self.ssm_conv, S4D_CONVS),
                                     ("attn_impl", self.attn_impl, ATTN_IMPLS),
                                     ("key_grad", self.key_grad, KEY_GRADS),
                                     ("codebook_init", self.codebook_init, ("batch", "random"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(allowed)}")
        for name in ("z_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        check_window(self.window, self.local_bias, self.key_grad, bias_name="local_bias")

    def resolved_for(self, seq_len: int, device: str, compiled: bool) -> LongVQConfig:
        if self.ssm != "s4d":
            return self
        return self.replace(ssm_conv=resolve_s4d_conv(self.ssm_conv, seq_len,
                                                      torch.device(device), compiled))

    @property
    def value_dim(self) -> int:
        return self.v_dim or 2 * self.d_model


class ScaleOffset(nn.Module):
    """Q = κ ⊙ Z + μ (Mega's per-dimension affine map, one per output)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02) + 1.0)
        self.offset = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.offset


class LongVQLayer(nn.Module):
    """The gated LongVQ mixer + post-norm FFN: (B, L, d_model) -> (B, L, d_model)."""

    def __init__(self, cfg: LongVQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, z, v = cfg.d_model, cfg.z_dim, cfg.value_dim
        memory_kw = ({"d_state": cfg.d_state, "lr": cfg.ssm_lr, "conv": cfg.ssm_conv}
                     if cfg.ssm == "s4d"
                     else {"ndim": cfg.ema_ndim, "lr": cfg.ssm_lr})
        self.memory = build_memory(cfg.ssm, d, bidirectional=not cfg.causal, **memory_kw)
        # Linear_z, Linear_h and (gate) Linear_o all read X': one GEMM, split (Mega's mx_proj)
        self.mx_widths = (z, d, d) if cfg.gate else (z, d)
        self.proj_mx = nn.Linear(d, sum(self.mx_widths))
        self.q_affine, self.k_affine = ScaleOffset(z), ScaleOffset(z)
        self.proj_v = nn.Linear(d, v)
        self.proj_u = nn.Linear(v, d)
        if cfg.gate:
            self.proj_a = nn.Linear(z, v)
        self.rel_bias = (nn.Parameter(torch.empty(2 * cfg.window - 1).normal_(0.0, 0.02))
                         if cfg.local_bias else None)
        self.quantizer = (VectorQuantizer(z, cfg.codebook_size, heads=1, decay=cfg.vq_decay,
                                          commitment=cfg.commitment,
                                          dead_code_threshold=cfg.dead_code_threshold or None,
                                          init_from_batch=cfg.codebook_init == "batch")
                          if cfg.vq else None)
        self.norm_mixer = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.d_ffn, cfg.dropout) if cfg.d_ffn > 0 else None
        self.norm_ffn = nn.LayerNorm(d) if cfg.d_ffn > 0 else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}
        # the kernels that ran: "auto" choices (S4D conv, VQ attention) resolve per forward
        impl = "linear" if cfg.attn_impl == "auto" else cfg.attn_impl
        self.attention_backend = f"vq-{impl}" if cfg.vq else "full-attn"

    @property
    def backend(self) -> str:
        memory = f"ssm-{self.memory.last_conv}" if self.cfg.ssm == "s4d" else "ema-fft"
        return f"{memory}+{self.attention_backend}"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attn(Q, K̂, V, B) on (B, L, ·) tensors, as one head."""
        cfg = self.cfg
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)  # (B, 1, L, ·)
        if self.quantizer is None:  # the "no VQ" ablation: exact attention on K itself
            codes = torch.zeros(k.shape[:-1], dtype=torch.long, device=k.device)
            out = vq_attention_naive(q, k, v, k.new_zeros(1, 1, k.shape[-1]), codes,
                                     self.rel_bias, attn_fn=cfg.attn_fn, causal=cfg.causal,
                                     window=cfg.window)
            self.aux_loss = None
            self.last_stats = {}
        else:
            quantized = self.quantizer(k)
            impl = resolve_impl(cfg.attn_impl, q)
            self.attention_backend = f"vq-{impl}"
            q, k_hat, v = kernel_inputs(impl, q, quantized.k_hat, v)
            out = vq_attention(q, k_hat, v, quantized.codebook, quantized.codes,
                               self.rel_bias, attn_fn=cfg.attn_fn, causal=cfg.causal,
                               window=cfg.window, impl=impl, key_grad=cfg.key_grad)
            self.aux_loss = quantized.commit_loss
            self.last_stats = {"codebook_utilisation": quantized.utilisation,
                               "codebook_perplexity": quantized.perplexity}
        return out.squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = self.memory(x)
        mx = memory if self.cfg.ssm == "ema" else F.silu(memory)  # X'
        z_in, h_in, *o_in = self.proj_mx(mx).split(self.mx_widths, dim=-1)
        z = F.silu(z_in)
        q, k = self.q_affine(z), self.k_affine(z)
        if self.cfg.key_norm:  # Transformer-VQ normalises keys, which keeps k-means codes in use
            k = F.normalize(k, dim=-1) * self.cfg.z_dim ** 0.5
        v = F.silu(self.proj_v(x))
        o = self.attend(q, k, v)
        if self.cfg.gate:
            o = o * F.silu(self.proj_a(z))
        h = F.silu(h_in + self.proj_u(self.dropout(o)))
        if self.cfg.gate:
            gate_out = torch.sigmoid(o_in[0])
            y = gate_out * h + (1.0 - gate_out) * x
        else:
            y = x + h
        y = self.norm_mixer(self.dropout(y))
        if self.ffn is not None:
            y = self.norm_ffn(y + self.ffn(y))
        return y


@register("longvq", family="longvq", config=LongVQConfig,
          reference={"attn_impl": "naive", "ssm_conv": "fft"})
def build_longvq(cfg: LongVQConfig) -> SequenceModel:
    """LongVQ: SSM memory + vector-quantised attention + local bias (linear time)."""
    return SequenceModel(cfg, lambda c, _layer: LongVQLayer(c))
