"""LongVQ model: the linear op inside the model equals the naive one, every ablation field changes
what is computed, causal mode never looks ahead, VQ statistics and commitment loss are reported."""

from __future__ import annotations

import pytest
import torch

from harness.backbone import task_loss
from harness.registry import REGISTRY
from tests.conftest import assert_close

# gradients that are exactly zero in theory (the key offset of a softmax layer sums dlogit over
# keys) come out ~1e-17: compare them against this floor instead of their own norm
MODEL_FLOOR = 1e-6
TINY = {"d_model": 32, "n_layers": 2, "d_ffn": 64, "z_dim": 16, "v_dim": 32, "codebook_size": 8,
        "window": 8, "n_classes": 5}


def build(seed: int = 0, **overrides):
    entry = REGISTRY.get("longvq")
    torch.manual_seed(seed)
    return entry.build(entry.make_config(**{**TINY, **overrides}))


def tokens(length: int = 45, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))



def assert_same_function(linear: torch.nn.Module, naive: torch.nn.Module) -> None:
    """Same weights: same logits and same gradient of every parameter (random upstream)."""
    naive.load_state_dict(linear.state_dict())
    x = tokens()
    out_linear, out_naive = linear(x), naive(x)
    assert_close("logits", out_naive, out_linear, 1e-8, floor=MODEL_FLOOR)
    upstream = torch.randn_like(out_naive)
    out_linear.backward(upstream)
    out_naive.backward(upstream)
    naive_params = dict(naive.named_parameters())
    for name, param in linear.named_parameters():
        assert_close(name, naive_params[name].grad, param.grad, 1e-7, floor=MODEL_FLOOR)


@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_linear_model_equals_naive_model(head, attn_fn):
    """Same weights, ``attn_impl`` linear vs naive: same logits and parameter gradients."""
    linear = build(head=head, attn_fn=attn_fn).double().eval()
    naive = build(head=head, attn_fn=attn_fn, attn_impl="naive").double().eval()
    assert_same_function(linear, naive)


