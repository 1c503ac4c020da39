"""OVQ attention: chunked path vs the sequential oracle, the write rule, the registry entry.

Oracle comparisons follow tests/test_vq_attention.py: lengths not multiples of the chunk, a
random upstream gradient, outputs + every input gradient + the final memory compared. Keys are
either random (every key is far from every centroid: the memory fills and the "full" branch
runs) or drawn around a few cluster centres (keys join existing components and earlier openers).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines.transformer import attention_vanilla
from harness.registry import REGISTRY
from models.ovq import ovq_attention_chunked, ovq_attention_naive
from tests.conftest import assert_close, requires_cuda

B, H, D, DV = 2, 2, 8, 4
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}



def make_inputs(length: int, keys: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if keys == "clustered":  # 5 centres per head, small noise: distances << threshold mostly
        centres = torch.randn(B, H, 5, D, generator=gen, dtype=dtype)
        pick = torch.randint(0, 5, (B, H, length), generator=gen)
        k = centres.gather(2, pick[..., None].expand(-1, -1, -1, D))
        k = k + 0.3 * torch.randn(B, H, length, D, generator=gen, dtype=dtype)
    else:
        k = torch.randn(B, H, length, D, generator=gen, dtype=dtype)
    k = F.rms_norm(k, (D,))  # the mixer's qk_norm scale: d(k, c) in [0, 4]
    q = torch.randn(B, H, length, D, generator=gen, dtype=dtype)
    v = torch.randn(B, H, length, DV, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def run(fn, leaves, grad_out=None, **options):
    o, state = fn(*leaves, **options)
    grad_out = torch.randn_like(o) if grad_out is None else grad_out
    return o, state, torch.autograd.grad(o, leaves, grad_out), grad_out


@pytest.mark.parametrize("grad_through_memory", [True, False])
@pytest.mark.parametrize("keys", ["random", "clustered"])
@pytest.mark.parametrize(
    ("length", "chunk", "n_components"),
    [(63, 16, 6), (100, 16, 64), (100, 7, 20), (40, 64, 3)],  # (40, 64, 3): full in chunk 0
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_matches_naive(dtype, length, chunk, n_components, keys, grad_through_memory):
    leaves = make_inputs(length, keys, dtype)
    options = dict(chunk_size=chunk, n_components=n_components, new_threshold=0.5,
                   grad_through_memory=grad_through_memory)  # fmt: skip
    ref_o, ref_s, ref_g, grad_out = run(ovq_attention_naive, leaves, **options)
    o, s, g, _ = run(ovq_attention_chunked, leaves, grad_out, **options)
    torch.testing.assert_close(s.counts, ref_s.counts, rtol=0, atol=0)  # same assignments
    assert o.dtype == ref_o.dtype
    assert_close("o", ref_o, o, TOL[dtype])
    for name, ref, other in zip(("dq", "dk", "dv"), ref_g, g, strict=True):
        assert_close(name, ref, other, TOL[dtype])
    assert_close("key_sums", ref_s.key_sums, s.key_sums, TOL[dtype])
    assert_close("value_sums", ref_s.value_sums, s.value_sums, TOL[dtype])
    assert (s.active <= n_components).all()


@pytest.mark.parametrize("grad_through_memory", [True, False])
def test_checkpointed_read_groups_match_naive(monkeypatch, grad_through_memory):
    """Training reads READ_GROUP chunks at a time under checkpoint: 15 chunks in groups of 4
    (the last partial) give the oracle's output and input gradients."""
    import models.ovq

    monkeypatch.setattr(models.ovq, "READ_GROUP", 4)
    leaves = make_inputs(100, "clustered", torch.float64)
    options = dict(chunk_size=7, n_components=20, new_threshold=0.5,
                   grad_through_memory=grad_through_memory)  # fmt: skip
    ref_o, _, ref_g, grad_out = run(ovq_attention_naive, leaves, **options)
    o, _, g, _ = run(ovq_attention_chunked, leaves, grad_out, **options)
    assert_close("o", ref_o, o, TOL[torch.float64])
    for name, ref, other in zip(("dq", "dk", "dv"), ref_g, g, strict=True):
        assert_close(name, ref, other, TOL[torch.float64])


def test_oracle_cases_cover_every_write_branch():
    """Random keys fill the memory (full branch); clustered keys join before it is full."""
    opts = dict(chunk_size=16, new_threshold=0.5)
    _, full = ovq_attention_chunked(*make_inputs(63, "random", torch.float64), n_components=6,
                                    **opts)  # fmt: skip
    assert (full.active == 6).all() and (full.counts.sum(-1) == 63).all()
    _, joined = ovq_attention_chunked(*make_inputs(100, "clustered", torch.float64),
                                      n_components=64, **opts)  # fmt: skip
    assert (joined.active < 64).all() and (joined.counts.max(-1).values > 1).all()


def test_identical_keys_show_the_in_chunk_approximation():
    """Keys of one chunk are not tested against each other: 4 equal keys in chunk 0 open 4
    components (empty memory); later equal keys join the lowest id at distance 0."""
    k = torch.ones(1, 1, 10, D, dtype=torch.float64)
    q, v = torch.randn(1, 1, 10, D, dtype=torch.float64), torch.randn(1, 1, 10, DV)
    for fn in (ovq_attention_naive, ovq_attention_chunked):
        _, state = fn(q, k, v.double(), chunk_size=4, n_components=8, new_threshold=0.5)
        assert state.counts[0, 0].tolist() == [7, 1, 1, 1, 0, 0, 0, 0], fn.__name__


