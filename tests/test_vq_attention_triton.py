"""Triton VQ attention (models/vq_attention/triton.py) against the quadratic oracle: outputs and
the gradients wrt q, k (straight-through), v and the bias, with a random upstream gradient.

(a) CPU: the kernels run under Triton's interpreter at tiny sizes, 16-wide tiles
    (``INTERPRETER_META``), 16-wide value tiles and small chunks, so that queries cross tiles,
    chunks and the cache. TRITON_INTERPRET=1 must be set before triton is first imported (its
    own jit helpers, e.g. tl.zeros, are decorated then), so every case runs in ONE subprocess
    (``python -m tests.test_vq_attention_triton``) whose errors the tests read. Skipped when
    triton does not import. (bf16 cannot be checked there: the interpreter's bf16 dots are
    wrong, so bf16 is covered on CUDA only.)
(b) CUDA (skipped without it): causal x attn_fn x dtype in full, S, D, Dv, W, chunk, bias and
    key_grad from a covering set of shapes (W = 0 in a test of its own); tolerances per dtype
    (``TOL``). Autotuning is off there (one config, to bound compile time) except in
    ``test_autotuned_matches_naive``.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from models.vq_attention import vq_attention, vq_attention_naive
from tests import triton_interpreter
from tests.conftest import assert_close, requires_cuda

HAVE_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")

# relative error (norm) vs the float64 oracle: float32 runs 3xTF32 dots (~fp32); bf16 rounds the
# weights before the value products and stores O / gradients in bf16
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
INTERPRETER_TOL = 2e-5


def make_case(batch, heads, length, dim, value_dim, size, window, attn_fn, use_bias, seed=0,
              shared_codebook=False, device="cpu"):
    """float64 leaves and codebook; code size - 1 is never used (an absent code)."""
    gen = torch.Generator().manual_seed(seed)
    q_scale = length / dim**0.5 if attn_fn == "laplace" else 1.0  # Mega divides logits by ~L
    codes = torch.randint(0, size - 1, (batch, heads, length), generator=gen)
    leaves = {
        "q": torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64) * q_scale,
        "k": torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64),
        "v": torch.randn(batch, heads, length, value_dim, generator=gen, dtype=torch.float64),
    }
    if use_bias:
        leaves["bias"] = torch.randn(2 * window - 1, generator=gen, dtype=torch.float64)
    codebook = torch.randn(1 if shared_codebook else heads, size, dim, generator=gen,
                           dtype=torch.float64)
    grad_out = torch.randn(batch, heads, length, value_dim, generator=gen, dtype=torch.float64)
    move = {name: x.to(device) for name, x in leaves.items()}
    return move, codebook.to(device), codes.to(device), grad_out.to(device)


def run(fn, leaves, codebook, codes, grad_out, dtype, **options):
    """Output and gradients wrt q, k (through k_hat = codebook[codes] + k - sg(k)), v, bias, with
    every input rounded to ``dtype`` first (the oracle then sees the same values)."""
    inputs = {name: x.detach().to(dtype).requires_grad_() for name, x in leaves.items()}
    book = codebook.to(dtype)
    heads = torch.arange(codes.shape[1], device=codes.device)[None, :, None]
    head_index = heads if book.shape[0] > 1 else torch.zeros_like(heads)
    k_hat = book[head_index, codes] + (inputs["k"] - inputs["k"].detach())
    out = fn(inputs["q"], k_hat, inputs["v"], book, codes, inputs.get("bias"), **options)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out.to(out.dtype))
    return out, dict(zip(inputs, grads, strict=True))


def relative_errors(triton_fn, leaves, codebook, codes, grad_out, dtype, triton_options=None,
                    **options) -> dict[str, float]:
    """||ref - x|| / ||ref|| of the output and each gradient: the Triton op on ``dtype`` inputs
    vs the float64 oracle on the same (rounded) values."""
    rounded = {name: x.to(dtype).double() for name, x in leaves.items()}
    ref_o, ref_g = run(vq_attention_naive, rounded, codebook.to(dtype).double(), codes,
                       grad_out, torch.float64, **options)
    out, grads = run(triton_fn, leaves, codebook, codes, grad_out, dtype,
                     **options, **(triton_options or {}))
    pairs = {"o": (ref_o, out), **{f"d{name}": (ref_g[name], grads[name]) for name in ref_g}}
    errors = {}
    for name, (ref, other) in pairs.items():
        assert other.dtype == dtype, name
        ref, other = ref.double(), other.double()
        finite = bool(torch.isfinite(other).all())
        errors[name] = ((ref - other).norm() / ref.norm().clamp_min(1e-12)).item() if finite \
            else float("inf")
    return errors


def compare(triton_fn, leaves, codebook, codes, grad_out, dtype, tol, triton_options=None,
            **options):
    errors = relative_errors(triton_fn, leaves, codebook, codes, grad_out, dtype,
                             triton_options, **options)
    print(errors)
    for name, error in errors.items():
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol}"


# ------------------------------------------------------------------------ (a) CPU interpreter

# (attn_fn, causal, bias, key_grad, strategy, window, length, chunk, value_dim): every mode
# ("past", "far" with and without bias, "all"), both key-gradient semantics and both far-key
# strategies, chunks of 1-3 windows and tiles (16) that do not align with them, L < W, W = 0,
# and Dv = 40: three value tiles of 16 (the last one partial)
INTERPRETER_CASES = [
    ("softmax", True, True, "ste", "dense", 8, 45, 16, 40),
    ("softmax", True, True, "ste", "codes", 5, 37, 15, 16),
    ("laplace", True, False, "window", "auto", 8, 45, 24, 16),
    ("softmax", False, True, "window", "auto", 5, 37, 10, 40),
    ("laplace", False, True, "ste", "dense", 8, 45, 16, 16),
    ("softmax", False, False, "ste", "dense", 8, 45, 8, 16),
    # "all" with three value tiles: value tile 0's programs loop over every query for dk
    ("softmax", False, False, "ste", "dense", 8, 45, 16, 40),
    ("laplace", False, False, "ste", "codes", 8, 45, 16, 40),
    ("softmax", False, False, "window", "auto", 8, 45, 16, 16),
    ("laplace", True, True, "ste", "dense", 16, 5, 16, 16),
    # "split": the far query rows in their own kernel, over 3 slices of query chunks
    ("softmax", True, True, "ste", "split", 8, 45, 16, 40),
    ("laplace", True, False, "ste", "split", 5, 37, 10, 16),
    ("softmax", False, True, "ste", "split", 5, 37, 10, 16),
    ("laplace", False, False, "ste", "split", 8, 45, 8, 40),
    # chunks of 4 windows, two query tiles each: band tiles away from the diagonal (no bias
    # gather) and, key_grad="window", dk/dv query tiles outside the local blocks (no dk work)
    ("softmax", True, True, "window", "auto", 8, 45, 32, 16),
    ("laplace", False, True, "window", "auto", 8, 45, 32, 40),
    # W = 0, no local part (run as W = 1): causal chunks of any size, bidirectional "all"
    ("softmax", True, False, "ste", "split", 0, 45, 16, 40),
    ("laplace", True, False, "ste", "codes", 0, 37, 5, 16),
    ("softmax", False, False, "ste", "dense", 0, 37, 16, 16),
]
STABLE_CASES = [True, False]  # causal: large logits (q x 100) and a bias of -20 (softmax)


def _case_id(case) -> str:
    return "-".join(str(x) for x in case)


def _interpreter_case(fn, case) -> dict[str, float]:
    attn_fn, causal, use_bias, key_grad, strategy, window, length, chunk, value_dim = case
    leaves, codebook, codes, grad_out = make_case(1, 2, length, 16, value_dim, 19, window,
                                                  attn_fn, use_bias,
                                                  shared_codebook=length < window)
    return relative_errors(fn, leaves, codebook, codes, grad_out, torch.float32,
                           {"chunk": chunk, "key_grad_strategy": strategy}, attn_fn=attn_fn,
                           causal=causal, window=window, key_grad=key_grad)  # fmt: skip


def _stable_case(fn, causal) -> dict[str, float]:
    leaves, codebook, codes, grad_out = make_case(1, 2, 40, 16, 16, 11, 8, "softmax", True, 3)
    leaves["q"] = leaves["q"] * 100.0
    leaves["bias"] = torch.full_like(leaves["bias"], -20.0)
    return relative_errors(fn, leaves, codebook, codes, grad_out, torch.float32, {"chunk": 16},
                           attn_fn="softmax", causal=causal, window=8)


# (mode, segments, chunk): the code cache alone, each pass over the keys split into segments
# (causal: each starts from the totals of the ones before; "far" and "all": the totals over all
# keys, in pieces); W = 8. L = 45, CH = 16: 3 entries of one 16-key tile (the interpreter's
# BLOCK_N); L = 100, CH = 40: 3 entries of three tiles, the last one partial, none aligned to
# the chunk start c CH - W (the causal walk is one loop over entries and their tiles)
CACHE_CASES = [("past", 1, 16), ("past", 2, 16), ("past", 3, 16), ("far", 2, 16),
               ("far", 3, 16), ("all", 1, 16), ("all", 5, 16), ("past", 1, 40),
               ("past", 2, 40), ("far", 2, 40)]
CACHE_LENGTH = {16: 45, 40: 100}


def _cache_id(case) -> str:
    mode, segments, chunk = case
    return f"cache-{mode}-{segments}" + ("" if chunk == 16 else f"-ch{chunk}")


def _cache_case(_fn, case) -> dict[str, float]:
    """``_code_cache`` vs per-code sums in float64 over each entry's keys (j < c CH - W, also
    j >= (c + 1) CH + W for "far", every key for "all"). "far" subtracts the band from the
    totals: where no key of a code lies outside the band its sum must be exactly 0 ("absent")."""
    from models.vq_attention.triton import _code_cache, _Spec

    mode, segments, chunk = case
    length, window, size, value_dim = CACHE_LENGTH[chunk], 8, 19, 40
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(2, length, value_dim, generator=gen)
    codes = torch.randint(0, size, (2, length), generator=gen, dtype=torch.int32)
    spec = _Spec(batch_heads=2, heads=2, length=length, dim=16, value_dim=value_dim, size=size,
                 window=window, chunk=chunk, attn_fn="softmax", causal=mode == "past",
                 mode=mode, has_bias=True, key_grad="window", strategy="auto",
                 cb_per_head=0)
    u, counts = _code_cache(spec, v, codes, torch.float32, segments=segments)
    one_hot = torch.nn.functional.one_hot(codes.long(), size).double()  # (BH, L, S)
    j = torch.arange(length)
    keys = [torch.ones(length, dtype=torch.bool)] if mode == "all" else [
        (j < c * chunk - window) | ((j >= (c + 1) * chunk + window) & (mode == "far"))
        for c in range(-(-length // chunk))]
    ref_u = torch.stack([torch.einsum("bjs,bjd->bsd", one_hot * m[:, None], v.double())
                         for m in keys], 1)
    ref_n = torch.stack([(one_hot * m[:, None]).sum(1) for m in keys], 1)
    errors = {name: ((ref - x.double()).norm() / ref.norm()).item()
              for name, ref, x in (("u", ref_u, u), ("counts", ref_n, counts))}
    absent = ref_n == 0
    assert mode == "all" or bool(absent.any()), "the case must hold codes absent from an entry"
    errors["absent"] = u[absent].abs().max().item() if absent.any() else 0.0
    return errors


# segments: the exclusive suffix scan of the backward's cache, each row split into segments that
# start from the totals of the ones after them; 7 entries of 40 floats
SCAN_CASES = [1, 2, 3, 4, 7]


def _scan_case(_fn, segments) -> dict[str, float]:
    """``_scan_into`` vs float64 sums: out[e] = sum_{e' > e} x[e'] (e = 0..n), written at entry
    offset ``first`` of a larger buffer whose other entries stay untouched."""
    from models.vq_attention.triton import _scan_into

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 5, 8, generator=gen)
    out = torch.full((2, 10, 5, 8), 123.0)
    _scan_into(out, 1, x, segments=segments)
    xd = x.double()
    zero = torch.zeros_like(xd[:, :1])
    # suffix sums after e: out[e] = total - inclusive prefix through e
    ref = torch.cat([xd.sum(1, keepdim=True) - xd.cumsum(1), zero], 1)
    untouched = torch.cat([out[:, :1], out[:, 9:]], 1)
    return {"scan": ((ref - out[:, 1:9].double()).norm() / ref.norm()).item(),
            "untouched": (untouched - 123.0).abs().max().item()}


# the op compiled (one graph, fullgraph=True: no graph break; the custom ops) against the op run
# eagerly (its autograd.Function), a causal, a bidirectional "far" and an "all" case: the same
# kernels (max abs differences)
COMPILED_CASES = [INTERPRETER_CASES[1], INTERPRETER_CASES[15], INTERPRETER_CASES[13]]


def _compiled_case(fn, case) -> dict[str, float]:
    attn_fn, causal, use_bias, key_grad, strategy, window, length, chunk, value_dim = case
    leaves, codebook, codes, grad_out = make_case(1, 2, length, 16, value_dim, 19, window,
                                                  attn_fn, use_bias)
    options = dict(attn_fn=attn_fn, causal=causal, window=window, key_grad=key_grad,
                   chunk=chunk, key_grad_strategy=strategy)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager_out, eager_grads = run(fn, leaves, codebook, codes, grad_out, torch.float32, **options)
    out, grads = run(compiled, leaves, codebook, codes, grad_out, torch.float32, **options)
    torch._dynamo.reset()
    return {"o": (out - eager_out).abs().max().item(),
            **{f"d{n}": (grads[n] - eager_grads[n]).abs().max().item() for n in grads}}


# the two custom ops through torch.library.opcheck (schema, autograd registration, fake
# tensors, AOT dispatch with dynamic shapes): (attn_fn, causal, bias, key_grad, strategy), one
# per cache mode: "past", "far", "all"
OPCHECK_CASES = [("softmax", True, True, "ste", "codes"),
                 ("laplace", False, False, "window", "split"),
                 ("softmax", False, False, "ste", "split")]


def opcheck_ops(case, device: str = "cpu", dtype: torch.dtype = torch.float32,
                length: int = 37, window: int = 5, chunk: int = 10) -> None:
    """torch.library.opcheck of the forward op, then of the backward op on its results."""
    from models.vq_attention.triton import _bwd_op, _fwd_op

    attn_fn, causal, use_bias, key_grad, strategy = case
    gen = torch.Generator().manual_seed(0)
    bh, dim, size = 2, 16, 19

    def randn(*shape, x_dtype=dtype):
        return torch.randn(*shape, generator=gen).to(device, x_dtype).requires_grad_()

    q, k, v = randn(bh, length, dim), randn(bh, length, dim), randn(bh, length, 16)
    codebook = torch.randn(2, size, dim, generator=gen).to(device, dtype)
    codes = torch.randint(0, size, (bh, length), generator=gen, dtype=torch.int32).to(device)
    bias = randn(2 * window - 1, x_dtype=torch.float32) if use_bias else None
    params = (2, attn_fn, causal, window, key_grad, strategy, chunk)
    torch.library.opcheck(_fwd_op, (q, k, v, codebook, codes, bias, *params))
    detached = [None if x is None else x.detach() for x in (q, k, v, codebook, codes, bias)]
    saved = _fwd_op(*detached, *params)
    grad_out = torch.randn(saved[0].shape, generator=gen).to(device, dtype)
    torch.library.opcheck(_bwd_op, (grad_out, *detached, *saved, *params))


def _opcheck_case(_fn, case) -> dict[str, float]:
    opcheck_ops(case)
    return {}


# (model, its overrides): small widths keep the interpreter's tiles few
MODEL_CASES = {"longvq": {"z_dim": 16, "v_dim": 16}, "transformer_vq": {}}


def _model_case(_fn, model: str) -> dict[str, float]:
    """A model on the Triton op, compiled (aot_eager): a training step gives the eager model's
    loss, gradients and buffers (the codebooks after their data init; the EMA step's deferral is
    tested without the interpreter), and dynamo makes one graph of the blocks (the codebook
    snapshot and update run before and after it); "graphs" is the number of extra graphs,
    "op_outside" whether the op missed the graph. (One step at L = 20: each launch of the
    interpreter runs every program of a 128-query chunk.)"""
    from torch._dynamo.backends.debugging import aot_eager

    from harness.backbone import task_loss
    from harness.registry import REGISTRY

    entry = REGISTRY.get(model)
    config = entry.make_config(d_model=32, n_layers=2, n_heads=2, d_ffn=64, window=8,
                               codebook_size=8, attn_impl="triton", key_grad="window",
                               **MODEL_CASES[model])
    graphs: list[str] = []

    def record(gm, inputs):
        graphs.append(str(gm.graph))
        return aot_eager(gm, inputs)

    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        net = entry.build(config).train()
        torch._dynamo.reset()
        forward = torch.compile(net, backend=record) if compiled else net
        torch.manual_seed(10)  # the codebooks' data init samples keys
        x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
        loss = task_loss(net, forward(x), torch.zeros(2, dtype=torch.long))
        loss.backward()
        runs[compiled] = (loss.detach(), [p.grad for p in net.parameters()],
                          list(net.state_dict().values()))
    torch._dynamo.reset()

    def max_diff(a, b):
        return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))

    (loss_e, grads_e, state_e), (loss_c, grads_c, state_c) = runs[False], runs[True]
    return {"loss": (loss_c - loss_e).abs().max().item(), "grads": max_diff(grads_c, grads_e),
            "buffers": max_diff(state_c, state_e), "graphs": len(graphs) - 1.0,
            "op_outside": float(not any("vq_attention_fwd" in g for g in graphs))}


def _lean_case(_fn, _case) -> dict[str, float]:
    """LongVQ on the Triton op compiled with the min-cut partitioner (inductor's) under
    ``activation_memory_budget=0.5`` through the harness (``with_memory_budget``): the op's
    forward runs once, in the forward graph; the budget must not make the backward re-run it.
    "recomputed": its calls in the backward graph; "missing": 1 if the forward lacks it."""
    from harness.measure import with_memory_budget
    from tests.test_memory_budget import partitioned_graphs

    graphs = partitioned_graphs(lambda compiled: with_memory_budget(compiled, 0.5),
                                attn_impl="triton")
    return {"recomputed": float(sum(g.count("vq_attention_fwd") for g in graphs["backward"])),
            "missing": float(not any("vq_attention_fwd" in g for g in graphs["forward"]))}


def _interpreter_main() -> None:
    """``TRITON_INTERPRET=1 python -m tests.test_vq_attention_triton``: every interpreter case,
    one JSON line of relative errors (or the traceback) per case id."""
    triton_interpreter.patch_interpreter()  # before the kernels' module imports triton
    from models.vq_attention.triton import vq_attention_triton

    jobs = {**{_case_id(c): (_interpreter_case, c) for c in INTERPRETER_CASES},
            **{f"stable-{c}": (_stable_case, c) for c in STABLE_CASES},
            **{_cache_id(c): (_cache_case, c) for c in CACHE_CASES},
            **{f"scan-{c}": (_scan_case, c) for c in SCAN_CASES},
            **{f"compiled-{_case_id(c)}": (_compiled_case, c) for c in COMPILED_CASES},
            **{f"opcheck-{_case_id(c)}": (_opcheck_case, c) for c in OPCHECK_CASES},
            **{f"model-{m}": (_model_case, m) for m in MODEL_CASES},
            "model-lean": (_lean_case, None)}
    triton_interpreter.run_cases({case_id: functools.partial(runner, vq_attention_triton, case)
                                  for case_id, (runner, case) in jobs.items()})


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return triton_interpreter.interpreter_results("tests.test_vq_attention_triton", timeout=900)


check_interpreter_result = triton_interpreter.check_result


@requires_triton
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=_case_id)
def test_interpreter_matches_naive(interpreter_results, case):
    check_interpreter_result(interpreter_results, _case_id(case), INTERPRETER_TOL)


@requires_triton
@pytest.mark.parametrize("case", CACHE_CASES, ids=_cache_id)
def test_interpreter_code_cache_segments(interpreter_results, case):
    check_interpreter_result(interpreter_results, _cache_id(case), 1e-6)


@requires_triton
@pytest.mark.parametrize("segments", SCAN_CASES, ids=lambda c: f"seg{c}")
def test_interpreter_scan_segments(interpreter_results, segments):
    check_interpreter_result(interpreter_results, f"scan-{segments}", 1e-6)


@requires_triton
@pytest.mark.parametrize("causal", STABLE_CASES)
def test_interpreter_softmax_stable(interpreter_results, causal):
    """Large logits (q x 100) and a bias of -20 over the window: finite and exact in float32."""
    check_interpreter_result(interpreter_results, f"stable-{causal}", 1e-4)


@requires_triton
@pytest.mark.parametrize("case", COMPILED_CASES, ids=_case_id)
def test_interpreter_compiled_op_is_one_graph_and_matches_eager(interpreter_results, case):
    """torch.compile(fullgraph=True) traces the op without a graph break (two custom ops with
    their autograd formula) and gives the eager op's output and gradients."""
    check_interpreter_result(interpreter_results, f"compiled-{_case_id(case)}", 1e-6)


@requires_triton
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=_case_id)
def test_interpreter_custom_ops_pass_opcheck(interpreter_results, case):
    check_interpreter_result(interpreter_results, f"opcheck-{_case_id(case)}", 0.0)


