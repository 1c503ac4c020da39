"""Config dataclasses shared by every registry entry.

Every model config subclasses :class:`ModelConfig`, so the backbone size fields (the fair-comparison
rule of HARNESS.md: same d_model, n_layers, FFN width, heads within a table) exist for every model
and a sweep can override any field by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

HeadKind = Literal["cls", "lm"]

C = TypeVar("C", bound="ModelConfig")


@dataclass
class ModelConfig:
    """Backbone fields: embedding -> n_layers x block -> norm -> head."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ffn: int = 256  # 0 disables the FFN sub-block (models whose block has its own MLP)
    head: HeadKind = "cls"  # "cls": mean-pooled sequence classification; "lm": causal LM
    n_classes: int = 10
    max_len: int = 1 << 17  # only used by models with absolute positions
    dropout: float = 0.0
    # Compiled training steps only (efficiency --compile): the share of the activations
    # torch.compile saves by default that its backward may keep (AOTAutograd's
    # activation_memory_budget: below 1 the partitioner recomputes the cheapest ops in the
    # backward instead of saving their outputs; 0 is full activation checkpointing). 1.0:
    # torch's default. Out of the store key at 1.0, so rows written before it keep their keys.
    activation_memory_budget: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.activation_memory_budget <= 1.0:
            raise ValueError(f"activation_memory_budget={self.activation_memory_budget!r} must "
                             "be in [0, 1]")

    @property
    def causal(self) -> bool:
        """An LM head needs a causal mixer; classification uses the bidirectional one."""
        return self.head == "lm"

    def replace(self: C, **overrides: Any) -> C:
        """A copy with fields overridden; unknown names raise one clear error."""
        return apply_overrides(self, overrides)

    def to_dict(self) -> dict[str, Any]:
        described = dataclasses.asdict(self)
        if described["activation_memory_budget"] == 1.0:
            del described["activation_memory_budget"]
        return described

    def resolved_for(self: C, seq_len: int, device: str, compiled: bool) -> C:
        """This config with its length- and device-dependent "auto" choices made as a training
        step at ``seq_len`` on ``device`` (compiled or not) makes them, so that the fast-path
        check (harness/fast_path_check.py) checks the kernels the timed cell runs. A config
        with such choices overrides this; by default there are none."""
        return self

    def sized_for(self: C, seq_len: int, fixed: Collection[str] = ()) -> C:
        """This config with its length capacities (a position table's size) raised to hold
        ``seq_len`` where they are too small and not in ``fixed`` (fields the user set): a
        length sweep measures a model until it runs out of memory, not until an arbitrary
        table ends. By default there are none."""
        return self

    def check_memory_budget(self, compiled: bool) -> None:
        """A budget below 1 changes compiled steps only: elsewhere it would do nothing."""
        if self.activation_memory_budget < 1.0 and not compiled:
            raise ValueError(f"activation_memory_budget={self.activation_memory_budget} applies "
                             "to compiled training steps only: add --compile (efficiency; "
                             "compile=true in an efficiency sweep)")


def field_names(cfg: ModelConfig | type[ModelConfig]) -> list[str]:
    return [f.name for f in fields(cfg)]


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Turn a CLI string into the type of the field's current value (bools accept on/off)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in {"1", "true", "on", "yes"}:
            return True
        if lowered in {"0", "false", "off", "no"}:
            return False
        raise ValueError(f"field {name!r}: expected on/off (or true/false), got {value!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"field {name!r}: expected an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"field {name!r}: expected a number, got {value!r}") from None
    return text


def apply_overrides(cfg: C, overrides: dict[str, Any]) -> C:
    """Return a copy of ``cfg`` with ``overrides`` applied, coercing strings to field types."""
    known = {f.name: f for f in fields(cfg)}
    updates: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown config field {name!r} for {type(cfg).__name__}{hint} "
                f"(fields: {', '.join(known)})"
            )
        updates[name] = _coerce(value, getattr(cfg, name), name)
    new = dataclasses.replace(cfg, **updates)
    validate = getattr(new, "validate", None)
    if callable(validate):
        validate()
    return new


def config_hash(payload: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able description of a cell (its unique key in the store)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