@pytest.mark.parametrize("length", [37, 64])
def test_one_key_per_component_is_exact_causal_attention(length):
    """Threshold 0 and N >= L: every key gets its own component (n = 1, c = k, m = v), so the
    shared softmax over [log 1 + tau q.k | in-chunk keys] is exact causal attention."""
    q, k, v = make_inputs(length, "random", torch.float64)
    o, state = ovq_attention_chunked(q, k, v, chunk_size=8, n_components=length,
                                     new_threshold=0.0)  # fmt: skip
    assert (state.active == length).all()
    assert_close("o", attention_vanilla(q, k, v, causal=True), o, 1e-12)


def test_streaming_with_state_equals_one_pass():
    q, k, v = make_inputs(100, "clustered", torch.float64)
    opts = dict(chunk_size=16, n_components=12, new_threshold=0.5)
    whole, end = ovq_attention_chunked(q, k, v, **opts)
    first, mid = ovq_attention_chunked(q[:, :, :64], k[:, :, :64], v[:, :, :64], **opts)
    second, end2 = ovq_attention_chunked(q[:, :, 64:], k[:, :, 64:], v[:, :, 64:],
                                         initial_state=mid, **opts)  # fmt: skip
    assert_close("o", whole, torch.cat([first, second], 2), 1e-12)
    torch.testing.assert_close(end.counts, end2.counts)
    assert_close("key_sums", end.key_sums, end2.key_sums, 1e-12)


@pytest.mark.parametrize("grad_through_memory", [True, False])
def test_gradient_semantics(grad_through_memory):
    """Gradient from chunk 1's outputs to chunk 0's k, v flows only through the memory."""
    q, k, v = make_inputs(32, "clustered", torch.float64)
    o, _ = ovq_attention_chunked(q, k, v, chunk_size=16, n_components=8, new_threshold=0.5,
                                 grad_through_memory=grad_through_memory)  # fmt: skip
    grad_out = torch.zeros_like(o)
    grad_out[:, :, 16:] = torch.randn_like(o[:, :, 16:])
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), grad_out)
    reached = dk[:, :, :16].abs().sum() > 0 and dv[:, :, :16].abs().sum() > 0
    assert reached == grad_through_memory
    assert dq[:, :, :16].abs().sum() == 0  # queries of chunk 0 never influence chunk 1


# --------------------------------------------------------------------------- registry entry
def tiny(**overrides):
    entry = REGISTRY.get("ovq_attn")
    cfg = entry.make_config(d_model=32, n_layers=2, n_heads=2, d_ffn=64, head="lm", **overrides)
    torch.manual_seed(0)
    return entry.build(cfg).double()


def test_entry_is_causal_only():
    entry = REGISTRY.get("ovq_attn")
    assert entry.causal and not entry.bidirectional
    with pytest.raises(ValueError, match="no bidirectional mode"):
        entry.build(entry.make_config(head="cls"))
    with pytest.raises(ValueError, match="n_heads"):
        entry.make_config(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="new_threshold"):
        entry.make_config(new_threshold=-1.0)


def test_causal_model_ignores_future_tokens():
    model = tiny(chunk_size=8, n_components=6)
    tokens = torch.randint(0, 256, (2, 40))
    changed = tokens.clone()
    changed[:, 21:] = torch.randint(0, 256, (2, 19))  # inside a chunk, after the memory filled
    out, out_changed = model(tokens), model(changed)
    torch.testing.assert_close(out[:, :21], out_changed[:, :21])
    assert not torch.allclose(out[:, 21:], out_changed[:, 21:])


def test_state_size_is_independent_of_length_and_stats():
    """The recurrent memory (centroid and value sums, counts) has the same size at L=2K and 8K."""
    model = tiny(chunk_size=64, n_components=16)
    shapes, sizes = set(), set()
    for length in (2048, 8192):
        with torch.no_grad():
            model(torch.randint(0, 256, (2, length)))
        state = model.blocks[0].mixer.last_state
        tensors = (state.key_sums, state.value_sums, state.counts)
        shapes.add(tuple(t.shape for t in tensors))
        sizes.add(sum(t.numel() * t.element_size() for t in tensors))
    assert shapes == {((2, 2, 16, 16), (2, 2, 16, 16), (2, 2, 16))} and len(sizes) == 1
    stats = model.layer_stats()
    assert 0 < stats["blocks.0.mixer.active_components"] <= 1
    assert stats["blocks.1.mixer.mean_count"] >= 1
    assert model.backend == "torch-chunked"


# ------------------------------------------------------------------------------------ GPU
@requires_cuda
def test_cuda_float32_matches_cpu_float64():
    leaves = make_inputs(300, "clustered", torch.float64)
    options = dict(chunk_size=64, n_components=32, new_threshold=0.5)
    ref_o, ref_s, ref_g, grad_out = run(ovq_attention_chunked, leaves, **options)
    gpu = [x.detach().float().cuda().requires_grad_() for x in leaves]
    o, s, g, _ = run(ovq_attention_chunked, gpu, grad_out.float().cuda(), **options)
    torch.testing.assert_close(s.counts.cpu().double(), ref_s.counts, rtol=0, atol=0)
    assert_close("o", ref_o, o.cpu(), 1e-4)
    for name, ref, other in zip(("dq", "dk", "dv"), ref_g, g, strict=True):
        assert_close(name, ref, other.cpu(), 1e-4)


@requires_cuda
def test_cuda_default_config_bf16_autocast():
    """Default N = 1024, T = 64 at L = 2048 under bf16 autocast: finite loss and gradients."""
    entry = REGISTRY.get("ovq_attn")
    cfg = entry.make_config(d_model=128, n_heads=2, n_layers=2, head="lm")
    model = entry.build(cfg).cuda()
    tokens = torch.randint(0, 256, (2, 2048), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens)
    F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    print(model.layer_stats())
