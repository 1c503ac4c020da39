"""Online vector-quantized (OVQ) attention: the sequential oracle and the chunked path.

Our reading of Alonso, Figliolia & Millidge (Zyphra 2026, "Online Vector Quantized Attention";
only the abstract was available, see MODELS.md). Per (batch, head) a memory of at most N
components s, each with key centroid c_s (D), value mean m_s (Dv) and count n_s (keys merged).
The sequence is cut into chunks of T positions, processed in order:

read (chunk t, query i, tau = 1/sqrt(D)); ONE softmax over memory components and in-chunk keys:
    l_is = log n_s + tau q_i . c_s          (absent components: -inf)
    l_ij = tau q_i . k_j                    (j in chunk t, j <= i)
    o_i  = sum_s softmax(l)_is m_s + sum_j softmax(l)_ij v_j
  n_s exp(tau q . c_s) is Gaussian mixture regression with equal isotropic variances: a
  component of n merged keys weighs like n copies of its centroid.
write (after the read, so strictly causal: a query never sees the memory of its own chunk):
  mini-batch online k-means. With d(k, c) = ||k - c||^2 / D (the mean squared per-coordinate
  distance; with RMS-normalised keys d in [0, 4] and d = 2 (1 - cos) between two keys):
  - key j OPENS a new component (c = k_j, m = v_j, n = 1) iff d(k_j, c_s) > threshold for every
    component present at the START of the chunk (or none is present) and fewer than N exist;
    openers take new slots in sequence order. Approximation that makes the rule vectorisable:
    keys of one chunk are not tested against each other, so two near-identical new keys in one
    chunk open two components.
  - every other key joins the nearest (d, ties: lowest id) among the components present at the
    start of the chunk and the components opened by EARLIER keys of the same chunk (each
    represented by its opening key);
  - n_s += 1, c_s += (k - c_s) / n_s, m_s += (v - m_s) / n_s, in sequence order. For the batch
    this is exactly c_s = (n c_s + sum k) / (n + m): c_s and m_s are the means of all keys and
    values ever assigned to s. Only touched components change.

Gradients (``grad_through_memory``): assignments, openings and counts are piecewise constant in
k (zero gradient, like any argmin). True: c_s and m_s are differentiable means of the written
k and v, so every key and value gets gradient from every later chunk's read through its
component (exact almost everywhere). False: the memory is built from k.detach(), v.detach();
k and v get gradient only from in-chunk attention, q from both.

``ovq_attention_naive`` is the oracle (loops over batch, head, chunk and, when writing, over keys
one at a time). ``ovq_attention_chunked`` computes the same function in two phases: (1) the
assignments, sequential over chunks and vectorised within a chunk, under no_grad; (2) every
chunk's memory (an exclusive prefix sum over chunks of per-component key/value sums and counts)
and every chunk's read, plain autograd, in groups of ``READ_GROUP`` chunks: per-group memory
starts are materialised ((L / T / READ_GROUP) x N x D per head), each group's per-chunk memories
and (T x (N + T)) read weights only while it runs (recomputed in the backward, checkpoint). O(N D)
state for inference (the returned ``OVQState``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.vq_attention._common import compute_dtype, no_autocast

READ_GROUP = 16  # chunks per group of phase 2 (see ``_chunked``)


@dataclass
class OVQState:
    """Memory after the last chunk, (B, H, N, ...): size independent of the sequence length.

    Sums rather than means: centroid = key_sums / counts, mean = value_sums / counts; slots fill
    in order, so component s exists iff counts[..., s] > 0.
    """

    key_sums: Tensor  # (B, H, N, D)
    value_sums: Tensor  # (B, H, N, Dv)
    counts: Tensor  # (B, H, N), keys merged into each component; 0 = absent

    @property
    def active(self) -> Tensor:
        """Number of components in use, (B, H)."""
        return (self.counts > 0).sum(-1)

    @property
    def centroids(self) -> Tensor:
        return self.key_sums / self.counts.clamp_min(1.0)[..., None]

    @property
    def means(self) -> Tensor:
        return self.value_sums / self.counts.clamp_min(1.0)[..., None]


def _check(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, n_components: int, thr: float):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, L, Dv) matching q; got {tuple(v.shape)}")
    if chunk_size < 1 or n_components < 1:
        raise ValueError(f"chunk_size={chunk_size}, n_components={n_components}: both >= 1")
    if not thr >= 0:  # also rejects nan
        raise ValueError(f"new_threshold must be >= 0, got {thr}")


# ------------------------------------------------------------------------------------ oracle
def ovq_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int,
    n_components: int,
    new_threshold: float,
    grad_through_memory: bool = True,
) -> tuple[Tensor, OVQState]:
    """q, k: (B, H, L, D); v: (B, H, L, Dv). Returns o (B, H, L, Dv) and the final memory."""
    _check(q, k, v, chunk_size, n_components, new_threshold)
    with no_autocast(q):
        dtype = compute_dtype(q)
        heads = [
            _naive_head(q[b, h].to(dtype), k[b, h].to(dtype), v[b, h].to(dtype), chunk_size,
                        n_components, new_threshold, grad_through_memory)
            for b in range(q.shape[0])
            for h in range(q.shape[1])
        ]  # fmt: skip
    per_head = zip(*heads, strict=True)  # (o, key_sums, value_sums, counts) of every head
    o, ks, vs, ns = (torch.stack(x).unflatten(0, tuple(q.shape[:2])) for x in per_head)
    return o.to(q.dtype), OVQState(ks.detach(), vs.detach(), ns)


def _naive_head(q, k, v, chunk, n_max, thr, grad_memory):
    length, dim = k.shape
    tau = dim**-0.5
    k_mem, v_mem = (k, v) if grad_memory else (k.detach(), v.detach())
    cents: list[Tensor] = []  # component s: centroid c_s, value mean m_s, count n_s
    means: list[Tensor] = []
    counts: list[int] = []
    rows = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        # read: one softmax over [log n_s + tau q.c_s] + [tau q.k_j for j <= i in the chunk]
        local = tau * q[start:stop] @ k[start:stop].T
        future = torch.ones_like(local, dtype=torch.bool).triu(1)
        logits, values = [local.masked_fill(future, -math.inf)], [v[start:stop]]
        if cents:
            log_n = torch.tensor(counts, dtype=q.dtype, device=q.device).log()
            logits.insert(0, tau * q[start:stop] @ torch.stack(cents).T + log_n)
            values.insert(0, torch.stack(means))
        rows.append(torch.cat(logits, -1).softmax(-1) @ torch.cat(values))
        # write, one key at a time, against the centroids as they were at the chunk's start
        # followed by this chunk's openers (their opening keys): component ids in that order
        targets = [c.detach() for c in cents]
        n_start = len(targets)
        for j in range(start, stop):
            key = k[j].detach()
            dist = (((key - torch.stack(targets)) ** 2).sum(-1) / dim).tolist() if targets else []
            if (n_start == 0 or min(dist[:n_start]) > thr) and len(cents) < n_max:
                targets.append(key)
                cents.append(k_mem[j])
                means.append(v_mem[j])
                counts.append(1)
                continue
            s = dist.index(min(dist))  # nearest; ties: lowest id
            counts[s] += 1
            cents[s] = cents[s] + (k_mem[j] - cents[s]) / counts[s]
            means[s] = means[s] + (v_mem[j] - means[s]) / counts[s]
    pad = n_max - len(cents)
    n = torch.tensor(counts + [0] * pad, dtype=q.dtype, device=q.device)
    key_sums = F.pad(torch.stack(cents), (0, 0, 0, pad)) * n[:, None]
    value_sums = F.pad(torch.stack(means), (0, 0, 0, pad)) * n[:, None]
    return torch.cat(rows), key_sums, value_sums, n


# ----------------------------------------------------------------------------- chunked path
def ovq_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int,
    n_components: int,
    new_threshold: float,
    grad_through_memory: bool = True,
    initial_state: OVQState | None = None,
) -> tuple[Tensor, OVQState]:
    """Same function as ``ovq_attention_naive``, vectorised per chunk (module docstring).

    initial_state: a memory to continue from (e.g. the state returned for the previous part of
    the stream, which must have ended on a chunk boundary); treated as a constant.
    """
    _check(q, k, v, chunk_size, n_components, new_threshold)
    with no_autocast(q):
        return _chunked(q, k, v, chunk_size, n_components, new_threshold, grad_through_memory,
                        initial_state)  # fmt: skip


def _chunked(q, k, v, chunk, n_max, thr, grad_memory, state0):
    batch, heads, length, dim = q.shape
    dim_v, groups = v.shape[-1], batch * heads
    dtype = compute_dtype(q)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length

    def blocks(x: Tensor) -> Tensor:  # (B, H, L, E) -> (G, n_chunks, T, E), zero padded
        x = F.pad(x.to(dtype), (0, 0, 0, pad))
        return x.reshape(groups, n_chunks, chunk, x.shape[-1])

    qc, kc, vc = blocks(q), blocks(k), blocks(v)
    valid = (torch.arange(n_chunks * chunk, device=q.device) < length).view(n_chunks, chunk)
    if state0 is None:
        sums_k0 = kc.new_zeros(groups, n_max, dim)
        sums_v0 = vc.new_zeros(groups, n_max, dim_v)
        counts0 = kc.new_zeros(groups, n_max)
    else:
        sums_k0 = state0.key_sums.detach().to(dtype).reshape(groups, n_max, dim)
        sums_v0 = state0.value_sums.detach().to(dtype).reshape(groups, n_max, dim_v)
        counts0 = state0.counts.detach().to(dtype).reshape(groups, n_max)

    # phase 1: which component each key joins; slot n_max is a dump for the padding keys
    assign = _assign(kc.detach(), valid, sums_k0, counts0, n_max, thr)

    # phase 2, in groups of READ_GROUP chunks: the memory at the start of each group (earlier
    # groups' key/value sums and counts, + the initial state), then per group the memory of
    # each of its chunks and their reads. With gradients each group is recomputed in the
    # backward (checkpoint): the (chunk x N) memories and (chunk x (N + T)) read weights of
    # every chunk are never all kept (GBs at L = 16K, N = 1024), only per-group starts.
    per_group = min(READ_GROUP, n_chunks)
    n_groups = -(-n_chunks // per_group)
    k_mem, v_mem = (kc, vc) if grad_memory else (kc.detach(), vc.detach())
    group_of = torch.arange(n_chunks, device=q.device) // per_group
    group_slot = (group_of[:, None] * (n_max + 1) + assign).view(groups, -1)
    totals = [_bin_sums(x, group_slot, n_groups, n_max)
              for x in (k_mem, v_mem, torch.ones_like(kc[..., :1]))]
    starts = [_exclusive_cumsum(x) + x0[:, None]
              for x, x0 in zip(totals, (sums_k0, sums_v0, counts0[..., None]), strict=True)]
    recompute = n_groups > 1 and torch.is_grad_enabled() and any(
        x.requires_grad for x in (qc, kc, vc))
    outs = []
    for g in range(n_groups):
        part = slice(g * per_group, (g + 1) * per_group)
        args = (qc[:, part], kc[:, part], vc[:, part], k_mem[:, part], v_mem[:, part],
                assign[:, part], *(x[:, g] for x in starts))
        outs.append(checkpoint(_group_read, *args, use_reentrant=False) if recompute
                    else _group_read(*args))
    o = torch.cat(outs, dim=1)
    o = o.reshape(batch, heads, n_chunks * chunk, dim_v)[:, :, :length].to(q.dtype)

    final = [(x0 + x.sum(1)).detach() for x0, x in zip((sums_k0, sums_v0), totals[:2],
                                                          strict=True)]  # fmt: skip
    final_counts = counts0 + totals[2].sum(1)[..., 0]
    shape = (batch, heads, n_max)
    state = OVQState(final[0].view(*shape, dim), final[1].view(*shape, dim_v),
                     final_counts.view(shape))  # fmt: skip
    return o, state


def _bin_sums(x: Tensor, slot: Tensor, n_bins: int, n_max: int) -> Tensor:
    """(G, bins, T, E) values summed into their (bin, component) slots -> (G, bins, N, E); slot
    (G, bins * T) = bin * (N + 1) + component, component N a dump for padding keys."""
    groups, width = x.shape[0], x.shape[-1]
    flat = x.reshape(groups, -1, width)
    out = flat.new_zeros(groups, n_bins * (n_max + 1), width)
    out = out.scatter_add(1, slot[..., None].expand(-1, -1, width), flat)
    return out.view(groups, n_bins, n_max + 1, width)[:, :, :n_max]


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """Sum over the earlier entries of dim 1 (zero for the first)."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1).cumsum(1)


