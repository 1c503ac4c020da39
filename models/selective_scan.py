"""Plain-PyTorch references of the Mamba / Mamba-2 scans and the glue shared by both baselines.

Mamba (selective scan, semantics of state-spaces/mamba ``ops/selective_scan_interface.py``'s
``selective_scan_ref``), per channel d and state n, with Δ = softplus(delta + delta_bias):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t        (Ā = exp(ΔA); B̄ u ≈ Δ B u, as upstream)
    y_t = C_t · h_t + D u_t,   then y_t ⊙ silu(z_t)

Mamba-2 (SSD; one scalar decay per head h, B/C shared by the heads of a group g = h // (H/G)):

    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ        (state P × N per head)
    y_t = h_t C_t + D_h x_t

``ssd_sequential`` is that recurrence step by step (the oracle); ``ssd_chunked`` is the block
decomposition of ``modules/ssd_minimal.py`` (Listing 1 of the Mamba-2 paper: intra-chunk
quadratic form + inter-chunk state passing), exact up to rounding and fast enough for CPU runs.
``rms_norm_gated`` is ``ops/triton/layernorm_gated.py``'s ``rms_norm_ref``.

Everything computes in at least float32 (float64 stays float64 so tests can be tight) with
autocast off, and returns the input dtype.

``ScanMixer`` runs one Mamba-family module per direction: causal = forward scan; bidirectional =
forward scan + the scan of a *separate* module over the reversed sequence, summed (Caduceus's
BiMamba "add" strategy, untied weights; Vim also keeps separate backward-scan parameters). Each
direction is either the official ``mamba_ssm`` module or our reference module with the same
parameter names; on CUDA the official one runs its kernels, anywhere else ``ref_forward`` runs on
the same parameters (so a model built on a GPU machine still runs on CPU, and state_dicts move
freely between the two). With ``concurrent`` (the baselines' ``concurrent_directions``, on by
default) the official modules of the two directions run on two CUDA streams at once, forward
and (autograd keeps each op's stream) backward: the two scans are independent, and at batch 1
one scan's grid of (batch x channel) blocks leaves most of an H200's SMs idle (session 10: Mamba's
step per sequence grew 9.4x from 8K x 8 to 64K x 1).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "selective_scan_ref",
    "ssd_sequential",
    "ssd_chunked",
    "rms_norm_gated",
    "causal_depthwise_conv",
    "inverse_softplus_dt",
    "official_module",
    "ScanMixer",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _work(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _no_autocast(x: Tensor) -> torch.autocast:
    # The scans accumulate products over L steps: keep them out of bf16/fp16 autocast.
    return torch.autocast(device_type=x.device.type, enabled=False)


@contextlib.contextmanager
def _one_thread():
    """Run a loop of tiny ops on one intra-op thread: on CPU, waking the thread pool for each
    (B, D, N)-sized step costs more than the step (measured 10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t over dim 2 (h_0 = b_0), with the reverse-time backward
    g_t = dL/dh_t + a_{t+1} g_{t+1}; da_t = g_t h_{t-1}, db_t = g_t. Same result as autograd
    through the loop, with one loop each way instead of an autograd node per step."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # (B, D, L, N) each
        # time-major copies: each step then reads and writes one contiguous (B, D, N) slab
        a_t, b_t = a.movedim(2, 0).contiguous(), b.movedim(2, 0).contiguous()
        out = torch.empty_like(b_t)
        with _one_thread():
            h = torch.zeros_like(b_t[0])
            for t in range(b_t.shape[0]):
                h = torch.addcmul(b_t[t], a_t[t], h, out=out[t])
        ctx.save_for_backward(a_t, out)
        return out.movedim(0, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
        a_t, out = ctx.saved_tensors
        g_out = grad_out.movedim(2, 0).contiguous()
        grad_b = torch.empty_like(g_out)
        with _one_thread():
            g = torch.zeros_like(g_out[0])
            for t in range(g_out.shape[0] - 1, -1, -1):
                if t + 1 < g_out.shape[0]:
                    g = torch.addcmul(g_out[t], a_t[t + 1], g, out=grad_b[t])
                else:
                    g = grad_b[t].copy_(g_out[t])
        grad_a = torch.zeros_like(a_t)
        grad_a[1:] = grad_b[1:] * out[:-1]
        return grad_a.movedim(0, 2), grad_b.movedim(0, 2)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Mamba's selective scan. u, delta, z: (B, D, L); A: (D, N); B, C: (B, N, L); D: (D,).

    Sequential over L, each step on whole (B, D, N) tensors; y = C·h is one einsum at the end.
    """
    dtype_in = u.dtype
    work = _work(u, delta, A, B, C)
    with _no_autocast(u):
        u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(work)[..., None]
        if delta_softplus:
            delta = F.softplus(delta)
        decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # Ā_t
        drive = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)  # Δ_t B_t u_t
        states = LinearRecurrence.apply(decay, drive)  # h_t = Ā_t h_{t-1} + Δ_t B_t u_t
        y = torch.einsum("bdln,bnl->bdl", states, C)
        if D is not None:
            y = y + u * D.to(work)[:, None]
        if z is not None:
            y = y * F.silu(z.to(work))
    return y.to(dtype_in)


def _heads_from_groups(t: Tensor, nheads: int) -> Tensor:
    """(b, l, g, n) -> (b, l, h, n): head h reads group h // (H / G), as the SSD kernels do."""
    groups = t.shape[2]
    if nheads % groups:
        raise ValueError(f"nheads={nheads} is not a multiple of ngroups={groups}")
    return t.repeat_interleave(nheads // groups, dim=2)


def ssd_sequential(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> Tensor:
    """SSD recurrence. x: (b, l, h, p); dt: (b, l, h) (already softplus'ed); A: (h,);
    B, C: (b, l, g, n); D: (h,). Returns y: (b, l, h, p)."""
    dtype_in = x.dtype
    work = _work(x, dt, A, B, C)
    with _no_autocast(x):
        x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
        B, C = _heads_from_groups(B, x.shape[2]), _heads_from_groups(C, x.shape[2])
        decay = torch.exp(dt * A)  # (b, l, h)
        state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])  # (b, h, p, n)
        ys = []
        for t in range(x.shape[1]):
            drive = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            state = decay[:, t, :, None, None] * state + drive
            ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
        y = torch.stack(ys, dim=1)
        if D is not None:
            y = y + D.to(work)[:, None] * x
    return y.to(dtype_in)


def _segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above the diagonal.

    ssd_minimal.py's stable form: masked cumsum instead of a difference of cumsums.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # [..., i, j] = a_i
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    out = torch.cumsum(a.masked_fill(~strict, 0.0), dim=-2)
    return out.masked_fill(~torch.ones_like(strict).tril(), float("-inf"))


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """Same function as :func:`ssd_sequential`, by ssd_minimal.py's chunked decomposition.

    Lengths that are not a multiple of the chunk are zero-padded at the end (dt = 0 there: decay
    1, no input), which cannot change earlier outputs. Chunks longer than L are shrunk to L.
    """
    dtype_in = x.dtype
    work = _work(x, dt, A, B, C)
    batch, length, nheads, _ = x.shape
    T = max(1, min(chunk_size, length))
    pad = (-length) % T
    with _no_autocast(x):
        x, dt, A, B, C = (t.to(work) for t in (x, dt, A, B, C))
        xin = x
        B, C = _heads_from_groups(B, nheads), _heads_from_groups(C, nheads)
        if pad:
            x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
            dt = F.pad(dt, (0, 0, 0, pad))
        n_chunks = (length + pad) // T
        xdt = (x * dt[..., None]).view(batch, n_chunks, T, nheads, -1)  # (b, c, l, h, p)
        B = B.view(batch, n_chunks, T, nheads, -1)  # (b, c, l, h, n)
        C = C.view(batch, n_chunks, T, nheads, -1)
        a = (dt * A).view(batch, n_chunks, T, nheads).permute(0, 3, 1, 2)  # (b, h, c, l)
        a_cum = torch.cumsum(a, dim=-1)
        # 1. within a chunk: the masked quadratic (attention-like) form
        scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * torch.exp(_segsum(a))
        y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
        # 2. state each chunk leaves behind, starting from zero
        decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
        states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)
        # 3. pass states across chunks: entering state of chunk c sums chunks < c, decayed
        states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
        decay_chunks = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
        entering = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, states)[:, :-1]
        # 4. contribution of the entering state to each position of the chunk
        y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))
        y = y.reshape(batch, n_chunks * T, nheads, -1)[:, :length]
        if D is not None:
            y = y + D.to(work)[:, None] * xin
    return y.to(dtype_in)


