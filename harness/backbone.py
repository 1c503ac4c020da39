"""The shared backbone every registry entry is built on.

    tokens (B, L) -> embedding -> n_layers x block -> final norm -> head -> logits

Heads: ``cls`` mean-pools over the sequence and returns (B, n_classes); ``lm`` returns next-token
logits (B, L, vocab_size). A *block* maps (B, L, d_model) -> (B, L, d_model) including its own
residual connections, because the model families differ there (pre-norm Transformer blocks,
Mega/LongVQ gated residuals). :class:`PreNormBlock` is the standard pre-norm wrapper around a
sequence mixer for the models that use it.

Blocks (or any submodule) may expose:
- ``backend: str`` — the kernel that actually ran in the last forward (``sdpa-flash``, ...);
- ``aux_loss: Tensor | None`` — an extra training loss from the last forward (VQ commitment);
- ``last_stats: dict[str, float | Tensor]`` — per-layer diagnostics (codebook utilisation,
  perplexity); 0-d tensors stay on the device until ``layer_stats`` reads them (no sync per step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.config import ModelConfig


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ffn -> d_model with GELU."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ffn)
        self.fc_out = nn.Linear(d_ffn, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x))))


class PreNormBlock(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)) when d_ffn > 0."""

    def __init__(self, cfg: ModelConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.norm_mixer = nn.LayerNorm(cfg.d_model)
        self.mixer = mixer
        self.dropout = nn.Dropout(cfg.dropout)
        self.ffn: nn.Module | None = None
        if cfg.d_ffn > 0:
            self.norm_ffn = nn.LayerNorm(cfg.d_model)
            self.ffn = FeedForward(cfg.d_model, cfg.d_ffn, cfg.dropout)

    @property
    def backend(self) -> str:
        return getattr(self.mixer, "backend", "torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm_mixer(x)))
        if self.ffn is not None:
            x = x + self.ffn(self.norm_ffn(x))
        return x


BlockFactory = Callable[[ModelConfig, int], nn.Module]


class SequenceModel(nn.Module):
    """embedding -> blocks -> norm -> head, with backend/aux-loss/stats collection."""

    def __init__(self, cfg: ModelConfig, make_block: BlockFactory) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(make_block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        out_dim = cfg.vocab_size if cfg.head == "lm" else cfg.n_classes
        self.head = nn.Linear(cfg.d_model, out_dim)
        # Submodules with state updated outside the autograd graph (the VQ codebooks' EMA) run
        # that update once, after the whole forward, instead of inside their own forward: under
        # torch.compile the blocks then trace as one graph (models/vq.py, "deferred updates").
        self._deferred: list[nn.Module] = [m for m in self.modules()
                                           if hasattr(m, "apply_pending_update")]
        for module in self._deferred:
            module.defer_update = True

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tuple(tokens.shape)}")
        self._before_forward()
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = block(x)
        logits = self.readout(x)
        self._after_forward()
        return logits

    # Eager (graph breaks at the very start and end of the forward, so the rest is one graph).
    @torch.compiler.disable
    def _before_forward(self) -> None:
        for module in self._deferred:
            module.take_snapshot()

    @torch.compiler.disable
    def _after_forward(self) -> None:
        for module in self._deferred:
            module.apply_pending_update()

    # The embedding and the readout are methods of their own, so frames of their own for
    # torch.compile: a graph break inside a block (an eager region such as the torch VQ
    # attention path or Mamba's stream switches) lands in the loop above, and dynamo then runs
    # ``forward`` eagerly, compiling only the frames it calls. Inline, the embedding, final
    # norm, pooling and head (and their backward) ran as eager kernels in every compiled step
    # of such a model.
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, pooling (cls) and head: (B, L, d_model) -> logits."""
        x = self.norm(x)
        if self.cfg.head == "cls":
            x = x.mean(dim=1)
        return self.head(x)

    # -- what the harness reads after a forward ------------------------------------------------
    @property
    def backend(self) -> str:
        """Kernels that ran in the blocks, e.g. ``sdpa-flash`` or ``ssm-fft+vq-linear``."""
        seen: list[str] = []
        for block in self.blocks:
            name = getattr(block, "backend", "torch")
            if name not in seen:
                seen.append(name)
        return "+".join(seen) if seen else "torch"

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the extra losses (e.g. VQ commitment) that submodules set in the last forward."""
        total: torch.Tensor | None = None
        for module in self.modules():
            if module is self:
                continue
            loss = getattr(module, "aux_loss", None)
            if isinstance(loss, torch.Tensor):
                total = loss if total is None else total + loss
        return total

    def layer_stats(self) -> dict[str, float]:
        """Flattened ``last_stats`` of submodules, keyed ``<module path>.<stat>``."""
        out: dict[str, float] = {}
        for path, module in self.named_modules():
            stats = getattr(module, "last_stats", None)
            if isinstance(stats, dict):
                for key, value in stats.items():
                    out[f"{path}.{key}" if path else key] = float(value)
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def task_loss(model: SequenceModel, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for either head (LM: targets aligned with positions) + the model's aux loss."""
    if model.cfg.head == "lm":
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    else:
        loss = F.cross_entropy(logits.float(), targets)
    aux = model.aux_loss()
    return loss if aux is None else loss + aux
