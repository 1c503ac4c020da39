"""Registry: discovery, listing, clear errors, collisions, config overrides."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.config import ModelConfig
from harness.registry import REGISTRY, Registry, RegistryError


def test_transformers_registered():
    names = REGISTRY.names()
    assert {"transformer_vanilla", "transformer_sdpa"} <= set(names)
    assert REGISTRY.import_errors() == {}


def test_unknown_name_suggests_close_matches():
    with pytest.raises(RegistryError) as info:
        REGISTRY.get("transformer_vanila")
    message = str(info.value)
    assert "'transformer_vanila'" in message
    assert "Did you mean: transformer_vanilla" in message


def test_unknown_name_lists_registered():
    with pytest.raises(RegistryError) as info:
        REGISTRY.get("nope")
    assert "'nope'" in str(info.value) and "transformer_sdpa" in str(info.value)


def test_collision_is_an_error():
    registry = Registry(packages=())

    @registry.register("dup", family="x", config=ModelConfig)
    def first(cfg):
        return cfg

    def second(cfg):
        return cfg

    with pytest.raises(RegistryError, match="registered twice"):
        registry.register("dup", family="x", config=ModelConfig)(second)


def test_resolve_all_and_dedup():
    entries = REGISTRY.resolve(["transformer_sdpa", "all", "transformer_sdpa"])
    assert [e.name for e in entries].count("transformer_sdpa") == 1
    assert len(entries) == len(REGISTRY.names())


def test_config_overrides_are_typed_and_checked():
    @dataclass
    class Cfg(ModelConfig):
        flag: bool = True
        scale: float = 1.0

    cfg = Cfg().replace(d_model="96", flag="off", scale="0.5")
    assert cfg.d_model == 96 and cfg.flag is False and cfg.scale == 0.5
    with pytest.raises(ValueError, match="d_modle"):
        Cfg().replace(d_modle=3)
    with pytest.raises(ValueError, match="flag"):
        Cfg().replace(flag="maybe")
    with pytest.raises(ValueError, match="'abc'"):
        Cfg().replace(n_layers="abc")


def test_entry_refuses_unsupported_mode():
    registry = Registry(packages=())

    @registry.register("causal_only", family="x", config=ModelConfig, bidirectional=False)
    def build(cfg):
        return cfg

    entry = registry.get("causal_only")
    with pytest.raises(ValueError, match="no bidirectional mode"):
        entry.build(entry.make_config(head="cls"))
    assert entry.build(entry.make_config(head="lm")).head == "lm"