def rms_norm_gated(
    x: Tensor,
    z: Tensor | None,
    weight: Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Gated RMSNorm of layernorm_gated.py: norm(x ⊙ silu(z)) (norm_before_gate=False, Mamba-2's
    setting) or norm(x) ⊙ silu(z); normalised over groups of ``group_size`` channels."""
    dtype_in = x.dtype
    work = _work(x, weight)
    with _no_autocast(x):
        x = x.to(work)
        if z is not None and not norm_before_gate:
            x = x * F.silu(z.to(work))
        size = x.shape[-1] if group_size is None else group_size
        grouped = x.unflatten(-1, (-1, size))
        rstd = torch.rsqrt(grouped.square().mean(dim=-1, keepdim=True) + eps)
        out = (grouped * rstd).flatten(-2) * weight.to(work)
        if z is not None and norm_before_gate:
            out = out * F.silu(z.to(work))
    return out.to(dtype_in)


def causal_depthwise_conv(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """silu(causal depthwise conv) of x (B, C, L) with an ``nn.Conv1d(padding=d_conv - 1)``.

    Written as a sum of the d_conv shifted taps (the same cross-correlation as the Conv1d): on
    CPU the depthwise Conv1d backward took 27% of a Mamba reference training step.
    """
    taps = conv.weight.shape[-1]
    padded = F.pad(x, (taps - 1, 0))
    y = sum(conv.weight[:, 0, k, None] * padded[..., k : k + x.shape[-1]] for k in range(taps))
    if conv.bias is not None:
        y = y + conv.bias[:, None]
    return F.silu(y)


def inverse_softplus_dt(
    n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None, dtype=None
) -> Tensor:
    """dt ~ log-uniform in [dt_min, dt_max] (floored), returned as softplus⁻¹(dt) (Mamba's bias).

    Same RNG call as mamba_simple.py / mamba2.py (one ``torch.rand(n)``), so seeded inits match.
    """
    dt = torch.exp(
        torch.rand(n, device=device, dtype=dtype) * (math.log(dt_max) - math.log(dt_min))
        + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def official_module(name: str) -> type[nn.Module] | None:
    """``mamba_ssm.<name>`` when CUDA is available and mamba_ssm imports, else None (lazy)."""
    if not torch.cuda.is_available():
        return None
    try:
        import mamba_ssm
    except Exception:  # noqa: BLE001 - missing package or a broken CUDA/Triton build alike
        return None
    return getattr(mamba_ssm, name, None)


@functools.cache
def _warn_reference(what: str) -> None:
    warnings.warn(
        f"{what}: mamba_ssm kernels not used (no CUDA, not importable, use_fast_path=off or "
        f"a CPU/float64 input); running the slow in-project torch reference",
        RuntimeWarning,
        stacklevel=3,
    )


RefForward = Callable[[nn.Module, Tensor], Tensor]


class ScanMixer(nn.Module):
    """One scan module (causal) or two (bidirectional: forward + reversed, summed).

    ``mamba_fwd`` / ``mamba_rev`` hold exactly the parameters of ``mamba_ssm.Mamba``/``Mamba2``.
    ``reference_cls`` is our module with those names; any other class is taken to be the
    official one and runs its own forward on CUDA.
    """

    def __init__(
        self,
        make: Callable[[], nn.Module],
        bidirectional: bool,
        reference_cls: type[nn.Module],
        ref_forward: RefForward,
        name: str,
        concurrent: bool = False,
    ) -> None:
        super().__init__()
        self.mamba_fwd = make()
        self.mamba_rev = make() if bidirectional else None
        self._ref_forward = ref_forward
        self._name = name
        self.official = not isinstance(self.mamba_fwd, reference_cls)
        self.backend = "mamba_ssm" if self.official else "torch-reference"
        self.concurrent = concurrent
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def _run(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.official and x.is_cuda and x.dtype in _KERNEL_DTYPES:
            self.backend = "mamba_ssm"
            return module(x)
        self.backend = "torch-reference"
        _warn_reference(self._name)
        return self._ref_forward(module, x)

    def forward(self, x: Tensor) -> Tensor:
        if self.mamba_rev is None:
            return self._run(self.mamba_fwd, x)
        if self.concurrent and self.official and x.is_cuda and x.dtype in _KERNEL_DTYPES:
            return self._both_directions_at_once(x)
        return self._run(self.mamba_fwd, x) + self._run(self.mamba_rev, x.flip(1)).flip(1)

    @torch.compiler.disable  # stream switches stay eager (the mamba_ssm kernels are opaque anyway)
    def _both_directions_at_once(self, x: Tensor) -> Tensor:
        """The two directions on two streams: the reversed one on a side stream forked from the
        current one (also under CUDA graph capture) and joined back before the sum."""
        main = torch.cuda.current_stream(x.device)
        side = self._side_streams.get(x.device)
        if side is None:
            side = self._side_streams[x.device] = torch.cuda.Stream(x.device)
        reversed_x = x.flip(1)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            rev = self._run(self.mamba_rev, reversed_x)
        out = self._run(self.mamba_fwd, x)
        main.wait_stream(side)
        # memory made on one stream and read on the other: the allocator must not hand it out
        # again before the reading stream is done with it
        reversed_x.record_stream(side)
        rev.record_stream(main)
        return out + rev.flip(1)


def scan_block(cfg, make: Callable[[], nn.Module], reference_cls: type[nn.Module],
               ref_forward: Callable, name: str) -> nn.Module:
    """The backbone block of the Mamba entries: pre-norm ScanMixer (+ FFN when d_ffn > 0);
    bidirectional (forward + reversed scan) for classification heads, causal for LM heads."""
    from harness.backbone import PreNormBlock

    mixer = ScanMixer(make, bidirectional=not cfg.causal, reference_cls=reference_cls,
                      ref_forward=ref_forward, name=name,
                      concurrent=getattr(cfg, "concurrent_directions", False))
    return PreNormBlock(cfg, mixer)


def mark_no_decay(*params: nn.Parameter) -> None:
    """mamba_ssm's ``_no_weight_decay`` flag, and our optimizer hint with the same meaning."""
    for param in params:
        param._no_weight_decay = True
        param._optim = {"weight_decay": 0.0}
