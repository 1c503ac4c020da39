"""Structured memory layers: S4D (diagonal SSM) and Mega's multi-dimensional damped EMA.

Layout: every layer takes and returns (B, L, D). Both memories are global convolutions whose
kernel is built from a few parameters and applied with an FFT convolution; each has a sequential
recurrence reference (``s4d_recurrence_ref``, ``ema_recurrence_ref``) used only by the tests.

S4D follows state-spaces/s4 ``models/s4/s4d.py`` (kernel, init, ``register``) and
``src/models/sequence/kernels/{ssm.py,fftconv.py}`` (inverse init, bidirectional kernel):

    A = -exp(log_A_real) + i A_imag,  dt = exp(log_dt)           (N/2 complex modes per channel)
    dA = exp(dt A),  dB = (exp(dt A) - 1) / A                     (ZOH, B fixed to 1)
    K_l = 2 Re(sum_n C_n dB_n dA_n^l)                            (Vandermonde product)
    y = K * u + D u                                              (FFT convolution of length 2L)

The kernel is not built from the (H, N/2, L) Vandermonde matrix but blockwise (``s4d_kernel``):
with l = m T + j (T ~ sqrt(L)), K_{mT+j} = 2 Re(sum_n [C_n dB_n dA_n^{mT}] dA_n^j), one batched
real matmul of (H, M, N) by (H, N, T) pieces, all in real arithmetic so that torch.compile can
fuse it; ``s4d_vandermonde_ref`` is the direct (complex) formula. The convolution's backward is
written by hand (``models.fft_conv``).

Bidirectional S4D mirrors ``FFTConv``: the kernel has 2 channels that share dt and A and differ in
C; the second is flipped and padded, ``k = pad(k0, (0, L)) + pad(k1.flip(-1), (L, 0))``. As the
official code says, this puts k1_0 at lag -1 (an off-by-one kept on purpose): the anti-causal
part is y_t += sum_{j>=1} k1_{j-1} u_{t+j}; lag 0 belongs to the causal kernel and D only.

MultiHeadEMA follows facebookresearch/mega ``fairseq/modules/exponential_moving_average.py``:
p = sigmoid(alpha), q = 1 - p sigmoid(delta), k_l = sum_n gamma_n sqrt(1/ndim) p_n beta_n q_n^l,
output silu(EMA(x) + omega x) (the silu is applied inside the module, as in the original).
Bidirectional (``shift=True``, Mega's default): lag 0 from the causal kernel only and
y_t += sum_{j>=1} k2_j x_{t+j}; ``shift=False`` gives k2_{j-1} at lag -j, like S4.
(MODELS.md's faithfulness note swaps alpha and delta in p and q and has both bidirectional
kernels include lag 0; the official file, followed here, is as written above.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.fft_conv import fft_conv
from models.s4d_chunked import s4d_chunked_conv

__all__ = [
    "S4DKernel",
    "S4D",
    "S4DOutput",
    "S4D_CONVS",
    "S4D_KERNEL_PARAMS",
    "CHUNKED_MIN_LENGTH",
    "resolve_s4d_conv",
    "MultiHeadEMA",
    "build_memory",
    "register_with_hint",
    "s4d_discretize",
    "s4d_kernel",
    "s4d_block_size",
    "s4d_vandermonde_ref",
    "s4d_recurrence_ref",
    "ema_recurrence_ref",
]


def register_with_hint(
    module: nn.Module, name: str, tensor: Tensor, lr: float | None, weight_decay: float | None = 0.0
) -> None:
    """Register ``tensor`` as a parameter carrying ``_optim`` hints (as s4d.py's ``register``).

    ``lr == 0.0`` makes it a fixed buffer; ``lr=None`` inherits the global lr. The harness's
    optimizer builder turns ``p._optim`` into parameter groups (the S4 training recipe: SSM
    parameters get their own lr and no weight decay).
    """
    if lr == 0.0:
        module.register_buffer(name, tensor)
        return
    module.register_parameter(name, nn.Parameter(tensor))
    optim: dict[str, float] = {}
    if weight_decay is not None:
        optim["weight_decay"] = weight_decay
    if lr is not None:
        optim["lr"] = lr
    getattr(module, name)._optim = optim


def _work_dtype(x: Tensor) -> torch.dtype:
    # FFTs run in at least float32 (bf16/fp16 FFT is inaccurate and often unsupported);
    # float64 stays float64 so the tests can compare against the recurrence tightly.
    return torch.promote_types(x.dtype, torch.float32)


def _no_autocast(x: Tensor) -> torch.autocast:
    # Kernel generation (einsum -> bmm) would otherwise run in bf16/fp16 under CUDA autocast.
    return torch.autocast(device_type=x.device.type, enabled=False)


# EMA kernel generation materialises a (kernel_dim, ndim, positions) Vandermonde tensor q^l:
# 1.1 GB in float32 for a bidirectional d_model 128 (256 kernels), ndim 16, L = 64K, kept for the
# backward. It is built in chunks of this many positions instead, each recomputed in the backward
# (checkpoint): the memory is one chunk's, the result and the gradients the same. S4D does not
# use this: its complex Vandermonde is factorised blockwise (``s4d_kernel``), never materialised.
KERNEL_CHUNK = 2048

# How S4D applies its kernel: "fft" builds K over all L positions and convolves with length-2L
# FFTs; "chunked" (models.s4d_chunked) never builds K: T x T Toeplitz blocks plus a state carried
# between chunks by one scan, linear in L; "auto" picks one per forward (``resolve_s4d_conv``).
S4D_CONVS = ("auto", "fft", "chunked")
# "auto" takes the chunked conv on CUDA from these lengths on. The FFT's cost per token grows with
# L (the kernel and its FFT are per sequence; cuFFT takes two passes past 16K points), the
# chunked conv's does not, but it is ~40 small ops that only fuse under torch.compile. Measured
# on an H200 (results/h200/session9), 64K tokens per step, bf16 autocast, CUDA graph:
# - eager, one S4D layer (d_model 128, N 64, bidirectional) fwd+bwd: FFT 1.53 / 1.79 / 2.12 /
#   3.01 ms at L = 8K / 16K / 32K / 64K, chunked 2.30 / 2.30 / 2.33 / 2.31 ms;
# - compiled LongVQ (Text-4K backbone) step: FFT 7.9 / 8.5 / 8.8 / 10.2 ms, chunked 8.1 / 8.1 /
#   8.2 / 8.2 ms.
CHUNKED_MIN_LENGTH = {"eager": 65536, "compiled": 16384}


def resolve_s4d_conv(conv: str, length: int, device: torch.device,
                     compiled: bool = False) -> str:
    """The convolution S4D runs: ``conv`` itself, or for "auto" the chunked one on CUDA from
    ``CHUNKED_MIN_LENGTH`` (under torch.compile or not) and the FFT otherwise (elsewhere the
    chunked scan is a torch loop)."""
    if conv != "auto":
        return conv
    threshold = CHUNKED_MIN_LENGTH["compiled" if compiled else "eager"]
    return "chunked" if device.type == "cuda" and length >= threshold else "fft"


def chunked_kernel(piece: Callable[..., Tensor], length: int, *inputs: Tensor) -> Tensor:
    """``piece(*inputs, start, stop)`` -> (..., stop - start), over [0, length) in chunks of
    ``KERNEL_CHUNK``, concatenated on the last dim; with gradients each chunk is recomputed in
    the backward."""
    chunk = KERNEL_CHUNK
    if length <= chunk:
        return piece(*inputs, 0, length)
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    parts = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        if recompute:
            parts.append(checkpoint(piece, *inputs, start, stop, use_reentrant=False))
        else:
            parts.append(piece(*inputs, start, stop))
    return torch.cat(parts, dim=-1)


def s4d_block_size(length: int) -> int:
    """Block T of ``s4d_kernel``: the smallest power of two >= sqrt(L), and at least 64.

    The matmul costs the same for every T (c H L N/2 complex products); what T trades is the
    exps and the small tensors, O(H N/2 (c M + T)) with M = ceil(L / T), smallest near
    T = sqrt(L): at L = 64K, T = M = 256, i.e. 512 exps per mode instead of 65536. A power of two
    >= sqrt(L) keeps M <= T and the padding (M T - L < T positions, cut off) below 1/sqrt(L) of
    the output. The floor of 64 keeps the matmul's inner rows (T contiguous positions) wide
    enough to vectorise, and makes any L <= 64 a single block (M = 1, exactly the Vandermonde
    product): at short L the exps are negligible either way.
    """
    return max(64, 1 << (((length - 1).bit_length() + 1) // 2))


def s4d_discretize(log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor,
                   c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ZOH in real arithmetic: (Re dtA, Im dtA) (H, N/2) and (Re w, Im w) (channels, H, N/2),
    w = C dB. The same numbers as ``S4DKernel.discretize`` (complex), written so that inductor
    can compile and fuse them (it does not lower complex tensors on CUDA): exp(x + iy) =
    e^x (cos y + i sin y), and the division by A through its conjugate."""
    dt = torch.exp(log_dt).unsqueeze(-1)
    a_re = -torch.exp(log_a_real)
    x, y = dt * a_re, dt * a_imag  # dtA
    e = torch.exp(x)
    num_re, num_im = e * torch.cos(y) - 1.0, e * torch.sin(y)  # exp(dtA) - 1
    den = a_re * a_re + a_imag * a_imag
    db_re = (num_re * a_re + num_im * a_imag) / den
    db_im = (num_im * a_re - num_re * a_imag) / den
    c_re, c_im = c[..., 0], c[..., 1]
    return x, y, c_re * db_re - c_im * db_im, c_re * db_im + c_im * db_re


def s4d_kernel(log_dt: Tensor, log_a_real: Tensor, a_imag: Tensor, c: Tensor, length: int,
               block: int | None = None) -> Tensor:
    """K_l = 2 Re(sum_n w_cn exp(dtA_n l)) for l in [0, length): (channels, H, length).

    Takes S4DKernel's parameters: log_dt (H,), log_a_real and a_imag (H, N/2), c (channels, H,
    N/2, 2) = view_as_real(C). Blocked, with l = m T + j: K_{mT+j} = 2 Re(sum_n a_cmn b_nj),
    a_cmn = w_cn exp(dtA_n m T) (exp of the product, not a power of exp(dtA T): no error that
    grows with m), b_nj = exp(dtA_n j), j < T. The complex sum's real part is one real batched
    matmul over H, [2 a_re, -2 a_im] (c M, N) by [b_re; b_im] (N, T): only small (M + T)-sized
    tensors besides the output, no loop over positions, nothing to recompute in the backward.
    All in real arithmetic (``s4d_discretize``), so under torch.compile the small ops fuse into
    a few kernels instead of ~25 eager complex ones each way; ``s4d_vandermonde_ref`` is the
    complex formula it is tested against.

    Real rather than complex matmul (``einsum("chmn,hnj->chmj")`` then ``.real``): it computes
    only the real part (half the flops, no complex output of twice the kernel's size; 1.6x
    faster fwd+bwd on CPU) and is as exact. TF32: with ``torch.backends.cuda.matmul.allow_tf32``
    set, a float32 CUDA bmm rounds its inputs to TF32 (10-bit mantissa) and the kernel is then
    good to ~4e-4 instead of ~2e-6 -- but so is a complex64 one (cuBLAS cgemm honours the same
    math mode; measured on an H200, torch 2.11: the Vandermonde einsum this replaces has the same
    4e-4), so neither formulation avoids it and this one changes nothing. The global flag is
    left to the user, not toggled here; float64 parameters are never affected.
    ``block`` overrides ``s4d_block_size(length)`` (tests).
    """
    t = block or s4d_block_size(length)
    m = -(-length // t)
    channels, h, n_half, _ = c.shape
    with _no_autocast(c):  # the real bmm would otherwise run in bf16/fp16 under autocast
        x, y, w_re, w_im = s4d_discretize(log_dt, log_a_real, a_imag, c)
        starts = (torch.arange(m, device=c.device) * t).to(c.dtype).unsqueeze(-1)  # m T
        mag, ang = torch.exp(x.unsqueeze(1) * starts), y.unsqueeze(1) * starts  # (H, M, N/2)
        cos, sin = torch.cos(ang), torch.sin(ang)
        w_re, w_im = w_re.unsqueeze(2), w_im.unsqueeze(2)  # (c, H, 1, N/2)
        head_re = 2 * mag * (w_re * cos - w_im * sin)  # 2 w exp(dtA m T): (c, H, M, N/2)
        head_im = 2 * mag * (w_re * sin + w_im * cos)
        steps = torch.arange(t, device=c.device).to(c.dtype)  # j
        tail_mag, tail_ang = torch.exp(x.unsqueeze(-1) * steps), y.unsqueeze(-1) * steps
        a = torch.cat([head_re, -head_im], dim=-1)  # (c, H, M, N) real
        a = a.transpose(0, 1).reshape(h, channels * m, 2 * n_half)
        b = torch.cat([tail_mag * torch.cos(tail_ang), tail_mag * torch.sin(tail_ang)], dim=1)
        k = torch.bmm(a, b).view(h, channels, m * t).transpose(0, 1)  # (c, H, M T)
    return k[..., :length]


def s4d_vandermonde_ref(weights: Tensor, dt_a: Tensor, length: int) -> Tensor:
    """The direct formula ``s4d_kernel`` factorises (tests only): the (H, N/2, L) complex
    Vandermonde exp(dtA_n l) in one piece, contracted with the weights."""
    positions = torch.arange(length, device=dt_a.device)
    vander = torch.exp(dt_a.unsqueeze(-1) * positions)  # (H, N/2, L) complex
    return 2 * torch.einsum("chn,hnl->chl", weights, vander).real


def _ema_kernel_piece(coeff: Tensor, log_q: Tensor, weights: Tensor, start: int,
                      stop: int) -> Tensor:
    """sum_n w_dn coeff_dn q_dn^l for l in [start, stop): (kernel_dim, stop - start)."""
    positions = torch.arange(start, stop, device=log_q.device).to(log_q).view(1, 1, -1)
    return torch.einsum("dnl,dn->dl", coeff * torch.exp(positions * log_q), weights)


# ----------------------------------------------------------------------------------------- S4D


# S4DKernel's parameters in the order ``s4d_kernel`` and ``s4d_chunked_conv`` take them
S4D_KERNEL_PARAMS = ("log_dt", "log_A_real", "A_imag", "C")


class S4DKernel(nn.Module):
    """Diagonal SSM convolution kernel; ``forward(L)`` returns (channels, H, L)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        channels: int = 1,
        init: str = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = 1e-3,
    ) -> None:
        super().__init__()
        if d_state % 2:
            raise ValueError(f"d_state must be even (N/2 complex modes are stored), got {d_state}")
        h, n_half = d_model, d_state // 2
        log_dt = torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        # C is a plain parameter: s4d.py registers no hint for it, and the full SSMKernelDiag
        # with the LRA configs' lr dict ({dt, A, B}) gives it an empty hint.
        self.C = nn.Parameter(
            torch.view_as_real(torch.randn(channels, h, n_half, dtype=torch.cfloat))
        )
        n = torch.arange(n_half, dtype=torch.float32).expand(h, n_half)
        if init == "lin":  # S4D-Lin
            a_imag = math.pi * n
        elif init == "inv":  # S4D-Inv (dplr.py: N/pi * (N/(2n+1) - 1) with N = d_state)
            a_imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
        else:
            raise ValueError(f"unknown S4D init {init!r}; known: 'lin', 'inv'")
        self.register("log_dt", log_dt, lr)
        self.register("log_A_real", torch.log(0.5 * torch.ones(h, n_half)), lr)
        self.register("A_imag", a_imag.clone(), lr)

    def register(self, name: str, tensor: Tensor, lr: float | None = None) -> None:
        """Register with lr hint and zero weight decay (s4d.py's ``register``)."""
        register_with_hint(self, name, tensor, lr)

    def discretize(self) -> tuple[Tensor, Tensor, Tensor]:
        """ZOH: returns dtA (H, N/2), dB (H, N/2) with B = 1, and C (channels, H, N/2)."""
        dt = torch.exp(self.log_dt)
        a = -torch.exp(self.log_A_real) + 1j * self.A_imag
        dt_a = a * dt.unsqueeze(-1)
        d_b = (torch.exp(dt_a) - 1.0) / a  # no extra dt factor: ZOH with B = 1
        return dt_a, d_b, torch.view_as_complex(self.C)

    def params(self) -> tuple[Tensor, ...]:
        """The parameters (or frozen buffers) named by ``S4D_KERNEL_PARAMS``, in that order."""
        return tuple(getattr(self, name) for name in S4D_KERNEL_PARAMS)

    def forward(self, length: int) -> Tensor:
        # blocked, in real arithmetic (compilable); no (H, N/2, L) Vandermonde
        return s4d_kernel(*self.params(), length)


class S4D(nn.Module):
    """S4D layer: y = K * u + D u on (B, L, H); returns the pure SSM output (no activation)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        bidirectional: bool = False,
        init: str = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        lr: float | None = 1e-3,
        conv: str = "auto",
    ) -> None:
        super().__init__()
        if conv not in S4D_CONVS:
            raise ValueError(f"unknown S4D conv {conv!r}; known: {', '.join(S4D_CONVS)}")
        self.d_model, self.d_state, self.bidirectional = d_model, d_state, bidirectional
        self.conv = conv
        self.last_conv = resolve_s4d_conv(conv, 0, torch.device("cpu"))  # set by each forward
        self.D = nn.Parameter(torch.randn(d_model))
        # Bidirectional = 2 kernel channels sharing dt and A (FFTConv's ``channels *= 2``).
        self.kernel = S4DKernel(
            d_model, d_state, 2 if bidirectional else 1, init, dt_min, dt_max, lr
        )

    def conv_kernel(self, length: int) -> Tensor:
        """Kernel laid out for a circular FFT of length 2L: (H, 2L) bidir, else (H, L)."""
        k = self.kernel(length)
        if not self.bidirectional:
            return k[0]
        return F.pad(k[0], (0, length)) + F.pad(k[1].flip(-1), (length, 0))

    def forward(self, u: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """u: (B, L, H); padding_mask: (B, L) bool, True at pads (zeroed first, as Mega does)."""
        if padding_mask is not None:
            u = u.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        length = u.size(1)
        # (B, H, L) contiguous: made here, a compiled step writes it in the cast's own kernel;
        # a strided x made the FFT copy it, in its forward and again in its backward (H200,
        # LongVQ Text-4K: 4 strided copies, 0.12 ms per step). (``to`` returns u itself when
        # no cast is needed, memory_format or not: hence also ``contiguous``.)
        x = u.transpose(1, 2).to(_work_dtype(u), memory_format=torch.contiguous_format)
        x = x.contiguous()
        self.last_conv = resolve_s4d_conv(self.conv, length, x.device,
                                          compiled=torch.compiler.is_compiling())
        # the chunked conv's products run in the autocast dtype, as a Linear's would
        gemm_dtype = (torch.get_autocast_dtype(x.device.type)
                      if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type)
                      else None)
        with _no_autocast(x):
            if self.last_conv == "chunked":
                y = s4d_chunked_conv(x, *(p.to(x.dtype) for p in self.kernel.params()),
                                     gemm_dtype=gemm_dtype)
                y = y + x * self.D.to(x.dtype).unsqueeze(-1)
            else:
                y = fft_conv(x, self.conv_kernel(length).to(x.dtype), 2 * length,
                             skip=self.D.to(x.dtype))
        return y.transpose(1, 2).to(u.dtype)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, "
                f"bidirectional={self.bidirectional}, conv={self.conv}")


class S4DOutput(nn.Module):
    """The S4D baseline's pointwise tail: exact GELU, tied dropout, Conv1d(H -> 2H, k=1), GLU.

    The Conv1d weights are kept (same state_dict as s4d.py) but applied as a linear map on the
    channel-last layout, which is the same computation without two transposes.
    """

    def __init__(self, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.output_linear = nn.Conv1d(d_model, 2 * d_model, kernel_size=1)

    def forward(self, y: Tensor) -> Tensor:
        y = F.gelu(y)
        if self.training and self.dropout > 0.0:
            # DropoutNd in s4d.py: one mask per (batch, channel), tied across the sequence.
            keep = torch.rand(y.size(0), 1, y.size(-1), device=y.device) >= self.dropout
            y = y * keep.to(y.dtype) / (1.0 - self.dropout)
        w = self.output_linear.weight.squeeze(-1)
        return F.glu(F.linear(y, w, self.output_linear.bias), dim=-1)


@torch.no_grad()
def s4d_recurrence_ref(layer: S4D, u: Tensor) -> Tensor:
    """Sequential reference for ``S4D.forward`` (tests only; float64 inside, loops over L).

    Causal: x_t = dA x_{t-1} + dB u_t, y_t = 2 Re(C0 x_t) (s4's ``step``). Anti-causal, scanning
    backwards, the output is read before u_t enters (the FFTConv off-by-one): y_t += 2 Re(C1 x).
    """
    dt_a, d_b, c = (t.to(torch.complex128) for t in layer.kernel.discretize())
    d_a = torch.exp(dt_a)
    u64 = u.to(torch.float64)
    bsz, length, h = u64.shape
    y = u64 * layer.D.to(torch.float64)
    state = torch.zeros(bsz, h, d_a.size(-1), dtype=torch.complex128, device=u.device)
    for t in range(length):
        state = d_a * state + d_b * u64[:, t, :, None]
        y[:, t] += 2 * (c[0] * state).sum(-1).real
    if layer.bidirectional:
        state = torch.zeros_like(state)
        for t in reversed(range(length)):
            y[:, t] += 2 * (c[1] * state).sum(-1).real
            state = d_a * state + d_b * u64[:, t, :, None]
    return y


# ----------------------------------------------------------------------------------------- EMA


class MultiHeadEMA(nn.Module):
    """Mega's multi-dimensional damped EMA on (B, L, D); returns silu(EMA(x) + omega * x).

    Parameter names and shapes equal the fairseq module's, so its state_dict loads directly.
    Unlike the original, the kernel is never cached in eval mode (no hidden state to go stale).
    """

    def __init__(
        self,
        d_model: int,
        ndim: int = 16,
        bidirectional: bool = False,
        shift: bool = True,
        truncation: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = 0.0,
    ) -> None:
        super().__init__()
        self.d_model, self.ndim, self.bidirectional = d_model, ndim, bidirectional
        self.shift, self.truncation = shift, truncation
        self.scale = math.sqrt(1.0 / ndim)
        kernel_dim = 2 * d_model if bidirectional else d_model
        # Hints: the harness keeps these out of weight decay (Mega itself decayed every param).
        for name, shape in (
            ("alpha", (kernel_dim, ndim, 1)),
            ("delta", (kernel_dim, ndim, 1)),
            ("beta", (kernel_dim, ndim, 1)),
            ("gamma", (kernel_dim, ndim)),
        ):
            register_with_hint(self, name, torch.empty(shape), lr, weight_decay)
        self.omega = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.alpha, mean=0.0, std=0.2)
        nn.init.normal_(self.delta, mean=0.0, std=0.2)
        # beta = N(0, 0.02) + [1, -1, 1, -1, ...] ("seems more stable" per the original).
        sign = torch.ones(self.ndim, 1)
        sign[1::2] = -1.0
        self.beta.normal_(mean=0.0, std=0.02).add_(sign)
        nn.init.normal_(self.gamma, mean=0.0, std=1.0)
        nn.init.normal_(self.omega, mean=0.0, std=1.0)

    def coeffs(self) -> tuple[Tensor, Tensor]:
        """p = sigmoid(alpha), q = 1 - p * sigmoid(delta); each (kernel_dim, ndim, 1)."""
        p = torch.sigmoid(self.alpha)
        return p, 1.0 - p * torch.sigmoid(self.delta)

    def kernel_size(self, length: int) -> int:
        """Lk = min(truncation, L) when truncation >= 1, else L."""
        if self.truncation is not None and self.truncation >= 1:
            return min(self.truncation, length)
        return length

    def kernel(self, length: int) -> Tensor:
        """(kernel_dim, Lk): k_l = sum_n gamma_n scale p_n beta_n q_n^l for l < Lk."""
        length = self.kernel_size(length)
        p, q = self.coeffs()
        return chunked_kernel(_ema_kernel_piece, length, p * self.beta, torch.log(q),
                              self.gamma * self.scale)

    def conv_kernel(self, length: int) -> Tensor:
        """Kernel laid out for a circular FFT of length L + Lk (fairseq's ``forward``)."""
        k = self.kernel(length)
        if not self.bidirectional:
            return k
        k1, k2 = torch.split(k, [self.d_model, self.d_model], dim=0)
        if self.shift:  # drop k2_0: lag 0 is the causal kernel's alone
            return F.pad(k1, (0, length)) + F.pad(k2[:, 1:].flip(-1), (length + 1, 0))
        return F.pad(k1, (0, length)) + F.pad(k2.flip(-1), (length, 0))

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, L, D); padding_mask: (B, L) bool, True at pads (fairseq convention)."""
        length = x.size(1)
        xw = x.to(_work_dtype(x))  # sum and silu in >= float32, cast back at the end
        residual = xw * self.omega.to(xw.dtype)  # taken before masking, as in the original
        if padding_mask is not None:
            xw = xw.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        with _no_autocast(xw):
            k = self.conv_kernel(length).to(xw.dtype)
            out = fft_conv(xw.transpose(1, 2).contiguous(), k,  # contiguous: see S4D.forward
                           length + self.kernel_size(length))
        return F.silu(out.transpose(1, 2) + residual).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, ndim={self.ndim}, bidirectional={self.bidirectional}, "
            f"shift={self.shift}, truncation={self.truncation}"
        )


@torch.no_grad()
def ema_recurrence_ref(
    layer: MultiHeadEMA, x: Tensor, padding_mask: Tensor | None = None
) -> Tensor:
    """Sequential reference for ``MultiHeadEMA.forward`` (tests only; float64, no truncation).

    h_t = q h_{t-1} + p beta x_t, y_t = sum_n gamma_n scale h_t (fairseq's ``one_step``).
    Anti-causal: with h the backward state before x_t enters, shift=True adds gamma.(q h)
    (k2_j at lag -j, j >= 1) and shift=False adds gamma.h (k2_{j-1} at lag -j).
    """
    if layer.truncation is not None and layer.truncation >= 1:
        raise ValueError("the recurrence has no truncated form")
    p, q = (t.squeeze(-1).to(torch.float64) for t in layer.coeffs())
    b_in = p * layer.beta.squeeze(-1).to(torch.float64)
    c_out = layer.gamma.to(torch.float64) * layer.scale
    x64 = x.to(torch.float64)
    residual = x64 * layer.omega.to(torch.float64)
    if padding_mask is not None:
        x64 = x64.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    bsz, length, d = x64.shape
    y = torch.zeros_like(x64)
    state = x64.new_zeros(bsz, d, layer.ndim)
    for t in range(length):
        state = q[:d] * state + b_in[:d] * x64[:, t, :, None]
        y[:, t] = (c_out[:d] * state).sum(-1)
    if layer.bidirectional:
        state = torch.zeros_like(state)
        for t in reversed(range(length)):
            read = q[d:] * state if layer.shift else state
            y[:, t] += (c_out[d:] * read).sum(-1)
            state = q[d:] * state + b_in[d:] * x64[:, t, :, None]
    return F.silu(y + residual)


# ------------------------------------------------------------------------------------- factory

MEMORY_KINDS = ("s4d", "ema")


def build_memory(kind: str, d_model: int, bidirectional: bool = False, **kw: object) -> nn.Module:
    """Build the structured memory of a LongVQ layer: ``"s4d"`` -> S4D, ``"ema"`` -> MultiHeadEMA.

    Both map (B, L, D) -> (B, L, D). Note the outputs differ as the originals do: S4D returns
    K*u + D u (no activation); the EMA returns silu(EMA(x) + omega x) as Mega's module does.
    """
    if kind == "s4d":
        return S4D(d_model, bidirectional=bidirectional, **kw)  # type: ignore[arg-type]
    if kind == "ema":
        return MultiHeadEMA(d_model, bidirectional=bidirectional, **kw)  # type: ignore[arg-type]
    raise ValueError(f"unknown memory kind {kind!r}; known: {', '.join(MEMORY_KINDS)}")
