"""Mamba baseline (Gu & Dao 2023): ``mamba_ssm.Mamba`` blocks on the shared backbone.

One mixer (state-spaces/mamba ``modules/mamba_simple.py``), E = expand·d_model, R = dt_rank:

    [x, z] = in_proj(u)                            rows [x (E), z (E)]
    x = silu(causal depthwise conv1d_{d_conv}(x))
    [δ, B, C] = x_proj(x)                          rows [dt (R), B (N), C (N)]
    Δ = softplus(dt_proj.weight δ + dt_proj.bias)  A = -exp(A_log)  (E × N, S4D-real init -n)
    y = selective_scan(x, Δ, A, B, C) + D x        h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t
    out = out_proj(y ⊙ silu(z))

Block: ``PreNormBlock`` (x + mixer(LN(x)), then the backbone FFN when d_ffn > 0). mamba_ssm's own
Block is norm -> mixer -> residual with no MLP, i.e. ``d_ffn=0``; we keep the inherited d_ffn by
default so that a table can hold FFN width fixed across models (as baselines/s4d.py does).

Paths: on CUDA with ``mamba_ssm`` importable and ``use_fast_path=on``, each mixer *is* a
``mamba_ssm.Mamba`` (fused ``mamba_inner_fn``; backend ``mamba_ssm``). Otherwise each mixer is
:class:`MambaReference`, same parameter names, shapes and init (same RNG call order, so a seeded
build gives the same weights), whose forward is :func:`mamba_reference_forward` (sequential
``selective_scan_ref``; backend ``torch-reference``, one RuntimeWarning). State dicts load
strictly in both directions.

Heads: ``lm`` = causal scan; ``cls`` = forward scan + scan of a second, separately parametrised
mixer over the reversed sequence, summed (Caduceus "add" strategy, untied; see
models/selective_scan.py). The bidirectional model has twice the mixer parameters.

Init is the module's own (mamba_simple.py): dt bias = softplus⁻¹(dt), dt log-uniform in
[dt_min, dt_max]; dt_proj.weight uniform ±dt_rank^-0.5; A_log = log(1..N); D = 1; the rest
PyTorch defaults. MambaLMHeadModel's extra ``_init_weights`` (zeroed biases, out_proj rescaled by
1/sqrt(n_layers)) belongs to their LM wrapper, not to the module, and is not applied. A_log and D
carry ``_no_weight_decay`` (upstream) and ``_optim = {"weight_decay": 0}`` (our optimizer hint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harness.backbone import SequenceModel
from harness.config import ModelConfig
from harness.registry import register
from models.selective_scan import (
    causal_depthwise_conv,
    inverse_softplus_dt,
    mark_no_decay,
    official_module,
    scan_block,
    selective_scan_ref,
)


@dataclass
class MambaConfig(ModelConfig):
    d_state: int = 16  # N
    d_conv: int = 4
    expand: int = 2  # d_inner = expand * d_model
    dt_rank: int = 0  # 0 = mamba_ssm's "auto": ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    use_fast_path: bool = True  # mamba_ssm.Mamba on CUDA when importable
    # bidirectional on CUDA: the two directions' mamba_ssm modules on two streams at once
    concurrent_directions: bool = True

    def validate(self) -> None:
        for name in ("d_state", "d_conv", "expand"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dt_rank < 0:
            raise ValueError(f"dt_rank must be >= 0 (0 = auto), got {self.dt_rank}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


def mamba_kwargs(cfg: MambaConfig) -> dict:
    """Constructor arguments shared by mamba_ssm.Mamba and MambaReference."""
    return {
        "d_model": cfg.d_model,
        "d_state": cfg.d_state,
        "d_conv": cfg.d_conv,
        "expand": cfg.expand,
        "dt_rank": cfg.dt_rank or "auto",
        "dt_min": cfg.dt_min,
        "dt_max": cfg.dt_max,
    }


class MambaReference(nn.Module):
    """mamba_simple.py's ``Mamba`` parameters (names, shapes, init), reference forward."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        # Same modules, in the same order, as upstream (identical RNG stream under a seed).
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv,
                                groups=self.d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        # dt_proj: weight keeps the variance of dt at init; bias puts softplus(bias) in [min, max]
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max,
                                                        dt_init_floor))
        self.dt_proj.bias._no_reinit = True
        # S4D-real init: A = -(1, 2, ..., N) for every channel, stored as log
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return mamba_reference_forward(self, hidden_states)


def mamba_reference_forward(module: nn.Module, hidden_states: Tensor) -> Tensor:
    """mamba_simple.py's non-fused forward on ``module``'s parameters (ours or mamba_ssm's)."""
    x, z = module.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (B, E, L) each
    x = causal_depthwise_conv(module.conv1d, x)
    dt, B, C = module.x_proj(x.transpose(1, 2)).split(
        [module.dt_rank, module.d_state, module.d_state], dim=-1
    )
    dt = (dt @ module.dt_proj.weight.t()).transpose(1, 2)  # (B, E, L); bias added in the scan
    work = torch.promote_types(module.A_log.dtype, torch.float32)
    A = -torch.exp(module.A_log.to(work))
    y = selective_scan_ref(
        x, dt, A, B.transpose(1, 2), C.transpose(1, 2), module.D.to(work), z=z,
        delta_bias=module.dt_proj.bias.to(work), delta_softplus=True,
    )
    return module.out_proj(y.transpose(1, 2))


def make_mamba(cfg: MambaConfig, layer_idx: int) -> nn.Module:
    """mamba_ssm.Mamba when it can run (CUDA + import + use_fast_path), else MambaReference."""
    official = official_module("Mamba") if cfg.use_fast_path else None
    if official is not None:
        module = official(**mamba_kwargs(cfg), use_fast_path=True, layer_idx=layer_idx)
    else:
        module = MambaReference(**mamba_kwargs(cfg))
    mark_no_decay(module.A_log, module.D)
    return module


def make_block(cfg: MambaConfig, layer_idx: int) -> nn.Module:
    return scan_block(cfg, lambda: make_mamba(cfg, layer_idx), MambaReference,
                      mamba_reference_forward, "mamba")


@register("mamba", family="ssm", config=MambaConfig, causal=True, bidirectional=True,
          reference={"use_fast_path": False})
def build_mamba(cfg: MambaConfig) -> SequenceModel:
    """Mamba (selective SSM): mamba_ssm.Mamba on CUDA, sequential torch reference elsewhere."""
    return SequenceModel(cfg, make_block)