@requires_triton
@pytest.mark.parametrize("model", MODEL_CASES)
def test_interpreter_compiled_model_is_one_graph(interpreter_results, model):
    check_interpreter_result(interpreter_results, f"model-{model}", 1e-6)


@requires_triton
def test_interpreter_memory_budget_does_not_recompute_the_op(interpreter_results):
    check_interpreter_result(interpreter_results, "model-lean", 0.0)


@requires_triton
def test_argument_errors(monkeypatch):
    from models.vq_attention.triton import vq_attention_triton

    leaves, codebook, codes, _ = make_case(1, 2, 20, 16, 16, 7, 4, "softmax", True)
    q, k, v, bias = (leaves[n].float() for n in ("q", "k", "v", "bias"))
    options = dict(attn_fn="softmax", causal=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        vq_attention_triton(q, k, v, codebook.float(), codes, bias, window=4, **options)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to the argument checks
    with pytest.raises(ValueError, match="chunk"):
        vq_attention_triton(q, k, v, codebook.float(), codes, bias, window=4, chunk=6, **options)
    with pytest.raises(ValueError, match="float64"):
        vq_attention_triton(q.double(), k, v, codebook, codes, bias, window=4, **options)
    # W = 0 takes no bias and no key_grad="window", as in linear and naive
    with pytest.raises(ValueError, match="window=0 has no local part"):
        vq_attention_triton(q, k, v, codebook.float(), codes, bias[:0], window=0, **options)
    with pytest.raises(ValueError, match="key_grad='ste'"):
        vq_attention_triton(q, k, v, codebook.float(), codes, None, window=0, key_grad="window",
                            **options)  # fmt: skip
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        vq_attention_triton(q, k, v, codebook.float(), codes, None, window=-2, **options)
    with pytest.raises(ValueError, match="key_grad_strategy"):
        vq_attention_triton(q, k, v, codebook.float(), codes, bias, window=4,
                            key_grad_strategy="fast", **options)  # fmt: skip


def test_auto_resolves_to_linear_on_cpu():
    from models.vq_attention import resolve_impl

    assert resolve_impl("auto", torch.zeros(1)) == "linear"
    assert resolve_impl("naive", torch.zeros(1)) == "naive"
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("fast", torch.zeros(1))


# ------------------------------------------------------------------------ (b) CUDA

# (size S, dim D, value dim Dv, window W, chunk or None (default), bias, key_grad, length)
SHAPES = [
    (64, 32, 32, 64, 64, True, "ste", 2 * 64 + 7),
    (256, 64, 192, 128, None, True, "window", 257),  # Dv = 192: two value tiles
    (1024, 128, 128, 256, 256, False, "ste", 2 * 256 + 7),
    (128, 64, 32, 64, 128, False, "window", 257),
]
# each (attn_fn, causal, dtype) gets 2 shapes; every attn_fn, causal and dtype meets all 4
GRID = [
    pytest.param(attn_fn, causal, dtype, SHAPES[(a + c + d + 2 * rep) % 4],
                 id=f"{attn_fn}-{'causal' if causal else 'bidir'}-{str(dtype)[6:]}-"
                    f"shape{(a + c + d + 2 * rep) % 4}")
    for a, attn_fn in enumerate(("softmax", "laplace"))
    for c, causal in enumerate((True, False))
    for d, dtype in enumerate((torch.float32, torch.bfloat16))
    for rep in (0, 1)
]


@pytest.fixture
def one_config(monkeypatch):
    monkeypatch.setenv("LONGVQ_TRITON_AUTOTUNE", "0")


@requires_triton
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("attn_fn", "causal", "dtype", "shape"), GRID)
def test_cuda_matches_naive(one_config, attn_fn, causal, dtype, shape):
    from models.vq_attention.triton import vq_attention_triton

    size, dim, value_dim, window, chunk, use_bias, key_grad, length = shape
    leaves, codebook, codes, grad_out = make_case(2, 2, length, dim, value_dim, size, window,
                                                  attn_fn, use_bias, seed=1, device="cuda")
    compare(vq_attention_triton, leaves, codebook, codes, grad_out, dtype, TOL[dtype],
            {"chunk": chunk}, attn_fn=attn_fn, causal=causal, window=window, key_grad=key_grad)


