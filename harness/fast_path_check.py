"""The fast-path check: a model's fast kernels against its reference before a cell is timed.

HARNESS.md ("Measurement method"): a fast path is only benchmarked if its correctness test
against the naive reference passes on that device. Every efficiency cell (``efficiency`` and
efficiency sweeps) is therefore preceded by this check, once per process for each model
config, device and dtype:

- The entry names its *reference* when it is registered: config fields that select the
  in-project reference implementations (``longvq``: ``attn_impl=naive, ssm_conv=fft``; Mamba:
  ``use_fast_path=false``) or another entry with the same config class
  (``transformer_sdpa`` -> ``transformer_vanilla``). Entries without one (the references
  themselves, models with a single implementation) are not checked: ``check = none``.
- The config's own length- and device-dependent "auto" choices are first made as the timed cell
  would make them (``ModelConfig.resolved_for``: e.g. S4D's chunked convolution from 16K on
  CUDA under compile), so the check runs the path the row times.
- One layer of that model and of its reference, same weights, eval mode (no dropout, no codebook
  update), batch ``CHECK_BATCH`` at ``min(L, CHECK_LENGTH)``, under the cell's autocast dtype,
  eager: the logits and the gradient of every parameter, for one random upstream gradient,
  are compared tensor by tensor, ||fast - ref|| / max(||ref||, floor). One layer, because in a
  deeper VQ model a rounding difference can flip a later layer's nearest code, which is not a
  kernel error.
- Both ran the same backend (e.g. Mamba without mamba-ssm): ``check = reference``, nothing to
  compare. Error above ``TOLERANCE``: the cell is not timed and its row says ``wrong`` with the
  errors; otherwise ``check = passed`` with the largest error. ``--skip-check``: ``skipped``.

What the check does not reach, the test suite does: lengths-dependent choices made inside an op
(e.g. the Triton cache's segment counts), and other dtypes. The check runs eagerly: a compiled
cell runs the same kernels, fused differently.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.config import ModelConfig, config_hash
from harness.measure import DTYPES, free_memory
from harness.registry import REGISTRY, Entry, Registry

CHECK_LENGTH = 384  # positions: several Triton chunks (128) and windows (64) at the default sizes
CHECK_BATCH = 2
# Largest relative error of the logits or of any parameter's gradient. bf16/fp16: the fast
# kernels round to the half dtype where the references compute in float32 (the GPU tests' op
# tolerance is 3e-2); a kernel error is O(1). float32: TF32 in fla's and mamba-ssm's kernels.
TOLERANCE = {"fp32": 1e-2, "bf16": 0.1, "fp16": 0.1}
# Gradients that vanish in theory (a softmax's key offset) come out as rounding noise: each
# tensor's error is taken against at least this share of the largest gradient norm.
FLOOR = 1e-3


@dataclass(frozen=True)
class CheckResult:
    status: str  # "passed" | "failed" | "reference" | "none" | "skipped"
    max_rel_err: float | None = None
    worst: str = ""  # the tensor with the largest error
    backend: str = ""  # what the checked model ran
    reference: str = ""  # what its reference ran (entry label and backend)
    length: int = 0

    @property
    def message(self) -> str:
        if self.status != "failed":
            return ""
        return (f"fast path failed its check, not timed: {self.backend} vs {self.reference} at "
                f"L={self.length}: relative error {self.max_rel_err:.2e} in {self.worst} > "
                "tolerance")

    def row_fields(self) -> dict[str, Any]:
        return {"check": self.status, "check_rel_err": self.max_rel_err,
                "check_reference": self.reference}


def reference_of(entry: Entry, config: ModelConfig,
                 registry: Registry = REGISTRY) -> tuple[Entry, ModelConfig] | None:
    """The reference entry and config of ``entry`` at ``config``, or None when it has none."""
    if entry.reference_entry:
        other = registry.get(entry.reference_entry)
        return other, other.config_cls(**{f: getattr(config, f)
                                           for f in config.__dataclass_fields__})
    if entry.reference:
        return entry, config.replace(**entry.reference)
    return None


def _relative_error(fast: torch.Tensor | None, ref: torch.Tensor | None, floor: float) -> float:
    if fast is None or ref is None:  # a parameter only one of them uses: a structural mismatch
        return 0.0 if fast is None and ref is None else math.inf
    fast, ref = fast.double(), ref.double()
    if not bool(torch.isfinite(fast).all()):
        return math.inf
    return ((fast - ref).norm() / max(ref.norm().item(), floor, 1e-30)).item()


def _run(model: torch.nn.Module, tokens: torch.Tensor, upstream_seed: int, dtype: torch.dtype
         ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], str]:
    autocast = (torch.autocast(tokens.device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    with autocast:
        logits = model(tokens)
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(logits.shape, generator=generator).to(logits.device, logits.dtype)
    logits.backward(upstream)
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach(), grads, model.backend


def compare(entry: Entry, config: ModelConfig, ref_entry: Entry, ref_config: ModelConfig,
            device: torch.device, dtype: str, length: int, seed: int = 0) -> CheckResult:
    """Build both models (same weights), run one forward and backward each, compare."""
    torch.manual_seed(seed)
    fast = entry.build(config).to(device).eval()
    reference = ref_entry.build(ref_config).to(device).eval()
    reference.load_state_dict(fast.state_dict())
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (CHECK_BATCH, length),
                           generator=generator).to(device)
    out, grads, backend = _run(fast, tokens, seed + 1, DTYPES[dtype])
    ref_out, ref_grads, ref_backend = _run(reference, tokens, seed + 1, DTYPES[dtype])
    label = ref_entry.name if ref_entry is not entry else f"{entry.name} reference"
    reference_text = f"{label} ({ref_backend})"
    if backend == ref_backend:  # no fast path ran (e.g. the optional kernels are missing)
        return CheckResult("reference", backend=backend, reference=reference_text,
                           length=length)
    norms = [g.double().norm().item() for g in ref_grads.values() if g is not None]
    floor = FLOOR * max(norms, default=0.0)
    errors = {"logits": _relative_error(out, ref_out, 0.0)}
    errors |= {f"d{name}": _relative_error(grads[name], ref_grads.get(name), floor)
               for name in grads}
    worst = max(errors, key=lambda name: errors[name])
    status = "passed" if errors[worst] <= TOLERANCE[dtype] else "failed"
    return CheckResult(status, errors[worst], worst, backend, reference_text, length)


@dataclass
class FastPathChecks:
    """The checks of one run, cached by what they depend on (model config, device, dtype), so a
    sweep over lengths checks each config once."""

    registry: Registry = REGISTRY
    skip: bool = False
    results: dict[tuple[Any, ...], CheckResult] = field(default_factory=dict)
    labels: dict[tuple[Any, ...], str] = field(default_factory=dict)  # for the summary

    def check(self, entry: Entry, config: ModelConfig, seq_len: int, device: str, dtype: str,
              compiled: bool, label: str = "") -> CheckResult:
        """The check of ``entry`` at ``config`` for a cell of ``seq_len`` (made once per
        config, device, dtype and check length); ``label``: the model as the run names it."""
        if self.skip:
            return CheckResult("skipped")
        # one layer (see the module docstring), eager: the memory budget applies to compile only
        pinned = config.resolved_for(seq_len, device, compiled).replace(
            n_layers=1, activation_memory_budget=1.0)
        pair = reference_of(entry, pinned, self.registry)
        if pair is None:
            return CheckResult("none")
        length = min(seq_len, CHECK_LENGTH)
        key = (entry.name, config_hash(pinned.to_dict()), device, dtype, length)
        if key not in self.results:
            self.labels[key] = label or entry.name
            try:
                self.results[key] = compare(entry, pinned, *pair, torch.device(device), dtype,
                                            length)
            finally:  # the two models' memory, before the timed cell builds its own
                free_memory(torch.device(device))
        return self.results[key]

    def summary(self) -> list[str]:
        """One line per check this run made (the cells reused them)."""
        lines = []
        for key, result in self.results.items():
            _name, _config, device, dtype, length = key
            what = f"{self.labels[key]} ({result.backend})"
            if result.status == "reference":
                text = "no fast path ran: it is its own reference here"
            elif result.status == "passed":
                text = f"passed, max rel err {result.max_rel_err:.1e}"
            else:
                text = f"FAILED, {result.max_rel_err:.2e} in {result.worst}: not timed"
            lines.append(f"fast-path check on {device} {dtype} at L={length}: {what} vs "
                         f"{result.reference}: {text}")
        return lines
