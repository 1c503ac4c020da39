"""Linear attention baseline (Katharopoulos et al. 2020, "Transformers are RNNs").

Per head, with the feature map φ(x) = elu(x) + 1 (positive, so the normaliser is > 0):

    causal:         o_i = φ(q_i)ᵀ Σ_{j≤i} φ(k_j) v_jᵀ  /  (φ(q_i)ᵀ Σ_{j≤i} φ(k_j) + eps)
    bidirectional:  o_i = φ(q_i)ᵀ (φ(K)ᵀ V)            /  (φ(q_i)ᵀ Σ_j φ(k_j) + eps)

No 1/√D scale (the normalisation removes it), eps = 1e-6 as in fast-transformers' LinearAttention.

Three ways to compute it, all the same function:
- :func:`linear_attn_naive` — materialises the (masked) L × L matrix φ(Q)φ(K)ᵀ; the test oracle.
- :func:`linear_attn_chunked` — pure torch. Causal: sequence cut into chunks of ``chunk_size``;
  inside a chunk the masked quadratic form, across chunks the running state Σ φ(k)vᵀ (prefix sum
  of per-chunk states), O(L·C·D + L·D²). Bidirectional: the global φ(K)ᵀV, summed from the
  same per-chunk states (batched chunk-sized GEMMs at any batch size). The normaliser rides
  along as an extra all-ones value column. Backend ``torch-chunked`` / ``torch-kv``.
- causal on CUDA with ``fla`` importable (``use_fla=on``): ``fla.ops.linear_attn.
  chunk_linear_attn`` on φ(q), φ(k), v in fla's (B, T, H, D) layout with ``scale=1`` and
  ``normalize=False``; the normaliser φ(q_i)·cumsum φ(k) is computed here in float32 (fla's own
  ``normalize=True`` has had a wrong cumsum axis and a wrong dk in past releases, fla PRs #594,
  #875). Backend ``fla-chunk``. fla rejects T < H inputs; those take the torch path.

Block: pre-norm (``PreNormBlock``) with the backbone FFN; projections as the Transformer baseline
(one qkv Linear(d, 3d), one output Linear(d, d)), so the two have equal parameter counts.
The torch paths compute in at least float32 with autocast off (long prefix sums in bf16 lose the
normaliser); fla runs in the input dtype, its kernels' intended use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.backbone import PreNormBlock, SequenceModel
from harness.config import ModelConfig
from harness.registry import register


@dataclass
class LinearAttnConfig(ModelConfig):
    chunk_size: int = 64  # torch path: causal intra-chunk quadratic + state; KᵀV summed per chunk
    eps: float = 1e-6  # added to the normaliser
    use_fla: bool = True  # fla chunk kernel for the causal path on CUDA when importable

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


def feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


def linear_attn_naive(q: Tensor, k: Tensor, v: Tensor, causal: bool, eps: float = 1e-6) -> Tensor:
    """Oracle: (B, H, L, D) feature-mapped q, k and v -> (B, H, L, Dv) via the L × L matrix."""
    scores = q @ k.transpose(-1, -2)
    if causal:
        length = q.shape[-2]
        scores = scores * torch.ones(length, length, dtype=q.dtype, device=q.device).tril()
    return (scores @ v) / (scores.sum(dim=-1, keepdim=True) + eps)


def linear_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, eps: float = 1e-6, chunk_size: int = 64
) -> Tensor:
    """Same function as :func:`linear_attn_naive` in O(L): chunked prefix sums / φ(K)ᵀV."""
    ones = torch.ones_like(v[..., :1])
    v1 = torch.cat([v, ones], dim=-1)  # last column accumulates the normaliser Σ φ(k)
    batch, heads, length, dim = q.shape
    size = max(1, min(chunk_size, length))
    pad = (-length) % size
    if pad:  # zero keys/values after the end: invisible to every real (earlier) position
        q, k, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v1))
    n_chunks = (length + pad) // size
    qc = q.reshape(batch, heads, n_chunks, size, dim)
    kc = k.reshape(batch, heads, n_chunks, size, dim)
    vc = v1.reshape(batch, heads, n_chunks, size, -1)
    chunk_states = kc.transpose(-1, -2) @ vc  # (B, H, N, D, Dv+1): Σ over the chunk
    if not causal:
        # φ(K)ᵀV as a sum of chunk states, not one GEMM with inner dimension L: that one ran
        # at batch 1 on a few thread blocks (step time 2x from 8K to 64K at a constant token
        # count on an H200); the state broadcast over chunks keeps dq's GEMMs chunk-sized too
        out = qc @ chunk_states.sum(dim=2, keepdim=True)
    else:
        entering = torch.cumsum(chunk_states, dim=2) - chunk_states  # Σ over earlier chunks
        mask = torch.ones(size, size, dtype=q.dtype, device=q.device).tril()
        intra = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
        out = qc @ entering + intra
    out = out.reshape(batch, heads, n_chunks * size, -1)[:, :, :length]
    return out[..., :-1] / (out[..., -1:] + eps)


def _fla_chunk_linear_attn():
    """fla's chunk kernel when CUDA is available and fla imports, else None (lazy)."""
    if not torch.cuda.is_available():
        return None
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # noqa: BLE001 - missing package or broken Triton build alike
        return None
    return chunk_linear_attn


def linear_attn_fla(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6, kernel=None) -> Tensor:
    """Causal linear attention with fla's chunk kernel. (B, H, L, D) in and out."""
    kernel = kernel or _fla_chunk_linear_attn()
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # fla layout (B, T, H, D)
    numerator, _ = kernel(q, k, v, scale=1.0, normalize=False)
    work = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qf, kf = q.to(work), k.to(work)
        normaliser = (qf * torch.cumsum(kf, dim=1)).sum(dim=-1, keepdim=True) + eps
        out = (numerator.to(work) / normaliser).to(v.dtype)
    return out.transpose(1, 2)


class LinearAttention(nn.Module):
    """Multi-head linear attention, φ = elu + 1; picks fla / chunked torch / global KᵀV."""

    def __init__(self, cfg: LinearAttnConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.chunk_size = cfg.chunk_size
        self.eps = cfg.eps
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self._fla = _fla_chunk_linear_attn() if (cfg.use_fla and cfg.causal) else None
        torch_path = "torch-chunked" if self.causal else "torch-kv"
        self.backend = "fla-chunk" if self._fla is not None else torch_path

    def core(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Feature-mapped attention on (B, H, L, D); records the path that ran."""
        length = q.shape[-2]
        if self._fla is not None and q.is_cuda and q.dtype != torch.float64 and (
            length >= self.n_heads
        ):
            self.backend = "fla-chunk"
            return linear_attn_fla(feature_map(q), feature_map(k), v, self.eps, self._fla)
        self.backend = "torch-chunked" if self.causal else "torch-kv"
        compute = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            qf, kf, vf = (t.to(compute) for t in (q, k, v))
            out = linear_attn_chunked(feature_map(qf), feature_map(kf), vf, self.causal,
                                      self.eps, self.chunk_size)
        return out.to(v.dtype)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        o = self.core(q, k, v)
        return self.out(o.transpose(1, 2).reshape(batch, length, width))


@register("linear_attn", family="attention", config=LinearAttnConfig,
          reference={"use_fla": False})
def build_linear_attn(cfg: LinearAttnConfig) -> SequenceModel:
    """Linear attention (elu+1 features): fla chunk kernel on CUDA, chunked torch elsewhere."""
    return SequenceModel(cfg, lambda c, _i: PreNormBlock(c, LinearAttention(c)))