@requires_triton
@pytest.mark.parametrize(("programs", "per_sm", "segments"), [
    (256, 1, 1), (256, 8, 1), (131, 2, 3), (16, 2, 17), (16, 8, 66)])
def test_walks_split_only_below_one_program_per_sm(monkeypatch, programs, per_sm, segments):
    """``_fill_segments`` on a 132-SM GPU: programs that fill the SMs walk in one segment
    (splitting on was slower, session 19); fewer are split to ``per_sm`` programs per SM, never
    past n_units."""
    from models.vq_attention import triton as vq_triton

    monkeypatch.setattr(vq_triton, "_sms", lambda device: 132)
    assert vq_triton._fill_segments(programs, 256, per_sm, torch.device("cpu")) == segments
    assert vq_triton._fill_segments(programs, 3, per_sm, torch.device("cpu")) == min(3, segments)


@requires_triton
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("case", "dtype"), [
    (("softmax", False, True, "window", "auto"), torch.bfloat16),  # LongVQ's (Text-4K)
    (("laplace", True, False, "ste", "split"), torch.float32),
])
def test_cuda_custom_ops_pass_opcheck(one_config, case, dtype):
    """The custom ops on CUDA tensors: the fake outputs (what inductor plans with) match the
    real ones in shape, stride and dtype (the bf16 code cache included)."""
    opcheck_ops(case, "cuda", dtype, length=300, window=64, chunk=128)