def _group_read(qc: Tensor, kc: Tensor, vc: Tensor, k_mem: Tensor, v_mem: Tensor,
                assign: Tensor, start_k: Tensor, start_v: Tensor, start_n: Tensor) -> Tensor:
    """Reads of a group of chunks (G, chunks, T, Dv): each chunk's memory is the group's start
    (G, N, .) plus the sums of the group's earlier chunks (components ``assign``)."""
    groups, n_chunks = qc.shape[:2]
    n_max = start_k.shape[1]
    first_slot = torch.arange(n_chunks, device=qc.device)[:, None] * (n_max + 1)
    slot = (first_slot + assign).view(groups, -1)  # one (chunk, component) bin per key
    before = [_exclusive_cumsum(_bin_sums(x, slot, n_chunks, n_max)) + x0[:, None]
              for x, x0 in zip((k_mem, v_mem, torch.ones_like(kc[..., :1])),
                               (start_k, start_v, start_n), strict=True)]
    return _read(qc, kc, vc, before[0], before[1], before[2][..., 0])


def _read(qc: Tensor, kc: Tensor, vc: Tensor, sums_k: Tensor, sums_v: Tensor,
          counts: Tensor) -> Tensor:
    """Outputs (G, chunks, T, Dv) of chunks that read memories (sums, counts) of shape
    (G, chunks, N, .): one softmax over [memory components | causal in-chunk keys]."""
    chunk, n_max, tau = qc.shape[2], counts.shape[-1], qc.shape[-1] ** -0.5
    inv_n = 1.0 / counts.clamp_min(1.0)
    log_n = torch.where(counts > 0, counts.clamp_min(1.0).log(), -math.inf)
    mem_logits = tau * (qc @ sums_k.transpose(-1, -2)) * inv_n[:, :, None, :] + log_n[:, :, None]
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=qc.device).triu(1)
    local_logits = (tau * qc @ kc.transpose(-1, -2)).masked_fill(future, -math.inf)
    weights = torch.cat([mem_logits, local_logits], -1).softmax(-1)
    means = sums_v * inv_n[..., None]
    return weights[..., :n_max] @ means + weights[..., n_max:] @ vc


