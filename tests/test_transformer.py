"""transformer_vanilla and transformer_sdpa compute the same function on the same weights."""

from __future__ import annotations

import pytest
import torch

from harness.registry import REGISTRY
from tests.conftest import assert_close


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("length", [1, 37, 64])
def test_vanilla_equals_sdpa(head: str, length: int, dtype: torch.dtype, tol: float):
    vanilla_entry = REGISTRY.get("transformer_vanilla")
    sdpa_entry = REGISTRY.get("transformer_sdpa")
    cfg = vanilla_entry.make_config(d_model=32, n_heads=4, n_layers=2, d_ffn=64, head=head)
    torch.manual_seed(0)
    vanilla = vanilla_entry.build(cfg).to(dtype)
    sdpa = sdpa_entry.build(cfg).to(dtype)
    sdpa.load_state_dict(vanilla.state_dict())  # same parameter layout
    tokens = torch.randint(0, cfg.vocab_size, (3, length))
    out_v, out_s = vanilla(tokens), sdpa(tokens)
    assert_close("out", out_v, out_s, tol)
    upstream = torch.randn_like(out_v)  # random upstream gradient, not .sum()
    out_v.backward(upstream)
    out_s.backward(upstream)
    grads_s = dict(sdpa.named_parameters())
    for name, param in vanilla.named_parameters():
        assert_close(name, param.grad, grads_s[name].grad, 10 * tol)


def test_causal_vanilla_ignores_future_tokens():
    entry = REGISTRY.get("transformer_vanilla")
    cfg = entry.make_config(d_model=32, n_heads=4, n_layers=2, d_ffn=64, head="lm")
    torch.manual_seed(0)
    model = entry.build(cfg).double()
    tokens = torch.randint(0, 256, (2, 40))
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    out, out_changed = model(tokens), model(changed)
    torch.testing.assert_close(out[:, :25], out_changed[:, :25])
    assert not torch.allclose(out[:, 25:], out_changed[:, 25:])


def test_sdpa_records_the_kernel_that_ran():
    entry = REGISTRY.get("transformer_sdpa")
    model = entry.build(entry.make_config(d_model=32, n_heads=4, n_layers=1))
    assert model.backend == "sdpa"  # nothing ran yet
    model(torch.randint(0, 256, (2, 16)))
    assert model.backend.startswith("sdpa-")
