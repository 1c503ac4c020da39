"""Vector quantiser for LongVQ / Transformer-VQ keys: nearest code, straight-through, EMA k-means.

    codes      = argmin_s ||k - c_s||^2          via ||k||^2 - 2 k.c + ||c||^2 (no B*L*S*D tensor)
    k_hat      = k + sg(c_codes - k)             forward value c, gradient dk_hat/dk = identity
    commit     = beta * mean_{b,h,l} ||k - sg(k_hat)||^2

Codebook learning is EMA k-means, not gradient descent (the codebook is a buffer), as in
lucidrains/vector-quantize-pytorch ``EuclideanCodebook``:

    n_s  <- decay n_s  + (1 - decay) #{keys assigned to s}         (``cluster_size``)
    m_s  <- decay m_s  + (1 - decay) sum{keys assigned to s}       (``embed_sum``)
    c_s   = m_s / ((n_s + eps) / (N + S eps) * N),  N = sum_s n_s   (Laplace-smoothed counts)

then, optionally, codes whose EMA count fell below ``dead_code_threshold`` are restarted on
random keys of the batch (count reset to the threshold). Choices of ours, documented:

- ``cluster_size`` starts at 1 and ``embed_sum`` at the initial codebook (Transformer-VQ's
  ``c_count = ones``), so c = m / n holds from step 0 and an unused code decays smoothly instead
  of being divided by a near-zero count.
- The commitment loss averages ||k - c||^2 over (batch, head, position); Transformer-VQ sums
  over heads instead (a factor ``heads``) -- fold that into ``commitment`` if matching it.
- No all-reduce: under data parallelism each replica updates its own codebook.
- Distances and EMA run in float32 with autocast disabled, so bf16 autocast is safe.
- The nearest code: on CUDA (``nearest_impl="auto"``, triton importable, dim <= 128) one fused
  Triton kernel (models/_vq_nearest_triton.py: float32-accurate dots on tensor cores, running
  argmin, no (B, H, L, S) distance matrix); elsewhere, and as the reference its tests compare
  with, ``distances`` + argmin in torch.
- The forward returns the codebook it quantised with (``VQOutput.codebook``): the in-place EMA
  update happens after quantising, and VQ-attention must use the same codes as ``k_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from models._optional import importable
from models.vq_attention._common import check_choice

__all__ = ["NEAREST_IMPLS", "VQOutput", "VectorQuantizer", "code_stats"]

NEAREST_IMPLS = ("auto", "torch", "triton")
FUSED_NEAREST_MAX_DIM = 128  # the kernel keeps a (64, dim) tile of keys in registers


def fused_nearest_available() -> bool:
    """Whether the Triton nearest-code kernel imports (the triton package and a working build)."""
    return importable("models._vq_nearest_triton")


# A custom op rather than a graph break: under torch.compile the quantiser's lookup, loss and
# counts around it stay one graph. No autograd: codes are integers and k is detached.
@torch.library.custom_op("longvq::nearest_code", mutates_args=())
def _nearest_code_op(k: Tensor, codebook: Tensor) -> Tensor:
    from models._vq_nearest_triton import nearest_code_triton

    return nearest_code_triton(k, codebook)


@_nearest_code_op.register_fake
def _(k: Tensor, codebook: Tensor) -> Tensor:
    return k.new_empty(k.shape[:-1], dtype=torch.int64)


# the distance products, for torch.compile's partitioner (models/fft_conv.py says why)
@register_flop_formula(torch.ops.longvq.nearest_code)
def _(k_shape, codebook_shape, *, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(k_shape) * codebook_shape[1]


@dataclass
class VQOutput:
    k_hat: Tensor  # (B, H, L, dim), dtype of k; straight-through
    codes: Tensor  # (B, H, L) int64
    commit_loss: Tensor  # scalar float32, beta already applied
    codebook: Tensor  # (H, S, dim) float32, the codebook these codes index
    # fraction of codes hit in this batch, and exp(entropy of its code histogram), both averaged
    # over heads: 0-d float32 tensors on k's device (float() when read: a device sync, which a
    # training step should not pay), nan when compute_stats is off
    utilisation: Tensor
    perplexity: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


def code_stats(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Utilisation and perplexity from per-head code counts (H, S); both averaged over heads."""
    counts = counts.float()
    utilisation = (counts > 0).float().mean(-1)
    probs = counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # 0 log 0 = 0
    return utilisation.mean(), torch.exp(entropy).mean()