@requires_triton
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("attn_fn", ["softmax", "laplace"])
def test_cuda_no_window_matches_naive(one_config, attn_fn, causal, dtype):
    """W = 0 (no local part: no bias, key_grad="ste"), the grid's last window, at S = 512."""
    from models.vq_attention.triton import vq_attention_triton

    leaves, codebook, codes, grad_out = make_case(2, 2, 300, 64, 64, 512, 0, attn_fn, False,
                                                  seed=2, device="cuda")
    compare(vq_attention_triton, leaves, codebook, codes, grad_out, dtype, TOL[dtype],
            attn_fn=attn_fn, causal=causal, window=0)


@requires_triton
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["codes", "split"])
@pytest.mark.parametrize(("attn_fn", "causal", "use_bias"), [("softmax", True, True),
                                                             ("laplace", False, True),
                                                             ("softmax", False, False)])
def test_cuda_far_key_strategies_and_shared_codebook(one_config, strategy, attn_fn, causal,
                                                     use_bias):
    """key_grad="ste" with the far-key gradient from torch per-code states ("codes") or from the
    far-row Triton kernel over 5 slices of query chunks ("split"); one codebook for all heads."""
    from models.vq_attention.triton import vq_attention_triton

    leaves, codebook, codes, grad_out = make_case(2, 3, 300, 64, 64, 96, 32, attn_fn, use_bias,
                                                  seed=2, shared_codebook=True, device="cuda")
    compare(vq_attention_triton, leaves, codebook, codes, grad_out, torch.float32,
            TOL[torch.float32], {"key_grad_strategy": strategy, "chunk": 64}, attn_fn=attn_fn,
            causal=causal, window=32)  # fmt: skip


