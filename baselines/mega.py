"""Mega baselines: moving-average equipped gated attention (facebookresearch/mega), full or chunked.

One block = ``MovingAverageGatedAttention`` then ``NormalizedFeedForwardNetwork``, ported from
``fairseq/modules/{moving_average_gated_attention,normalized_feedforward_network}.py``. On
(B, L, D), with X the (post- or pre-normed) input::

    X' = silu(EMA(X) + omega X)                 multi-dim damped EMA (models.ssm.MultiHeadEMA)
    u, zr, hx = split(Linear_mx(X'), [D, S+E, D])
    u = sigmoid(u);  z, r = split(silu(zr), [S, E])          update gate u, reset gate r
    Q = kappa_q z + mu_q,  K = kappa_k z + mu_k              shared representation z (width S)
    V = silu(Linear_v(X))                                    width E = hidden_dim
    O = Attn(Q, K, V)                                        single head
    H = silu(hx + Linear_h(O * r))
    Y = X + u * (H - X);  post-norm: Y = norm(Y)             (pre-norm: X normed first)
    NFFN: norm(Y + fc2(silu(fc1(Y))))                        (pre-norm: Y + fc2(silu(fc1(norm Y))))

Attention, with B_ij = b[j - i] (``SimpleRelativePositionalBias``) and M the allowed pairs
(causal: j <= i; Mega-chunk: i, j in the same chunk of ``chunk_size``):

- softmax (``softmax_attention``): A = softmax_j over M of (Q_i / sqrt(S)) . K_j + B_ij.
- laplace (``element_attention``): A_ij = M_ij laplace(Q_i . K_j / n_i + B_ij), unnormalised,
  n_i = |{j : M_ij}| (L; i+1 when causal; chunk length or local index + 1 with chunks),
  laplace(x) = 0.5 (1 + erf((x - mu) / (sigma sqrt 2))), mu = sqrt(1/2), sigma = sqrt(1/(4 pi)).

Two paths compute the same A: ``attention_masked`` builds the L x L matrix with M explicit (the
``mega`` entry's path, ``torch-full``, and the test oracle of the chunked path) and
``attention_chunked`` reshapes into (B, L/C, C, C) blocks (``mega_chunk``, ``torch-chunked``,
linear in L). For L not a multiple of C the chunked path pads q, k, v at the end and masks the
pad keys, as Mega's LRA encoder and LM decoder pad tokens with ``padding_idx``: the EMA masks pad
inputs and pads come last, so real positions see exactly what they see without padding. As in
Mega, L <= C is one chunk of length L. The chunked relative bias holds C offsets, so any L works;
the full path's holds ``max_positions`` and longer inputs raise a ValueError (the efficiency
runner raises ``max_positions`` to a cell's L unless it was set: ``MegaConfig.sized_for``).

Deviations from fairseq (all deliberate): layout (B, L, D) not (L, B, D); LayerNorm only (Mega's
LRA configs use ScaleNorm/BatchNorm per task); no padding masks or incremental decoding (the
harness has neither); the NFFN width is the backbone's ``d_ffn`` (fair-comparison rule), Mega's
default being ``hidden_dim``; the backbone's final LayerNorm is kept after post-norm blocks (Mega
has a final norm only with pre-norm). Parameter names match fairseq's (the test checks them).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.backbone import SequenceModel
from harness.config import ModelConfig
from harness.registry import register
from models.ssm import MultiHeadEMA

ATTN_FNS = ("softmax", "laplace")


@dataclass
class MegaConfig(ModelConfig):
    z_dim: int = 0  # S, shared representation / q-k width; 0 = auto min(64, d_model // 2)
    hidden_dim: int = 0  # E, value width (fairseq hdim); 0 = auto 2 * d_model
    ndim: int = 16  # EMA dimensions per channel
    attn_fn: str = "softmax"  # "softmax" or "laplace"
    chunk_size: int = -1  # -1 = full attention; > 0 = attention inside chunks (Mega-chunk)
    max_positions: int = 8192  # full attention's relative-bias range (longer L raises)
    truncation: int = 0  # EMA kernel truncation length; 0 = none
    prenorm: bool = False  # Mega's LRA and LM configs default to post-norm
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0  # on V and inside the NFFN (fairseq hidden/activation dropout)

    def sized_for(self, seq_len: int, fixed: Collection[str] = ()) -> MegaConfig:
        """The full path's relative-bias table holds ``max_positions`` offsets: raised to
        ``seq_len`` (the scaling preset's 16K-64K) unless the user set it."""
        if self.chunk_size == -1 and seq_len > self.max_positions and "max_positions" not in fixed:
            return self.replace(max_positions=seq_len)
        return self

    def resolved_z_dim(self) -> int:
        return self.z_dim if self.z_dim > 0 else max(1, min(64, self.d_model // 2))

    def resolved_hidden_dim(self) -> int:
        return self.hidden_dim if self.hidden_dim > 0 else 2 * self.d_model

    def validate(self) -> None:
        if self.attn_fn not in ATTN_FNS:
            raise ValueError(f"attn_fn must be one of {ATTN_FNS}, got {self.attn_fn!r}")
        if self.chunk_size == 0 or self.chunk_size < -1:
            raise ValueError(f"chunk_size must be -1 (full) or > 0, got {self.chunk_size}")
        for name in ("z_dim", "hidden_dim", "truncation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = default), got {getattr(self, name)}")
        if self.ndim <= 0 or self.max_positions <= 0:
            raise ValueError(
                f"ndim and max_positions must be > 0, got ndim={self.ndim}, "
                f"max_positions={self.max_positions}"
            )


# ----------------------------------------------------------------------------- attention ops


def laplace(x: Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> Tensor:
    """Mega's ``utils.laplace`` (its literal constants): a Gaussian CDF used as attention fn."""
    return 0.5 * (1.0 + torch.erf((x - mu) / (sigma * math.sqrt(2.0))))


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Scores in >= float32 (Mega's softmax runs in float32); float64 stays float64 for tests.
    return torch.promote_types(x.dtype, torch.float32)


def attention_masked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    allowed: Tensor | None,
    attn_fn: str,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Quadratic path: q, k (B, L, S), v (B, L, E), bias (L, L), allowed (L, L) bool or None."""
    scaling = q.size(-1) ** -0.5
    compute = _compute_dtype(q)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf, bf = q.to(compute), k.to(compute), bias.to(compute)
        if attn_fn == "softmax":
            logits = (qf * scaling) @ kf.transpose(-1, -2) + bf
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            weights = logits.softmax(dim=-1)
        else:
            n = allowed.sum(-1, keepdim=True).to(compute) if allowed is not None else k.size(-2)
            weights = laplace(qf @ kf.transpose(-1, -2) / n + bf)
            if allowed is not None:
                weights = weights * allowed.to(compute)
        weights = F.dropout(weights, dropout, training)
        return (weights @ v.to(compute)).to(v.dtype)


def attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    chunk: int,
    causal: bool,
    attn_fn: str,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Mega-chunk: attention inside non-overlapping chunks; bias (C', C') with C' = min(C, L)."""
    batch, length, _ = q.shape
    if length <= chunk:  # one chunk of length L, unpadded (as Mega)
        chunk = length
    pad = -length % chunk
    if pad:  # pad at the end, mask pad keys (Mega pads tokens with padding_idx)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n_chunks = (length + pad) // chunk
    qc, kc, vc = (t.reshape(batch, n_chunks, chunk, t.size(-1)) for t in (q, k, v))
    idx = torch.arange(chunk, device=q.device)
    allowed: Tensor | None = None  # None = every pair of the chunk (no mask work)
    if causal:
        allowed = idx[None, :] <= idx[:, None]
    if pad:
        is_real = (torch.arange(length + pad, device=q.device) < length).view(n_chunks, 1, chunk)
        allowed = is_real if allowed is None else allowed & is_real
    out = attention_masked(qc, kc, vc, bias, allowed, attn_fn, dropout, training)
    return out.reshape(batch, n_chunks * chunk, -1)[:, :length]


def block_diagonal_mask(length: int, chunk: int, causal: bool, device=None) -> Tensor:
    """The (L, L) allowed-pairs mask of Mega-chunk, for the quadratic reference."""
    idx = torch.arange(length, device=device)
    allowed = (idx[:, None] // chunk) == (idx[None, :] // chunk)
    if causal:
        allowed = allowed & (idx[None, :] <= idx[:, None])
    return allowed


# ----------------------------------------------------------------------------- modules


class SimpleRelativePositionalBias(nn.Module):
    """b[j - i] for |j - i| < max_positions: one learned scalar per offset (fairseq's module)."""

    def __init__(self, max_positions: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.rel_pos_bias = nn.Parameter(torch.empty(2 * max_positions - 1))
        nn.init.normal_(self.rel_pos_bias, mean=0.0, std=0.02)

    def forward(self, length: int, clamp: bool = False) -> Tensor:
        """(L, L) with [i, j] = rel_pos_bias[M - 1 + j - i]; ``clamp`` (tests) allows L > M."""
        if length > self.max_positions and not clamp:
            raise ValueError(
                f"Mega: sequence length {length} exceeds max_positions={self.max_positions} of "
                "the relative position bias; raise max_positions or use a chunk_size"
            )
        idx = torch.arange(length, device=self.rel_pos_bias.device)
        limit = self.max_positions - 1
        offsets = (idx[None, :] - idx[:, None]).clamp(-limit, limit) + limit
        return self.rel_pos_bias[offsets]


class SequenceNorm(nn.Module):
    """fairseq's SequenceNorm, LayerNorm case only (keeps the ``norm.norm.*`` state_dict names)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class MovingAverageGatedAttention(nn.Module):
    """Mega's EMA + single-head gated attention sub-layer, residual and norm included."""

    def __init__(self, cfg: MegaConfig) -> None:
        super().__init__()
        d, self.zdim, self.hdim = cfg.d_model, cfg.resolved_z_dim(), cfg.resolved_hidden_dim()
        self.embed_dim, self.causal, self.prenorm = d, cfg.causal, cfg.prenorm
        self.attn_fn, self.chunk_size = cfg.attn_fn, cfg.chunk_size
        self.dropout, self.attention_dropout = cfg.dropout, cfg.attention_dropout
        self.hidden_dropout = cfg.hidden_dropout
        self.norm = SequenceNorm(d)
        self.move = MultiHeadEMA(
            d, ndim=cfg.ndim, bidirectional=not cfg.causal, truncation=cfg.truncation or None
        )
        self.v_proj = nn.Linear(d, self.hdim)
        self.mx_proj = nn.Linear(d, self.zdim + self.hdim + 2 * d)
        self.h_proj = nn.Linear(self.hdim, d)
        self.gamma = nn.Parameter(torch.empty(2, self.zdim))  # q/k scales (kappa)
        self.beta = nn.Parameter(torch.empty(2, self.zdim))  # q/k offsets (mu)
        self.max_positions = cfg.max_positions
        # As fairseq: the bias spans the chunk when chunking, else max_positions.
        self.rel_pos_bias = SimpleRelativePositionalBias(
            cfg.chunk_size if cfg.chunk_size > 0 else cfg.max_positions
        )
        self.backend = "torch-chunked" if cfg.chunk_size > 0 else "torch-full"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.v_proj, self.mx_proj, self.h_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.gamma, mean=0.0, std=0.02)
        nn.init.zeros_(self.beta)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Everything before attention: (q, k, v, u, r, hx) from the (normed) input."""
        drop = self.training
        v = F.dropout(F.silu(self.v_proj(x)), self.hidden_dropout, drop)
        mx = F.dropout(self.move(x), self.dropout, drop)
        u, zr, hx = torch.split(
            self.mx_proj(mx), [self.embed_dim, self.zdim + self.hdim, self.embed_dim], dim=-1
        )
        z, r = torch.split(F.silu(zr), [self.zdim, self.hdim], dim=-1)
        q, k = torch.unbind(z.unsqueeze(-2) * self.gamma + self.beta, dim=-2)
        return q, k, v, torch.sigmoid(u), r, hx

    def attend(self, q: Tensor, k: Tensor, v: Tensor, reference: bool = False) -> Tensor:
        """The attention of this config; ``reference`` forces the quadratic masked path."""
        length, drop = q.size(1), (self.attention_dropout, self.training)
        if self.chunk_size > 0 and not reference:
            bias = self.rel_pos_bias(min(length, self.chunk_size))
            return attention_chunked(
                q, k, v, bias, self.chunk_size, self.causal, self.attn_fn, *drop
            )
        if self.chunk_size > 0:  # quadratic oracle of the chunked path
            allowed = block_diagonal_mask(length, self.chunk_size, self.causal, q.device)
            bias = self.rel_pos_bias(length, clamp=True)  # clamped offsets are all masked
        else:
            allowed = block_diagonal_mask(length, length, True, q.device) if self.causal else None
            bias = self.rel_pos_bias(length)
        return attention_masked(q, k, v, bias, allowed, self.attn_fn, *drop)

    def forward(self, x: Tensor, reference: bool = False) -> Tensor:
        residual = x
        if self.prenorm:
            x = self.norm(x)
        q, k, v, u, r, hx = self.project(x)
        h = self.attend(q, k, v, reference)
        h = F.silu(hx + self.h_proj(h * r))
        h = F.dropout(h, self.dropout, self.training)
        out = torch.addcmul(residual, u, h - residual)  # u * h + (1 - u) * residual
        return out if self.prenorm else self.norm(out)


class NormalizedFeedForwardNetwork(nn.Module):
    """Mega's NFFN: residual silu MLP with its own norm (post- or pre-norm)."""

    def __init__(self, d_model: int, d_ffn: int, cfg: MegaConfig) -> None:
        super().__init__()
        self.prenorm, self.dropout = cfg.prenorm, cfg.dropout
        self.hidden_dropout = cfg.hidden_dropout
        self.norm = SequenceNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ffn)
        self.fc2 = nn.Linear(d_ffn, d_model)
        for linear in (self.fc1, self.fc2):
            nn.init.normal_(linear.weight, mean=0.0, std=0.02)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        residual = x
        if self.prenorm:
            x = self.norm(x)
        x = F.dropout(F.silu(self.fc1(x)), self.hidden_dropout, self.training)
        x = F.dropout(self.fc2(x), self.dropout, self.training) + residual
        return x if self.prenorm else self.norm(x)


class MegaBlock(nn.Module):
    """``MegaSentenceEncoderLayer`` / ``MegaDecoderLayer``: mega_layer then nffn (d_ffn > 0)."""

    def __init__(self, cfg: MegaConfig) -> None:
        super().__init__()
        self.mega_layer = MovingAverageGatedAttention(cfg)
        self.nffn: NormalizedFeedForwardNetwork | None = None
        if cfg.d_ffn > 0:
            self.nffn = NormalizedFeedForwardNetwork(cfg.d_model, cfg.d_ffn, cfg)

    @property
    def backend(self) -> str:
        return self.mega_layer.backend

    def forward(self, x: Tensor, reference: bool = False) -> Tensor:
        x = self.mega_layer(x, reference)
        return self.nffn(x) if self.nffn is not None else x


def build_mega(cfg: MegaConfig) -> SequenceModel:
    return SequenceModel(cfg, lambda c, _i: MegaBlock(c))


@register("mega", family="mega", config=MegaConfig, causal=True, bidirectional=True)
def build_mega_full(cfg: MegaConfig) -> SequenceModel:
    """Mega: damped EMA + single-head gated attention (softmax/Laplace), full L x L attention."""
    return build_mega(cfg)


@register(
    "mega_chunk", family="mega", config=MegaConfig, causal=True, bidirectional=True, chunk_size=128
)
def build_mega_chunk(cfg: MegaConfig) -> SequenceModel:
    """Mega-chunk: Mega with attention inside non-overlapping chunks (linear in L)."""
    return build_mega(cfg)
