"""The model registry: one decorator, lazy discovery, clear errors.

A model file in ``baselines/`` or ``models/`` registers a builder::

    @register("my_model", family="attention", config=MyConfig)
    def build(cfg: MyConfig) -> SequenceModel: ...

Nothing else changes: the CLI, the runner and the generic tests find the entry. Model modules
are imported only when the registry is first asked for something (so ``import harness`` stays
cheap and an optional GPU dependency of one model cannot break the others: a module that fails
to import is reported by name, with its error, when you list or ask for it).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.config import ModelConfig, apply_overrides

# Packages scanned for entries, in this order.
MODEL_PACKAGES: tuple[str, ...] = ("baselines", "models")

Builder = Callable[[Any], Any]


class RegistryError(KeyError):
    """Unknown or colliding entry name. ``str()`` is the one-line user message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry:
    """One registered model: how to build it and what it can do."""

    name: str
    family: str
    config_cls: type[ModelConfig]
    builder: Builder
    module: str
    causal: bool = True  # supports the causal LM head (mixer never looks ahead)
    bidirectional: bool = True  # supports the classification head
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    # what the fast-path check compares this entry with (harness/fast_path_check.py): config
    # fields selecting the in-project reference implementations, or another entry's name
    reference: dict[str, Any] = field(default_factory=dict)
    reference_entry: str = ""

    def make_config(self, **overrides: Any) -> ModelConfig:
        base = self.config_cls(**self.defaults)
        return apply_overrides(base, overrides) if overrides else base

    def build(self, cfg: ModelConfig | None = None, **overrides: Any):
        cfg = cfg if cfg is not None else self.make_config()
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        if not isinstance(cfg, self.config_cls):
            raise TypeError(f"{self.name} needs a {self.config_cls.__name__}, got {type(cfg)}")
        if cfg.causal and not self.causal:
            raise ValueError(f"model {self.name!r} has no causal mode (head='lm' not supported)")
        if not cfg.causal and not self.bidirectional:
            raise ValueError(f"model {self.name!r} has no bidirectional mode (use head='lm')")
        return self.builder(cfg)


