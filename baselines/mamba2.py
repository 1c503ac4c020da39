"""Mamba-2 baseline (Dao & Gu 2024, SSD): ``mamba_ssm.Mamba2`` blocks on the shared backbone.

One mixer (state-spaces/mamba ``modules/mamba2.py``), E = expand·d_model, H = E / headdim heads
of size P = headdim, G groups sharing B and C:

    [z, xBC, dt] = in_proj(u)                    rows [z (E), x (E), B (G·N), C (G·N), dt (H)]
    [x, B, C] = silu(causal depthwise conv1d_{d_conv}(xBC))
    Δ = softplus(dt + dt_bias)                   A_h = -exp(A_log_h), one scalar per head
    y = SSD(x, Δ, A, B, C) + D x                 h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_tᵀ
    y = RMSNorm_group(y ⊙ silu(z)) · norm.weight (norm_before_gate=False; G norm groups)
    out = out_proj(y)

Block, heads, bidirectional form and the fast/reference split are those of baselines/mamba.py:
``mamba_ssm.Mamba2`` (fused ``mamba_split_conv1d_scan_combined``; backend ``mamba_ssm``) on CUDA,
else :class:`Mamba2Reference` with the same parameter names/shapes/init, whose forward
:func:`mamba2_reference_forward` uses the chunked SSD of ``ssd_minimal.py`` (exact; checked
against the sequential recurrence in the tests; backend ``torch-reference``).

Config: ``headdim`` defaults to upstream's 64 and must divide d_inner (checked), so heads =
d_inner / headdim (the backbone's ``n_heads`` is not used). d_state defaults to Mamba2's 128
(Mamba2Simple uses 64). ``chunk_size`` only changes how the sum is blocked, not its value.
Init as mamba2.py: dt bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max]; A uniform in
[A_init_min, A_init_max] stored as log; D = 1; norm.weight = 1; the rest PyTorch defaults.
Older causal_conv1d builds need the in_proj width 2E + 2GN + H to be a multiple of 8 on the
fused path (state-spaces/mamba issues #351, #643): keep H a multiple of 8 for GPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.backbone import SequenceModel
from harness.config import ModelConfig
from harness.registry import register
from models.selective_scan import (
    causal_depthwise_conv,
    inverse_softplus_dt,
    mark_no_decay,
    official_module,
    rms_norm_gated,
    scan_block,
    ssd_chunked,
)


@dataclass
class Mamba2Config(ModelConfig):
    d_state: int = 128  # N
    d_conv: int = 4
    expand: int = 2  # d_inner = expand * d_model
    headdim: int = 64  # P; heads = d_inner / headdim
    ngroups: int = 1  # G: B and C are shared by nheads / ngroups heads
    chunk_size: int = 256  # SSD block length (kernel and reference)
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    use_fast_path: bool = True  # mamba_ssm.Mamba2 on CUDA when importable
    # bidirectional on CUDA: the two directions' mamba_ssm modules on two streams at once
    concurrent_directions: bool = True

    def validate(self) -> None:
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        d_inner = self.expand * self.d_model
        if d_inner % self.headdim:
            raise ValueError(
                f"headdim={self.headdim} must divide d_inner = expand*d_model = {d_inner}"
            )
        nheads = d_inner // self.headdim
        if nheads % self.ngroups:
            raise ValueError(f"ngroups={self.ngroups} must divide the {nheads} heads "
                             f"(d_inner={d_inner} / headdim={self.headdim})")
        if not 0.0 < self.A_init_min <= self.A_init_max:
            raise ValueError(f"need 0 < A_init_min <= A_init_max, got {self.A_init_min}, "
                             f"{self.A_init_max}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


def mamba2_kwargs(cfg: Mamba2Config) -> dict:
    """Constructor arguments shared by mamba_ssm.Mamba2 and Mamba2Reference."""
    return {
        "d_model": cfg.d_model,
        "d_state": cfg.d_state,
        "d_conv": cfg.d_conv,
        "expand": cfg.expand,
        "headdim": cfg.headdim,
        "ngroups": cfg.ngroups,
        "A_init_range": (cfg.A_init_min, cfg.A_init_max),
        "dt_min": cfg.dt_min,
        "dt_max": cfg.dt_max,
        "chunk_size": cfg.chunk_size,
    }


class GatedRMSNorm(nn.Module):
    """layernorm_gated.py's ``RMSNorm`` (weight only): forward(x, z) = norm(x ⊙ silu(z))."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return rms_norm_gated(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)