@torch.no_grad()
def _assign(keys: Tensor, valid: Tensor, sums0: Tensor, counts0: Tensor, n_max: int, thr: float):
    """Component of every key (G, n_chunks, T) int64; n_max for padding. Sequential over chunks.

    Within a chunk everything is a (T, N) or (T, T) tensor op: distances to the start-of-chunk
    centroids, the opening test, slots for openers by a cumsum, and for the others the nearest
    among start-of-chunk centroids and earlier openers of the chunk (their opening keys).
    """
    groups, n_chunks, chunk, dim = keys.shape
    sums = F.pad(sums0, (0, 0, 0, 1))  # slot n_max collects the padding keys
    counts = F.pad(counts0, (0, 1))
    active = (counts0 > 0).sum(-1)  # (G,)
    earlier = torch.ones(chunk, chunk, dtype=torch.bool, device=keys.device).tril(-1)
    out = torch.empty(groups, n_chunks, chunk, dtype=torch.long, device=keys.device)
    ones = keys.new_ones(groups, chunk)
    for t in range(n_chunks):
        key = keys[:, t]
        sq = key.pow(2).sum(-1)
        cent = sums[:, :n_max] / counts[:, :n_max, None].clamp_min(1.0)
        cross = key @ cent.transpose(1, 2)
        d_mem = (sq[..., None] - 2 * cross + cent.pow(2).sum(-1)[:, None]) / dim
        d_mem = d_mem.masked_fill(counts[:, None, :n_max] == 0, math.inf)
        nearest_d = d_mem.min(-1).values
        candidate = ((nearest_d > thr) | nearest_d.isinf()) & valid[t]
        rank = candidate.long().cumsum(-1)  # 1-based order among this chunk's candidates
        opens = candidate & (active[:, None] + rank <= n_max)
        new_id = active[:, None] + rank - 1
        d_loc = (sq[..., None] - 2 * key @ key.transpose(1, 2) + sq[:, None, :]) / dim
        d_loc = d_loc.masked_fill(~(earlier & opens[:, None, :]), math.inf)
        nearest = torch.cat([d_mem, d_loc], -1).argmin(-1)  # first minimum: lowest id
        via_opener = new_id.gather(1, (nearest - n_max).clamp_min(0))
        joined = torch.where(nearest < n_max, nearest, via_opener)
        slot = torch.where(opens, new_id, joined).masked_fill(~valid[t], n_max)
        sums.scatter_add_(1, slot[..., None].expand(-1, -1, dim), key)
        counts.scatter_add_(1, slot, ones)
        active = active + opens.sum(-1)
        out[:, t] = slot
    return out