class Registry:
    """Name -> :class:`Entry`, filled by ``register`` decorators during discovery."""

    def __init__(self, packages: Iterable[str] = MODEL_PACKAGES) -> None:
        self._packages = tuple(packages)
        self._entries: dict[str, Entry] = {}
        self._import_errors: dict[str, str] = {}
        self._discovered = False

    # -- registration -------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        family: str,
        config: type[ModelConfig],
        causal: bool = True,
        bidirectional: bool = True,
        description: str = "",
        reference: dict[str, Any] | None = None,
        reference_entry: str = "",
        **defaults: Any,
    ) -> Callable[[Builder], Builder]:
        """``reference``/``reference_entry``: what the fast-path check compares the entry with
        before it is timed (config fields selecting its reference kernels, or an entry with the
        same config class); neither for a model that is its own reference."""
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"registry names are identifiers, got {name!r}")
        if reference and reference_entry:
            raise ValueError(f"{name}: give reference fields or a reference entry, not both")
        for key in reference or {}:
            if key not in config.__dataclass_fields__:
                raise ValueError(f"{name}: reference field {key!r} is not a field of "
                                 f"{config.__name__}")

        def decorator(builder: Builder) -> Builder:
            module = getattr(builder, "__module__", "?")
            existing = self._entries.get(name)
            if existing is not None and existing.builder is not builder:
                raise RegistryError(
                    f"model name {name!r} is registered twice: in {existing.module} "
                    f"and in {module}"
                )
            doc = description or (builder.__doc__ or "").strip().split("\n")[0]
            self._entries[name] = Entry(
                name=name,
                family=family,
                config_cls=config,
                builder=builder,
                module=module,
                causal=causal,
                bidirectional=bidirectional,
                description=doc,
                defaults=dict(defaults),
                reference=dict(reference or {}),
                reference_entry=reference_entry,
            )
            return builder

        return decorator

    # -- discovery ----------------------------------------------------------------------------
    def discover(self) -> None:
        """Import every module of the model packages once (lazy: on first lookup)."""
        if self._discovered:
            return
        self._discovered = True
        for package_name in self._packages:
            try:
                package = importlib.import_module(package_name)
            except ImportError as exc:
                self._import_errors[package_name] = f"{type(exc).__name__}: {exc}"
                continue
            for info in pkgutil.iter_modules(package.__path__):
                if info.name.startswith("_"):
                    continue
                module_name = f"{package_name}.{info.name}"
                try:
                    importlib.import_module(module_name)
                except Exception as exc:  # noqa: BLE001 - one broken file must not hide the rest
                    self._import_errors[module_name] = f"{type(exc).__name__}: {exc}"

    # -- lookup -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def import_errors(self) -> dict[str, str]:
        self.discover()
        return dict(self._import_errors)

    def get(self, name: str) -> Entry:
        self.discover()
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        broken = ""
        if self._import_errors:
            broken = " (modules that failed to import: " + ", ".join(self._import_errors) + ")"
        raise RegistryError(
            f"unknown model {name!r}.{hint} Registered: {', '.join(sorted(self._entries))}{broken}"
        )

    def resolve(self, names: Iterable[str]) -> list[Entry]:
        """Entries for names (``all`` = every entry); fails on the first unknown one."""
        out: list[Entry] = []
        for name in names:
            name = name.strip()
            if not name:
                continue
            if name == "all":
                out.extend(e for e in self.entries() if e not in out)
            else:
                entry = self.get(name)
                if entry not in out:
                    out.append(entry)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry, optionally as a *variant* with config fields of its own:
    ``longvq[key_grad=window]`` is LongVQ with ``key_grad="window"``, measured and reported under
    that label next to plain ``longvq``."""

    entry: Entry
    overrides: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.entry.name
        return f"{self.entry.name}[{';'.join(f'{k}={v}' for k, v in self.overrides)}]"


def split_model_list(text: str) -> list[str]:
    """``a,b[x=1;y=2],c`` -> ``["a", "b[x=1;y=2]", "c"]`` (commas inside brackets kept)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in [*parts, current] if p.strip()]


def parse_model_spec(text: str, registry: Registry | None = None) -> ModelSpec:
    """``name`` or ``name[field=value;field=value]`` -> ModelSpec; unknown names, malformed
    brackets and fields the entry's config does not have fail with one message naming them."""
    registry = registry or REGISTRY
    name, bracket, rest = text.strip().partition("[")
    entry = registry.get(name.strip())
    if not bracket:
        return ModelSpec(entry)
    if not rest.endswith("]") or "[" in rest[:-1] or "]" in rest[:-1]:
        raise ValueError(f"model variant {text!r}: expected name[field=value;field=value]")
    pairs = []
    for item in rest[:-1].split(";"):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"model variant {text!r}: expected field=value, got {item!r}")
        pairs.append((key, value))
    try:  # an unknown field or a bad value (e.g. key_grad=foo) fails here, with suggestions
        entry.make_config(**dict(pairs))
    except ValueError as exc:
        raise ValueError(f"model variant {text!r}: {exc}") from None
    return ModelSpec(entry, tuple(pairs))


def resolve_model_specs(text: str, registry: Registry | None = None) -> list[ModelSpec]:
    """A ``--models`` value: comma-separated names, variants (``name[field=value;...]``) or
    ``all`` (every entry), in order, without repeats."""
    registry = registry or REGISTRY
    out: list[ModelSpec] = []
    for item in split_model_list(text):
        specs = ([parse_model_spec(item, registry)] if "[" in item
                 else [ModelSpec(e) for e in registry.resolve([item])])
        out.extend(s for s in specs if s not in out)
    return out


REGISTRY = Registry()


def register(name: str, **kwargs: Any) -> Callable[[Builder], Builder]:
    """Decorator registering a model builder in the default registry (see module docstring)."""
    return REGISTRY.register(name, **kwargs)


def get(name: str) -> Entry:
    return REGISTRY.get(name)