class Mamba2Reference(nn.Module):
    """mamba2.py's ``Mamba2`` parameters (names, shapes, init), reference forward."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 256,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = self.d_ssm = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"headdim={headdim} must divide d_inner={self.d_inner}")
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups={ngroups} must divide nheads={self.nheads}")
        self.D_has_hdim = False
        # Same modules, in the same order, as upstream (identical RNG stream under a seed).
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads  # [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias)
        conv_dim = self.d_inner + 2 * ngroups * d_state  # the conv runs over [x, B, C]
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim,
                                padding=d_conv - 1, bias=conv_bias)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max,
                                                        dt_init_floor))
        A = torch.empty(self.nheads, dtype=torch.float32).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups,
                                 norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, u: Tensor) -> Tensor:
        return mamba2_reference_forward(self, u)


def mamba2_reference_forward(module: nn.Module, u: Tensor) -> Tensor:
    """mamba2.py's unfused forward on ``module``'s parameters (ours or mamba_ssm's)."""
    batch, length, _ = u.shape
    heads, groups, d_state, d_ssm = module.nheads, module.ngroups, module.d_state, module.d_ssm
    zxbcdt = module.in_proj(u)
    if zxbcdt.shape[-1] != 2 * d_ssm + 2 * groups * d_state + heads:
        raise NotImplementedError("d_ssm < d_inner (extra gated MLP) is not supported")
    z, xBC, dt = zxbcdt.split([d_ssm, d_ssm + 2 * groups * d_state, heads], dim=-1)
    xBC = causal_depthwise_conv(module.conv1d, xBC.transpose(1, 2)).transpose(1, 2)
    x, B, C = xBC.split([d_ssm, groups * d_state, groups * d_state], dim=-1)
    work = torch.promote_types(module.A_log.dtype, torch.float32)
    A = -torch.exp(module.A_log.to(work))
    dt = F.softplus(dt.to(work) + module.dt_bias.to(work))
    y = ssd_chunked(
        x.reshape(batch, length, heads, module.headdim),
        dt,
        A,
        B.reshape(batch, length, groups, d_state),
        C.reshape(batch, length, groups, d_state),
        D=module.D.to(work),
        chunk_size=module.chunk_size,
    ).reshape(batch, length, d_ssm)
    norm = module.norm
    y = rms_norm_gated(y, z, norm.weight, norm.eps, norm.group_size, norm.norm_before_gate)
    return module.out_proj(y)


def make_mamba2(cfg: Mamba2Config, layer_idx: int) -> nn.Module:
    """mamba_ssm.Mamba2 when it can run (CUDA + import + use_fast_path), else Mamba2Reference."""
    official = official_module("Mamba2") if cfg.use_fast_path else None
    if official is not None:
        module = official(**mamba2_kwargs(cfg), layer_idx=layer_idx)
    else:
        module = Mamba2Reference(**mamba2_kwargs(cfg))
    mark_no_decay(module.A_log, module.D, module.dt_bias)
    return module


def make_block(cfg: Mamba2Config, layer_idx: int) -> nn.Module:
    return scan_block(cfg, lambda: make_mamba2(cfg, layer_idx), Mamba2Reference,
                      mamba2_reference_forward, "mamba2")


@register("mamba2", family="ssm", config=Mamba2Config, causal=True, bidirectional=True,
          reference={"use_fast_path": False})
def build_mamba2(cfg: Mamba2Config) -> SequenceModel:
    """Mamba-2 (SSD): mamba_ssm.Mamba2 on CUDA, chunked-SSD torch reference elsewhere."""
    return SequenceModel(cfg, make_block)