def _copy_shared(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Load every tensor whose name and shape both models share."""
    target = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items()
              if k in target and target[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)


@pytest.mark.parametrize(("field", "value"), [
    ("attn_fn", "laplace"), ("local_bias", False), ("window", 4), ("ssm", "ema"),
    ("vq", False), ("gate", False), ("codebook_size", 4), ("key_norm", True),
])
def test_each_ablation_field_changes_the_output(field, value):
    base = build().eval()
    with torch.no_grad():  # a bias large enough that its presence or extent shows
        for layer in base.blocks:
            layer.rel_bias.copy_(torch.linspace(-2.0, 2.0, layer.rel_bias.numel()))
    variant = build(**{field: value}).eval()
    _copy_shared(base, variant)
    x = tokens()
    with torch.no_grad():
        assert not torch.allclose(base(x), variant(x), atol=1e-6), field


def test_zero_bias_equals_no_bias():
    with_bias = build().double().eval()
    without = build(local_bias=False).double().eval()
    _copy_shared(with_bias, without)
    with torch.no_grad():
        for layer in with_bias.blocks:
            layer.rel_bias.zero_()
        torch.testing.assert_close(with_bias(tokens()), without(tokens()))


@pytest.mark.parametrize("ssm", ["s4d", "ema"])
@pytest.mark.parametrize("vq", [True, False])
def test_causal_lm_never_looks_ahead(ssm, vq):
    model = build(head="lm", ssm=ssm, vq=vq).double().eval()
    x = tokens(length=50)
    changed = x.clone()
    changed[:, 30:] = tokens(length=20, seed=7)
    with torch.no_grad():
        out, out_changed = model(x), model(changed)
    torch.testing.assert_close(out[:, :30], out_changed[:, :30])
    assert not torch.allclose(out[:, 30:], out_changed[:, 30:])


def test_commitment_loss_and_codebook_stats_reported():
    model = build().train()
    x = tokens()
    logits = model(x)
    aux = model.aux_loss()
    assert aux is not None and aux.item() > 0 and aux.requires_grad
    stats = model.layer_stats()
    util = [v for k, v in stats.items() if k.endswith("codebook_utilisation")]
    perplexity = [v for k, v in stats.items() if k.endswith("codebook_perplexity")]
    assert len(util) == TINY["n_layers"] and all(0 < u <= 1 for u in util)
    assert all(1 <= p <= TINY["codebook_size"] for p in perplexity)
    loss = task_loss(model, logits, torch.zeros(2, dtype=torch.long))
    assert loss.item() > aux.item()


def test_training_updates_codebook_but_eval_does_not():
    model = build().train()
    codebook = model.blocks[0].quantizer.codebook.clone()
    model(tokens())
    assert not torch.equal(codebook, model.blocks[0].quantizer.codebook)
    model.eval()
    codebook = model.blocks[0].quantizer.codebook.clone()
    model(tokens())
    assert torch.equal(codebook, model.blocks[0].quantizer.codebook)


def test_model_defers_codebook_updates_to_the_end_of_its_forward():
    """The model runs its quantisers in deferred mode (one compiled graph, models/vq.py): the
    same logits, gradients and codebooks step by step as updating inside each layer."""
    models = {}
    for deferred in (False, True):
        model = build().train()
        for block in model.blocks:
            block.quantizer.defer_update = deferred
        models[deferred] = model
    assert all(b.quantizer.defer_update for b in build().blocks)  # the model's default
    for step in range(3):
        x = tokens(seed=step)
        grads = {}
        for deferred, model in models.items():
            model.zero_grad()
            torch.manual_seed(step)  # the data init samples keys with torch's generator
            logits = model(x)
            task_loss(model, logits, torch.zeros(2, dtype=torch.long)).backward()
            grads[deferred] = [p.grad.clone() for p in model.parameters()]
        for (name, a), b in zip(models[False].state_dict().items(),
                                models[True].state_dict().values(), strict=True):
            assert torch.equal(a, b), (step, name)
        for a, b in zip(grads[False], grads[True], strict=True):
            assert torch.equal(a, b), step


def test_bf16_autocast_is_finite():
    model = build(head="lm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens(length=70))
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(("field", "value"), [("attn_fn", "relu"), ("ssm", "lstm"),
                                              ("codebook_size", 0)])
def test_bad_field_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        build(**{field: value})


@pytest.mark.parametrize("model", ["longvq", "transformer_vq"])
def test_no_window_model(model):
    """window=0 (no local part, no bias): linear equals naive in the model, and the causal LM
    never looks ahead; a bias or key_grad="window" at window=0 is refused, naming the fix."""
    entry = REGISTRY.get(model)
    sizes = TINY if model == "longvq" else {"d_model": 32, "n_heads": 2, "n_layers": 2,
                                            "d_ffn": 64, "codebook_size": 8}
    cfg = entry.make_config(**{**sizes, "window": 0, "local_bias": False, "head": "lm"})
    torch.manual_seed(0)
    linear = entry.build(cfg).double().eval()
    naive = entry.build(cfg.replace(attn_impl="naive")).double().eval()
    assert_same_function(linear, naive)
    x = tokens(length=50)
    changed = x.clone()
    changed[:, 30:] = tokens(length=20, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(linear(x)[:, :30], linear(changed)[:, :30])
    with pytest.raises(ValueError, match="local_bias"):
        entry.make_config(**{**sizes, "window": 0})
    with pytest.raises(ValueError, match="key_grad"):
        entry.make_config(**{**sizes, "window": 0, "local_bias": False, "key_grad": "window"})
    with pytest.raises(ValueError, match="window"):
        entry.make_config(**{**sizes, "window": -1, "local_bias": False})


def test_transformer_vq_linear_equals_naive():
    entry = REGISTRY.get("transformer_vq")
    cfg = entry.make_config(d_model=32, n_heads=2, n_layers=2, d_ffn=64, codebook_size=8,
                            window=8, head="lm")
    torch.manual_seed(0)
    linear = entry.build(cfg).double().eval()
    naive = entry.build(cfg.replace(attn_impl="naive")).double().eval()
    assert_same_function(linear, naive)


@pytest.mark.parametrize(("model", "module"), [("longvq", "models.longvq"),
                                               ("transformer_vq", "baselines.transformer_vq")])
def test_triton_inputs_are_cast_to_the_autocast_dtype_in_the_model(monkeypatch, model, module):
    """Under autocast the Triton op reads bf16: q, k_hat and v are cast in the model (compiled,
    fused with the ops that make them), so they reach the op in bf16 already; the torch paths
    get them as made (they compute in float32)."""
    import importlib

    import models.vq_attention as vq_module

    seen: list[tuple[torch.dtype, ...]] = []

    def record(q, k_hat, v, *args, **kwargs):
        seen.append((q.dtype, k_hat.dtype, v.dtype))
        return torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)

    target = importlib.import_module(module)
    monkeypatch.setattr(target, "vq_attention", record)
    entry = REGISTRY.get(model)
    overrides = {"d_model": 32, "n_layers": 1, "window": 8, "codebook_size": 8, "head": "lm"}
    net = entry.build(entry.make_config(**overrides))
    monkeypatch.setattr(target, "resolve_impl", lambda _impl, _q: "triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(tokens(length=20))
        x = torch.zeros(2)
        assert vq_module.kernel_inputs("linear", x)[0] is x  # torch paths: as given
    assert seen and all(dtypes == (torch.bfloat16,) * 3 for dtypes in seen), seen
