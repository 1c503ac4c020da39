"""S4D and Mega baselines: chunked attention vs its masked oracle, causality, fairseq layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines.mega import (
    MegaBlock,
    MegaConfig,
    MovingAverageGatedAttention,
    SimpleRelativePositionalBias,
    attention_chunked,
    attention_masked,
    block_diagonal_mask,
)
from baselines.mega import laplace as laplace_fn
from harness.registry import REGISTRY
from tests.conftest import assert_close, requires_cuda

SMALL = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ffn": 32, "vocab_size": 50}



def mega_layer(head: str, attn_fn: str, chunk_size: int, **kw) -> MovingAverageGatedAttention:
    torch.manual_seed(0)
    cfg = MegaConfig(**SMALL, head=head, attn_fn=attn_fn, chunk_size=chunk_size, ndim=4, **kw)
    layer = MovingAverageGatedAttention(cfg).double()
    with torch.no_grad():  # fairseq's init (gamma ~ 0.02, beta = 0) gives near-constant scores
        layer.gamma.normal_(0.0, 1.0)
        layer.beta.normal_(0.0, 0.5)
        layer.rel_pos_bias.rel_pos_bias.normal_(0.0, 0.5)
    return layer


def run_with_grads(layer, x, do, reference: bool) -> dict[str, torch.Tensor]:
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, reference=reference)
    out.backward(do)  # random upstream gradient, never .sum()
    grads = {"out": out.detach(), "dx": x.grad}
    grads.update({f"d{n}": p.grad.clone() for n, p in layer.named_parameters()})
    return grads


# ------------------------------------------------------------------ chunked vs masked oracle


@pytest.mark.parametrize("length", [63, 100, 11])
@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_chunked_equals_block_diagonal_reference(attn_fn: str, head: str, length: int):
    layer = mega_layer(head, attn_fn, chunk_size=16)
    x = torch.randn(2, length, SMALL["d_model"], dtype=torch.float64)
    do = torch.randn_like(x)
    ref = run_with_grads(layer, x, do, reference=True)
    chunked = run_with_grads(layer, x, do, reference=False)
    assert layer.backend == "torch-chunked"
    for name, value in ref.items():
        assert_close(name, value, chunked[name], 1e-10)


@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_op_matches_masked_op_in_float32(attn_fn: str, causal: bool):
    torch.manual_seed(1)
    q, k = torch.randn(2, 2, 70, 8).unbind(0)
    v = torch.randn(2, 70, 12)
    table = SimpleRelativePositionalBias(16)
    out = attention_chunked(q, k, v, table(16), 16, causal, attn_fn)
    mask = block_diagonal_mask(70, 16, causal)
    ref = attention_masked(q, k, v, table(70, clamp=True), mask, attn_fn)
    assert_close("o", ref, out, 1e-5)


@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_one_chunk_equals_full_attention(attn_fn: str, head: str):
    # chunk >= L is a single chunk: same function as full attention on the same weights
    full = mega_layer(head, attn_fn, chunk_size=-1, max_positions=32)
    chunk = mega_layer(head, attn_fn, chunk_size=32)
    chunk.load_state_dict(full.state_dict())  # same shapes: both bias tables span 32 offsets
    x = torch.randn(2, 27, SMALL["d_model"], dtype=torch.float64)
    assert_close("out", full(x), chunk(x), 1e-12)
    assert full.backend == "torch-full"


def fairseq_rel_bias(table: torch.Tensor, max_positions: int, length: int) -> torch.Tensor:
    """fairseq's SimpleRelativePositionalBias.forward, transcribed."""
    b = table[(max_positions - length) : (max_positions + length - 1)]
    t = torch.tile(F.pad(b, (0, length)), (length,))[:-length]
    t = t.view(length, 3 * length - 2)
    r = (2 * length - 1) // 2
    return t[:, r : t.size(1) - r]


