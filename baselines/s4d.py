"""S4D baseline: the residual S4D block of state-spaces/s4 ``example.py`` on the shared backbone.

One block (``example.py``'s ``S4Model`` loop, ``prenorm=False`` by default as there)::

    z = S4D(x)            y = K * x + D x          (models.ssm.S4D; FFT conv of length 2L)
    z = S4DOutput(z)      GLU(Conv1d_{H->2H}(dropout(GELU(y))))   (s4d.py's pointwise tail)
    x = norm(x + dropout(z))                       post-norm (prenorm=True: x + dropout(z(norm x)))
    x = norm(x + FFN(x))  only when d_ffn > 0      (not in example.py; see below)

The kernel is K_l = 2 Re(sum_n C_n dB_n dA_n^l) with ZOH dA = exp(dt A), dB = (exp(dt A) - 1)/A,
A = -exp(log_A_real) + i A_imag (S4D-Lin: A_imag = pi n; S4D-Inv selectable). The LM head uses
the causal kernel; the classification head the bidirectional one (two kernel channels, the
second flipped, as the full repo's ``FFTConv``; ``example.py`` itself is causal only).

Choices, and why:
- Post-norm default: ``example.py`` trains with ``prenorm=False`` (LayerNorm after the residual);
  ``prenorm=on`` gives its other mode. The backbone's final LayerNorm is kept either way (one
  extra affine LayerNorm after the last post-norm; ``example.py`` has none).
- FFN: ``example.py`` has no FFN; we keep the backbone's ``d_ffn`` (inherited default) so tables
  can hold FFN width fixed across models (HARNESS.md's fair-comparison rule). ``d_ffn=0`` gives
  exactly the ``example.py`` block. The FFN uses the same norm placement as the S4D sub-block.
- Dropout after the layer is ``nn.Dropout1d`` in ``example.py`` (one mask per channel, tied over
  the sequence); we draw the same tied mask. S4DOutput's own DropoutNd is tied the same way.
- SSM parameters (log_dt, log_A_real, A_imag) carry ``ssm_lr`` and weight decay 0, like
  ``example.py``'s ``lr=min(0.001, args.lr)``; the harness optimizer honours the hints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.backbone import FeedForward, SequenceModel
from harness.config import ModelConfig
from harness.registry import register
from models.ssm import S4D, S4D_CONVS, S4DOutput, resolve_s4d_conv


@dataclass
class S4DConfig(ModelConfig):
    d_state: int = 64  # N: N/2 complex modes per channel
    init: str = "lin"  # "lin" (S4D-Lin) or "inv" (S4D-Inv)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    ssm_lr: float = 1e-3  # lr hint of log_dt, log_A_real, A_imag (0 = frozen buffers)
    prenorm: bool = False  # example.py's default is post-norm
    ssm_conv: str = "auto"  # auto | fft | chunked (linear-time scan, models.s4d_chunked)

    def validate(self) -> None:
        if self.d_state <= 0 or self.d_state % 2:
            raise ValueError(f"d_state must be a positive even number, got {self.d_state}")
        if self.init not in {"lin", "inv"}:
            raise ValueError(f"init must be 'lin' or 'inv', got {self.init!r}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"need 0 < dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}"
            )
        if self.ssm_lr < 0.0:
            raise ValueError(f"ssm_lr must be >= 0, got {self.ssm_lr}")
        if self.ssm_conv not in S4D_CONVS:
            raise ValueError(f"ssm_conv={self.ssm_conv!r}; choose one of {', '.join(S4D_CONVS)}")

    def resolved_for(self, seq_len: int, device: str, compiled: bool) -> S4DConfig:
        return self.replace(ssm_conv=resolve_s4d_conv(self.ssm_conv, seq_len,
                                                      torch.device(device), compiled))


def tied_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout1d on (B, L, H): one keep mask per (batch, channel), shared over the sequence."""
    if not training or p <= 0.0:
        return x
    keep = torch.rand(x.size(0), 1, x.size(-1), device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class S4DBlock(nn.Module):
    """Residual S4D layer (+ optional FFN) with example.py's post-norm (or pre-norm)."""

    def __init__(self, cfg: S4DConfig) -> None:
        super().__init__()
        self.prenorm = cfg.prenorm
        self.dropout = cfg.dropout
        self.layer = S4D(
            cfg.d_model,
            d_state=cfg.d_state,
            bidirectional=not cfg.causal,
            init=cfg.init,
            dt_min=cfg.dt_min,
            dt_max=cfg.dt_max,
            lr=cfg.ssm_lr,
            conv=cfg.ssm_conv,
        )
        self.output = S4DOutput(cfg.d_model, dropout=cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.ffn: FeedForward | None = None
        if cfg.d_ffn > 0:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ffn, cfg.dropout)
            self.norm_ffn = nn.LayerNorm(cfg.d_model)

    @property
    def backend(self) -> str:
        return f"ssm-{self.layer.last_conv}"  # the conv that ran: conv="auto" resolves per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x) if self.prenorm else x
        z = self.output(self.layer(z))
        x = x + tied_dropout(z, self.dropout, self.training)
        if not self.prenorm:
            x = self.norm(x)
        if self.ffn is not None:
            if self.prenorm:
                x = x + self.ffn(self.norm_ffn(x))
            else:
                x = self.norm_ffn(x + self.ffn(x))
        return x


@register("s4d", family="ssm", config=S4DConfig, causal=True, bidirectional=True,
          reference={"ssm_conv": "fft"})
def build_s4d(cfg: S4DConfig) -> SequenceModel:
    """S4D (diagonal SSM; FFT conv, chunked scan at long L on CUDA) residual blocks as in
    state-spaces/s4 example.py."""
    return SequenceModel(cfg, lambda c, _i: S4DBlock(c))