@requires_triton
@requires_cuda
@pytest.mark.gpu
def test_autocast_runs_the_kernels_in_autocast_dtype(one_config):
    """float32 q, k_hat, v under bf16 autocast (LongVQ's q and k come from a float32 affine
    map): the kernels read bf16, as for bf16 inputs, and the gradients keep the inputs' dtype."""
    from models.vq_attention.triton import vq_attention_triton

    leaves, codebook, codes, grad_out = make_case(2, 2, 300, 64, 64, 64, 32, "softmax", True,
                                                  seed=4, device="cuda")
    q, k, v = (leaves[name].float().requires_grad_() for name in ("q", "k", "v"))
    book = codebook.float()
    k_hat = torch.stack([book[h][codes[:, h]] for h in range(2)], 1) + (k - k.detach())
    options = dict(attn_fn="softmax", causal=False, window=32, key_grad="window")
    bias = leaves["bias"].float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = vq_attention_triton(q, k_hat, v, book, codes, bias, **options)
    ref = vq_attention_triton(q.bfloat16(), k_hat.bfloat16(), v.bfloat16(), book.bfloat16(),
                              codes, bias, **options)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grads = torch.autograd.grad(out, [q, k, v], grad_out.to(out.dtype))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@requires_triton
@requires_cuda
@pytest.mark.gpu
def test_autotuned_matches_naive(monkeypatch):
    """The autotuner's configs compile and agree (bf16, LongVQ-like S = 256, W = 64)."""
    from models.vq_attention.triton import vq_attention_triton

    monkeypatch.setenv("LONGVQ_TRITON_AUTOTUNE", "1")

    leaves, codebook, codes, grad_out = make_case(2, 2, 2048, 64, 64, 256, 64, "softmax", True,
                                                  seed=3, device="cuda")
    for strategy in ("dense", "split"):  # split: dk_far restores dk between autotune trials
        compare(vq_attention_triton, leaves, codebook, codes, grad_out, torch.bfloat16,
                TOL[torch.bfloat16], {"key_grad_strategy": strategy}, attn_fn="softmax",
                causal=True, window=64)