def test_relative_bias_matches_fairseq_construction():
    table = SimpleRelativePositionalBias(10)
    for length in (1, 4, 10):
        expected = fairseq_rel_bias(table.rel_pos_bias, 10, length)
        torch.testing.assert_close(table(length), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_positions"):
        table(11)


def fairseq_forward(layer: MovingAverageGatedAttention, x: torch.Tensor) -> torch.Tensor:
    """MovingAverageGatedAttention.forward of facebookresearch/mega transcribed in its (L, B, D)
    layout (no padding, no dropout, no incremental state); the causal mask is mega_lm's
    ``buffered_future_mask``. L must be < chunk or a multiple of it (fairseq asserts that)."""
    x = x.transpose(0, 1)
    seq_len, bsz, _ = x.size()
    residual = x
    if layer.prenorm:
        x = layer.norm(x)
    v = F.silu(layer.v_proj(x))
    mx = layer.move(x.transpose(0, 1)).transpose(0, 1)  # our EMA is (B, L, D)
    sizes = [layer.embed_dim, layer.zdim + layer.hdim, layer.embed_dim]
    u, zr, hx = torch.split(layer.mx_proj(mx), sizes, dim=-1)
    u = torch.sigmoid(u)
    z, r = torch.split(F.silu(zr), [layer.zdim, layer.hdim], dim=-1)
    q, k = torch.unbind(z.unsqueeze(2) * layer.gamma + layer.beta, dim=2)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if layer.chunk_size < 0 or seq_len < layer.chunk_size:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    else:
        nc = seq_len // layer.chunk_size
        q, k, v = (t.reshape(bsz, nc, layer.chunk_size, t.size(-1)) for t in (q, k, v))
    slen = k.size(2)
    table = layer.rel_pos_bias
    bias = fairseq_rel_bias(table.rel_pos_bias, table.max_positions, slen)
    if layer.attn_fn == "softmax":
        qk = torch.matmul(q * layer.zdim**-0.5, k.transpose(2, 3)) + bias
        if layer.causal:
            qk = qk + torch.triu(torch.full((slen, slen), float("-inf")), 1).to(qk)
        attn_weights = F.softmax(qk, dim=-1)  # fairseq forces float32; the test runs float64
    else:
        attn_mask = torch.tril(torch.ones(slen, slen)).to(q) if layer.causal else None
        lengths = attn_mask.sum(dim=-1, keepdim=True) if attn_mask is not None else slen
        attn_weights = laplace_fn(torch.matmul(q, k.transpose(2, 3)) / lengths + bias)
        if attn_mask is not None:
            attn_weights = attn_weights * attn_mask
    h = torch.matmul(attn_weights, v).view(bsz, seq_len, layer.hdim).transpose(0, 1)
    h = F.silu(hx + layer.h_proj(h * r))
    out = torch.addcmul(residual, u, h - residual)
    if not layer.prenorm:
        out = layer.norm(out)
    return out.transpose(0, 1)


@pytest.mark.parametrize(("chunk_size", "length"), [(-1, 37), (16, 48), (16, 11)])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_layer_matches_fairseq_transcription(attn_fn, head, prenorm, chunk_size, length):
    layer = mega_layer(head, attn_fn, chunk_size, prenorm=prenorm)
    x = torch.randn(2, length, SMALL["d_model"], dtype=torch.float64)
    with torch.no_grad():
        assert_close("out", fairseq_forward(layer, x), layer(x), 1e-12)


# ------------------------------------------------------------------ causality, attention fns


def lm_model(name: str, **overrides):
    entry = REGISTRY.get(name)
    torch.manual_seed(0)
    cfg = entry.make_config(**SMALL, head="lm", **overrides)
    return entry.build(cfg).double().eval()


CAUSAL_CASES = [
    ("s4d", {}),
    ("s4d", {"prenorm": True, "init": "inv"}),
    ("mega", {"attn_fn": "softmax"}),
    ("mega", {"attn_fn": "laplace"}),
    ("mega_chunk", {"attn_fn": "softmax", "chunk_size": 16}),
    ("mega_chunk", {"attn_fn": "laplace", "chunk_size": 16}),
]


@pytest.mark.parametrize(("name", "overrides"), CAUSAL_CASES)
def test_lm_head_ignores_future_tokens(name: str, overrides: dict):
    model = lm_model(name, **overrides)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 45))
    changed = tokens.clone()
    changed[:, 30:] = (tokens[:, 30:] + 1 + torch.randint(0, 40, (2, 15))) % SMALL["vocab_size"]
    with torch.no_grad():
        out, out_changed = model(tokens), model(changed)
    torch.testing.assert_close(out[:, :30], out_changed[:, :30], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, 30:], out_changed[:, 30:])


@pytest.mark.parametrize("chunk_size", [-1, 16])
def test_bidirectional_layer_sees_the_future(chunk_size: int):
    layer = mega_layer("cls", "softmax", chunk_size)
    x = torch.randn(1, 40, SMALL["d_model"], dtype=torch.float64)
    changed = x.clone()
    changed[:, 30:] += 1.0
    assert not torch.allclose(layer(x)[:, :10], layer(changed)[:, :10])


@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("chunk_size", [-1, 16])
def test_softmax_and_laplace_differ(chunk_size: int, head: str):
    softmax = mega_layer(head, "softmax", chunk_size)
    laplace = mega_layer(head, "laplace", chunk_size)
    laplace.load_state_dict(softmax.state_dict())  # same weights, only the attention fn differs
    x = torch.randn(2, 40, SMALL["d_model"], dtype=torch.float64)
    with torch.no_grad():
        q, k, v, *_ = softmax.project(x)
        o_softmax, o_laplace = softmax.attend(q, k, v), laplace.attend(q, k, v)
        relative = (o_softmax - o_laplace).norm() / o_softmax.norm()
        assert relative > 0.1, relative
        assert not torch.allclose(softmax(x), laplace(x))


