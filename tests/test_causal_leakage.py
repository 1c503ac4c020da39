"""No causal entry looks ahead: changing the tokens after position t leaves the logits at
positions <= t unchanged — for every registry entry declaring ``causal=True``, automatically.

Each entry is built small with its LM head and with its block/chunk/window sizes shrunk
(``SHRINK``: a field is shrunk only where the entry has it and its default is larger, so full
attention stays full), so that L = 83 spans several blocks and ends mid-block: the VQ block cache
(window 16), OVQ / linear-attention / Mamba-2 / Mega-chunk chunks of 16. One training-mode
forward first initialises the VQ codebooks from data (else every key may map to one random
code, and the code cache would hardly be exercised); the checks then run in eval mode (training
forwards update codebooks and OVQ memories between calls) in float64, so float noise (FFT
convolutions mix all positions in rounding) stays ~1e-15 and any real leak stands out.

Cut points t: first position, chunk ends/starts (15, 16, 31, 32), mid-chunk (37, 50), and the
second-to-last position.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_BACKBONE, registry_entries

LENGTH = 83  # five full blocks of 16 and a partial one
BATCH = 2
CUTS = (0, 15, 16, 31, 32, 37, 50, LENGTH - 2)
# small sizes so that LENGTH spans several chunks / windows (applied where the entry has the field)
SHRINK = {"window": 16, "chunk_size": 16, "codebook_size": 8, "n_components": 32,
          "headdim": 16, "d_state": 16}
TOLERANCE = 1e-9  # max |change| at positions <= t, relative to max |logits| (float64)
# extra configurations of the entries whose causal path has several code paths
VARIANTS = {
    "longvq": [{"attn_fn": "laplace"}, {"ssm": "ema"}, {"local_bias": False},
               {"vq": False}, {"gate": False}],
    "transformer_vq": [{"attn_fn": "laplace"}],
}


def shrunk(entry) -> dict:
    defaults = entry.make_config()
    return {name: value for name, value in SHRINK.items()
            if hasattr(defaults, name) and getattr(defaults, name) > value}


def causal_cases():
    cases = []
    for entry in registry_entries():
        if not entry.causal:
            continue
        for extra in [{}, *VARIANTS.get(entry.name, [])]:
            label = ",".join(f"{k}={v}" for k, v in extra.items())
            cases.append(pytest.param(entry, extra, id=f"{entry.name}" + (f"[{label}]"
                                                                            if label else "")))
    return cases


@pytest.mark.parametrize(("entry", "extra"), causal_cases())
def test_future_tokens_never_change_past_logits(entry, extra):
    torch.manual_seed(0)
    cfg = entry.make_config(**{**TINY_BACKBONE, **shrunk(entry), **extra, "head": "lm"})
    model = entry.build(cfg)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, LENGTH), generator=generator)
    model.train()
    model(tokens)  # data-initialised codebooks (VQ entries); then frozen by eval mode
    model.eval()
    model.double()
    with torch.no_grad():
        base = model(tokens)
        scale = base.abs().max().item()
        for t in CUTS:
            changed = tokens.clone()
            changed[:, t + 1:] = torch.randint(0, cfg.vocab_size, (BATCH, LENGTH - t - 1),
                                               generator=generator)
            assert (changed[:, t + 1:] != tokens[:, t + 1:]).any()
            out = model(changed)
            past = (out[:, :t + 1] - base[:, :t + 1]).abs().max().item() / scale
            future = (out[:, t + 1:] - base[:, t + 1:]).abs().max().item() / scale
            assert past <= TOLERANCE, (
                f"{entry.name} {extra}: changing tokens after t={t} changed the logits at "
                f"positions <= t by {past:.3e} (relative)")
            assert future > 1e-6, f"{entry.name}: the changed tokens changed nothing (t={t})"


def test_every_causal_entry_is_covered():
    names = {p.values[0].name for p in causal_cases()}
    assert names == {e.name for e in registry_entries() if e.causal}
    assert {"longvq", "transformer_vq", "ovq_attn", "linear_attn", "mamba2",
            "mega_chunk"} <= names


@pytest.mark.parametrize("name", ["longvq", "transformer_vq", "ovq_attn"])
def test_first_training_step_is_causal(name):
    """State learnt in a training forward (the data-initialised codebook, EMA k-means) must not
    let the logits of that same forward see later tokens: two fresh copies of one model, fed
    sequences that differ only after t, agree up to t."""
    import copy

    entry = next(e for e in registry_entries() if e.name == name)
    torch.manual_seed(0)
    cfg = entry.make_config(**{**TINY_BACKBONE, **shrunk(entry), "head": "lm"})
    fresh = entry.build(cfg).double().train()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, LENGTH), generator=generator)
    t = CUTS[len(CUTS) // 2]
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, cfg.vocab_size, (BATCH, LENGTH - t - 1),
                                       generator=generator)
    base = copy.deepcopy(fresh)(tokens).detach()
    out = copy.deepcopy(fresh)(changed).detach()
    past = (out[:, :t + 1] - base[:, :t + 1]).abs().max().item() / base.abs().max().item()
    assert past <= TOLERANCE, f"{name}: first training step leaks ({past:.3e} at t={t})"