def _every_config() -> list:
    """(kernel, config index) for every autotune config of every kernel: the autotuner keeps
    whichever is fastest, so each must be right on its own (tile sizes, warps and stages)."""
    if not HAVE_TRITON:
        return []
    from models.vq_attention.triton import CONFIGS

    return [pytest.param(name, i, id=f"{name}-{i}") for name, configs in CONFIGS.items()
            for i in range(len(configs))]


@requires_triton
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "index"), _every_config())
def test_cuda_every_config_matches_naive(monkeypatch, kernel, index):
    """Kernel ``kernel`` run with its config ``index`` alone (the others with their default),
    bf16 (pipelined: the fp32 default path drops to one stage), S = 256, W = 64, CH = 128, causal
    and bidirectional, key_grad="ste" split (so the far-row dk kernel runs), B H = 4 (the sums
    run in segments); Dv = 64, and for the forward also 256."""
    from models.vq_attention import triton as vq_triton

    monkeypatch.setenv("LONGVQ_TRITON_AUTOTUNE", "0")
    monkeypatch.setitem(vq_triton.CONFIGS, kernel, [vq_triton.CONFIGS[kernel][index]])
    # the forward also at Dv = 256: one bf16 value tile of 256 (LongVQ's), others two of 128
    for value_dim in (64, 256) if kernel == "fwd" else (64,):
        leaves, codebook, codes, grad_out = make_case(2, 2, 600, 64, value_dim, 256, 64,
                                                      "softmax", True, seed=5, device="cuda")
        for causal in (True, False):
            compare(vq_triton.vq_attention_triton, leaves, codebook, codes, grad_out,
                    torch.bfloat16, TOL[torch.bfloat16], {"key_grad_strategy": "split"},
                    attn_fn="softmax", causal=causal, window=64)