class VectorQuantizer(nn.Module):
    """Per-head codebooks of shape (heads, codebook_size, dim), learnt by EMA k-means.

    Args:
        dim: key width. codebook_size: S. heads: independent codebooks, one per key head.
        decay, eps: EMA decay and Laplace smoothing constant.
        commitment: beta of the commitment loss.
        dead_code_threshold: restart codes whose EMA count is below this (None: never).
        init_scale: codebook init is ``init_scale * randn``.
        init_from_batch: if True, the first training forward replaces the codebook by distinct
            random keys of that batch (k-means-style data init) after quantising that batch with
            the starting codebook (so no position's code depends on later keys); a buffer
            remembers it was done.
        seed: seeds the random codebook init (None: torch's default generator).
        distance_chunk: positions per chunk for the distance/argmin (None: all at once); bounds
            the (B, H, chunk, S) distance tensor.
        compute_stats: compute utilisation/perplexity (0-d tensors, no device sync).
        nearest_impl: "auto" (the Triton kernel for CUDA keys when it imports and dim <= 128,
            else torch), "torch" (``distances`` + argmin, the reference) or "triton".
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        heads: int = 1,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment: float = 1e-3,
        dead_code_threshold: float | None = None,
        init_scale: float = 1.0,
        init_from_batch: bool = False,
        seed: int | None = None,
        distance_chunk: int | None = None,
        compute_stats: bool = True,
        nearest_impl: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("nearest_impl", nearest_impl, NEAREST_IMPLS)
        self.nearest_impl = nearest_impl
        self.dim, self.codebook_size, self.heads = dim, codebook_size, heads
        self.decay, self.eps, self.commitment = decay, eps, commitment
        self.dead_code_threshold = dead_code_threshold
        self.init_from_batch = init_from_batch
        self.distance_chunk = distance_chunk
        self.compute_stats = compute_stats
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        codebook = init_scale * torch.randn(heads, codebook_size, dim, generator=gen)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(heads, codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialised", torch.tensor(not init_from_batch))
        # host copy of ``initialised`` once it is True (it never goes back in training), so a
        # training step does not sync the device to read the buffer
        self._initialised_seen = not init_from_batch
        self.last_stats: dict[str, Tensor] = {}
        # deferred mode (see "Deferred updates" below): the codebook the traced forward reads
        self.register_buffer("codebook_snapshot", codebook.clone(), persistent=False)
        self.defer_update = False
        self._pending: tuple[Tensor, Tensor, Tensor, Tensor, torch.Generator | None] | None = None

    # ------------------------------------------------------------------------------ lookup
    def distances(self, k: Tensor, codebook: Tensor | None = None) -> Tensor:
        """Squared L2 distances (B, H, L, S) in float32: ||k||^2 - 2 k.c + ||c||^2."""
        with torch.autocast(device_type=k.device.type, enabled=False):
            kf = k.float()
            cb = (self.codebook if codebook is None else codebook).float()
            cross = torch.einsum("bhld,hsd->bhls", kf, cb)
            k2 = kf.pow(2).sum(-1, keepdim=True)
            c2 = cb.pow(2).sum(-1)[None, :, None, :]
            return k2 - 2.0 * cross + c2

    def fused_nearest(self, k: Tensor) -> bool:
        """Whether ``nearest`` runs the Triton kernel for keys like ``k``."""
        if self.nearest_impl == "auto":
            return (k.is_cuda and k.size(-1) <= FUSED_NEAREST_MAX_DIM
                    and fused_nearest_available())
        return self.nearest_impl == "triton"

    def nearest(self, k: Tensor, codebook: Tensor | None = None) -> Tensor:
        """Codes (B, H, L) int64 of the nearest codeword: the fused kernel (``fused_nearest``),
        or in torch chunked over L."""
        if self.fused_nearest(k):
            return _nearest_code_op(k.detach(), self.codebook if codebook is None else codebook)
        chunk = self.distance_chunk or k.size(2)
        parts = [self.distances(kc, codebook).argmin(-1)
                 for kc in k.detach().split(chunk, dim=2)]
        return torch.cat(parts, dim=2)

    def lookup(self, codes: Tensor, codebook: Tensor | None = None) -> Tensor:
        """Codewords (B, H, L, dim) of ``codes`` (B, H, L)."""
        cb = self.codebook if codebook is None else codebook
        head = torch.arange(cb.size(0), device=codes.device).view(1, -1, 1)
        return cb[head, codes]

    # ----------------------------------------------------------------------------- forward
    # Under torch.compile the quantising itself (distances, argmin, lookup, loss, counts, stats)
    # is traced and fused; two small steps run eager:
    # - the snapshot: the traced graph sees a copy of the codebook, never the buffer. Inductor's
    #   partitioner may save a graph input for the backward (recomputing the lookup from it),
    #   and the in-place EMA update would invalidate the buffer (a version-counter error);
    # - the update: the one-off data init reads a device flag and both it and the EMA step
    #   mutate buffers; traced, the flag would recompile the rest of the layer after step 1.
    # Called on its own, the quantiser runs both inside ``forward`` (``_snapshot``, ``_update``:
    # two graph breaks). Deferred updates (``defer_update = True``, set by a model that drives
    # them, harness/backbone.py): ``take_snapshot()`` copies the codebook into
    # ``codebook_snapshot`` before the model's forward, ``forward`` reads that buffer and keeps
    # the batch's statistics, and ``apply_pending_update()`` runs the update after the model's
    # forward. The same numbers (each quantiser reads its codebook once per forward, before its
    # own update), and a compiled model's forward is one graph instead of three per layer.
    @torch.compiler.disable
    def take_snapshot(self) -> None:
        """Deferred mode: copy the codebook into ``codebook_snapshot`` (before a forward)."""
        self.codebook_snapshot.copy_(self.codebook)

    @torch.compiler.disable
    def apply_pending_update(self) -> None:
        """Deferred mode: the EMA step (or data init) of the last forward, if it had one."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._update(*pending)

    def forward(
        self,
        k: Tensor,
        mask: Tensor | None = None,
        update: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> VQOutput:
        """Quantise keys k: (B, H, L, dim).

        mask: (B, L) bool, True at real tokens; pads are excluded from the loss, the stats and
        the EMA update (their codes are still returned). update: run the EMA step; defaults to
        ``self.training and torch.is_grad_enabled()``. generator: for restarts/batch init (must
        live on k's device; None: torch's default generator).
        """
        bsz, heads, length, dim = k.shape
        if heads != self.heads or dim != self.dim:
            raise ValueError(
                f"expected (B, {self.heads}, L, {self.dim}) keys, got {tuple(k.shape)}"
            )
        if update is None:
            update = self.training and torch.is_grad_enabled()
        valid = (
            torch.ones(bsz, length, dtype=torch.bool, device=k.device)
            if mask is None
            else mask.to(device=k.device, dtype=torch.bool)
        )
        weights = valid.reshape(-1).float()

        # the snapshot is also what is returned: it must survive the update below
        codebook = self.codebook_snapshot.float() if self.defer_update else self._snapshot()
        codes = self.nearest(k, codebook)
        c = self.lookup(codes, codebook)
        k_hat = k + (c.to(k.dtype) - k).detach()

        err = (k.float() - c).pow(2).sum(-1)  # (B, H, L); sg(k_hat) == c
        if mask is None:
            # a Python count, not the sum of a tensor of ones: inductor folds such a sum into a
            # reduction of a constant that Triton 3.6 cannot compile for sm_90 ("PassManager::run
            # failed"; tests/inductor_sm90.py)
            commit_loss = self.commitment * err.sum() / max(bsz * length * heads, 1)
        else:
            denom = (weights.sum() * heads).clamp_min(1.0)
            commit_loss = self.commitment * (err * valid[:, None, :]).sum() / denom

        flat_codes = codes.transpose(0, 1).reshape(heads, -1)
        counts = torch.zeros(heads, self.codebook_size, device=k.device).scatter_add(
            1, flat_codes, weights.expand(heads, -1))
        stats: dict[str, Tensor] = {}
        if self.compute_stats:
            utilisation, perplexity = code_stats(counts)
            stats = {"utilisation": utilisation, "perplexity": perplexity}
        else:
            utilisation = perplexity = torch.full((), math.nan, device=k.device)
        if update:
            # keys for the EMA and sampling: float32, no graph, (H, B*L, dim)
            flat = k.detach().float().transpose(0, 1).reshape(heads, bsz * length, dim)
            # per-code sums of the assigned keys by scatter-add (no one-hot (N, S) matrix),
            # here rather than in the eager update: a compiled model fuses them
            kept = flat if mask is None else flat * weights[None, :, None]
            sums = torch.zeros(heads, self.codebook_size, dim, device=k.device).scatter_add(
                1, flat_codes.unsqueeze(-1).expand(-1, -1, dim), kept)
            if self.defer_update:
                self._pending = (flat, sums, weights, counts, generator)
            else:
                self._update(flat, sums, weights, counts, generator)
        if stats:
            self.last_stats = dict(stats)
        return VQOutput(k_hat, codes, commit_loss, codebook, utilisation, perplexity, stats)

    @torch.compiler.disable
    def _snapshot(self) -> Tensor:
        return self.codebook.float().clone()

    @torch.compiler.disable
    def _update(self, flat: Tensor, sums: Tensor, weights: Tensor, counts: Tensor,
                generator: torch.Generator | None) -> None:
        # Data init happens after this batch is quantised: codes built from the batch's own keys
        # would let a causal model's early positions see later ones on its first step.
        if self.init_from_batch and not self._is_initialised():
            self._init_from(flat, weights, generator)
        else:
            self._ema_update(flat, sums, weights, counts, generator)

    def _is_initialised(self) -> bool:
        if not self._initialised_seen:
            self._initialised_seen = bool(self.initialised)  # syncs until the data init ran
        return self._initialised_seen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a loaded state may be an uninitialised one: read the buffer again on the next step
        self._initialised_seen = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------ update
    def _sample_keys(
        self, flat: Tensor, weights: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """(H, S, dim) random valid keys per head, distinct when the batch has >= S keys.

        Random scores + top-k instead of ``nonzero``/``randperm`` keeps it free of host syncs;
        pads get score -1 so they are taken only when there are fewer than S real keys.
        """
        heads, n, _ = flat.shape
        if n >= self.codebook_size:
            scores = torch.rand(heads, n, device=flat.device, generator=generator)
            scores = torch.where(weights > 0, scores, torch.full_like(scores, -1.0))
            idx = scores.topk(self.codebook_size, dim=1).indices
        else:
            probs = weights.clamp_min(1e-12).expand(heads, -1)
            idx = torch.multinomial(probs, self.codebook_size, True, generator=generator)
        return torch.gather(flat, 1, idx.unsqueeze(-1).expand(-1, -1, flat.size(-1)))

    @torch.no_grad()
    def _init_from(self, flat: Tensor, weights: Tensor, generator: torch.Generator | None) -> None:
        sampled = self._sample_keys(flat, weights, generator)
        self.codebook.copy_(sampled)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(sampled)
        self.initialised.fill_(True)
        self._initialised_seen = True

    @torch.no_grad()
    def _ema_update(
        self,
        flat: Tensor,
        sums: Tensor,
        weights: Tensor,
        counts: Tensor,
        generator: torch.Generator | None,
    ) -> None:
        """One EMA k-means step from this batch's per-code counts and key sums (H, S(, dim))."""
        cluster_size = self.cluster_size.float().lerp(counts, 1.0 - self.decay)
        embed_sum = self.embed_sum.float().lerp(sums, 1.0 - self.decay)
        total = cluster_size.sum(-1, keepdim=True)
        smoothed = (cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codebook = embed_sum / smoothed.unsqueeze(-1)

        if self.dead_code_threshold is not None:
            dead = cluster_size < self.dead_code_threshold  # (H, S)
            sampled = self._sample_keys(flat, weights, generator)
            reset = float(self.dead_code_threshold)
            codebook = torch.where(dead[..., None], sampled, codebook)
            embed_sum = torch.where(dead[..., None], sampled * reset, embed_sum)
            cluster_size = torch.where(dead, torch.full_like(cluster_size, reset), cluster_size)

        self.cluster_size.copy_(cluster_size)
        self.embed_sum.copy_(embed_sum)
        self.codebook.copy_(codebook)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, heads={self.heads}, "
            f"decay={self.decay}, commitment={self.commitment}, "
            f"dead_code_threshold={self.dead_code_threshold}"
        )