# ------------------------------------------------------------------ layout and config


def test_state_dict_names_match_fairseq():
    cfg = MegaConfig(d_model=16, d_ffn=24, z_dim=8, hidden_dim=32, ndim=4, max_positions=64)
    shapes = {k: tuple(v.shape) for k, v in MegaBlock(cfg).state_dict().items()}
    d, s, e, n = 16, 8, 32, 4
    expected = {  # MegaSentenceEncoderLayer(...).state_dict(), bidirectional EMA, simple bias
        "mega_layer.norm.norm.weight": (d,),
        "mega_layer.norm.norm.bias": (d,),
        "mega_layer.move.delta": (2 * d, n, 1),
        "mega_layer.move.alpha": (2 * d, n, 1),
        "mega_layer.move.beta": (2 * d, n, 1),
        "mega_layer.move.gamma": (2 * d, n),
        "mega_layer.move.omega": (d,),
        "mega_layer.v_proj.weight": (e, d),
        "mega_layer.v_proj.bias": (e,),
        "mega_layer.mx_proj.weight": (s + e + 2 * d, d),
        "mega_layer.mx_proj.bias": (s + e + 2 * d,),
        "mega_layer.h_proj.weight": (d, e),
        "mega_layer.h_proj.bias": (d,),
        "mega_layer.gamma": (2, s),
        "mega_layer.beta": (2, s),
        "mega_layer.rel_pos_bias.rel_pos_bias": (2 * 64 - 1,),
        "nffn.norm.norm.weight": (d,),
        "nffn.norm.norm.bias": (d,),
        "nffn.fc1.weight": (24, d),
        "nffn.fc1.bias": (24,),
        "nffn.fc2.weight": (d, 24),
        "nffn.fc2.bias": (d,),
    }
    assert shapes == expected


def test_config_defaults_and_errors():
    chunk_cfg = REGISTRY.get("mega_chunk").make_config()
    assert chunk_cfg.chunk_size == 128 and REGISTRY.get("mega").make_config().chunk_size == -1
    assert chunk_cfg.resolved_z_dim() == 64 and chunk_cfg.resolved_hidden_dim() == 256
    for bad in ({"attn_fn": "relu"}, {"chunk_size": 0}, {"z_dim": -2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            chunk_cfg.replace(**bad)
    with pytest.raises(ValueError, match="init"):
        REGISTRY.get("s4d").make_config().replace(init="legs")
    model = REGISTRY.get("mega").build(d_model=16, d_ffn=0, max_positions=32, n_layers=1)
    with pytest.raises(ValueError, match="max_positions=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_s4d_block_is_example_py_post_norm_without_ffn():
    torch.manual_seed(0)
    model = REGISTRY.get("s4d").build(d_model=16, d_ffn=0, n_layers=1, head="lm").double()
    block = model.blocks[0]
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    expected = block.norm(x + block.output(block.layer(x)))  # example.py, prenorm=False
    torch.testing.assert_close(block(x), expected)
    assert model.backend == "ssm-fft" and not block.layer.bidirectional


# ------------------------------------------------------------------ GPU (run by the lead)


@requires_cuda
@pytest.mark.parametrize("head", ["cls", "lm"])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_chunked_equals_reference_on_cuda(attn_fn: str, head: str):
    layer = mega_layer(head, attn_fn, chunk_size=64).float().cuda()
    x = torch.randn(2, 300, SMALL["d_model"], device="cuda")
    do = torch.randn_like(x)
    ref = run_with_grads(layer, x, do, reference=True)
    chunked = run_with_grads(layer, x, do, reference=False)
    for name, value in ref.items():
        assert_close(name, value, chunked[name], 1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(layer(x)).all()


def test_a_length_sweep_raises_the_full_paths_position_table_unless_it_was_set():
    """The scaling preset runs Mega's full path to 64K: its relative-bias table grows to each
    cell's L (an oom row, not a max_positions error); cells that fit keep their config (and
    store keys); a max_positions the user set is kept, so the error stays theirs."""
    from harness.runner import plan_shapes

    shapes = [(4096, 1), (16384, 1)]
    default, longer = plan_shapes([REGISTRY.get("mega")], shapes, "cpu", "fp32", {}, 1, 1, 0)
    assert default.model_config.max_positions == 8192
    assert longer.model_config.max_positions == 16384
    assert default.model_config is not longer.model_config
    chunked = plan_shapes([REGISTRY.get("mega_chunk")], shapes, "cpu", "fp32", {}, 1, 1, 0)
    assert {c.model_config.max_positions for c in chunked} == {8192}  # its bias is per chunk
    fixed = plan_shapes([REGISTRY.get("mega")], shapes, "cpu", "fp32", {"max_positions": 4096},
                        1, 1, 0)
    assert {c.model_config.max_positions for c in fixed} == {4096}