@requires_triton
@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("model", ["longvq", "transformer_vq"])
def test_models_pick_triton_on_cuda(one_config, model):
    """attn_impl=auto runs the Triton op on CUDA (recorded in backend) and computes what
    attn_impl=linear computes; attn_impl=linear forces the torch op."""
    from harness.registry import REGISTRY

    entry = REGISTRY.get(model)
    torch.manual_seed(0)
    config = entry.make_config(d_model=64, n_layers=2, head="lm", window=16, codebook_size=32)
    auto = entry.build(config).cuda().eval()
    linear = entry.build(config.replace(attn_impl="linear")).cuda().eval()
    linear.load_state_dict(auto.state_dict())
    tokens = torch.randint(0, 256, (2, 600), device="cuda")  # 3 chunks of 256: the cache is read
    out_auto, out_linear = auto(tokens), linear(tokens)
    assert auto.backend.endswith("vq-triton") and linear.backend.endswith("vq-linear")
    assert_close("logits", out_linear, out_auto, 1e-3)
    upstream = torch.randn_like(out_auto)
    out_auto.backward(upstream)
    out_linear.backward(upstream)
    linear_params = dict(linear.named_parameters())
    # The key offset's gradient is 0 in exact arithmetic (softmax is unchanged when every key
    # moves by one vector; eval mode: no commitment loss), so both paths give rounding noise
    # (~4e-8 in fp32, ~1e-16 in fp64, where the largest gradient is ~5e3): a gradient is
    # compared on its own scale, floored at 1e-6 of the model's largest one.
    scale = max(p.grad.norm().item() for p in linear.parameters() if p.grad is not None)
    for name, param in auto.named_parameters():
        if param.grad is not None:
            assert_close(name, linear_params[name].grad, param.grad, 2e-3, floor=1e-6 * scale)


def test_dispatch_forces_linear_on_request():
    """impl="auto" on CPU tensors runs the linear op (same values as impl="linear")."""
    leaves, codebook, codes, grad_out = make_case(1, 2, 30, 8, 8, 7, 4, "softmax", True)
    options = dict(attn_fn="softmax", causal=True, window=4)
    auto_o, _ = run(lambda *a, **k: vq_attention(*a, **k, impl="auto"), leaves, codebook, codes,
                    grad_out, torch.float64, **options)
    lin_o, _ = run(lambda *a, **k: vq_attention(*a, **k, impl="linear"), leaves, codebook,
                   codes, grad_out, torch.float64, **options)
    assert torch.equal(auto_o, lin_o)


if __name__ == "__main__":
    _interpreter_main()
