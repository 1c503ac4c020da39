"""S4D's chunked (linear-time) convolution against the FFT convolution: outputs and the
gradients of the input and of every kernel parameter, with a random upstream gradient.

(a) CPU: the torch loop scan (``decayed_scan_ref``), float64, against ``fft_conv_ref`` with
    ``S4D.conv_kernel`` (and that against the recurrence in tests/test_ssm.py).
(b) CPU, Triton interpreter: the scan kernel (forward, reverse, gradients; several tiles and
    mode blocks) and the whole convolution through it, float32 against float64. One subprocess
    (``python -m tests.test_s4d_chunked``), as in tests/test_vq_attention_triton.py.
(c) CUDA (skipped without it): LongVQ's shapes, one and many scan tiles.
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch

from models.fft_conv import fft_conv_ref
from models.s4d_chunked import decayed_scan_ref, s4d_chunked_conv
from models.ssm import S4D, S4D_KERNEL_PARAMS
from tests import triton_interpreter
from tests.conftest import requires_cuda

# the CPU cases run the torch reference scan on purpose
pytestmark = pytest.mark.filterwarnings("ignore:S4D conv='chunked' runs its scan as a torch")
HAVE_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")

# (bidirectional, length, chunk): L < T, L = T, partial last chunk, chunks that do not divide L
CONV_CASES = [(b, length, chunk) for b in (False, True)
              for length, chunk in ((1, None), (5, None), (64, None), (100, None), (300, 16),
                                    (77, 8))]


def _conv_case(bidirectional: bool, length: int, chunk: int | None, dtype: torch.dtype,
               device: str = "cpu", bsz: int = 3, width: int = 6,
               gemm_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Max relative errors of the chunked conv against the FFT conv in float64 (output, du and
    the kernel-parameter gradients), the upstream gradient random."""
    torch.manual_seed(length + bidirectional)
    layer = S4D(width, d_state=16, bidirectional=bidirectional).to(device, dtype)
    kern = layer.kernel
    u = torch.randn(bsz, width, length, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(bsz, width, length, device=device, dtype=dtype)
    leaves = [u, *(kern.get_parameter(n) for n in S4D_KERNEL_PARAMS)]
    ref_layer = copy.deepcopy(layer).double()  # the reference all in float64
    u64 = u.detach().double().requires_grad_()
    ref = fft_conv_ref(u64, ref_layer.conv_kernel(length), 2 * length)
    grads_ref = torch.autograd.grad(
        ref, [u64, *(ref_layer.kernel.get_parameter(n) for n in S4D_KERNEL_PARAMS)], dy.double())
    out = s4d_chunked_conv(u, *leaves[1:], chunk=chunk, gemm_dtype=gemm_dtype)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, leaves, dy)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()

    names = ["out", "u", *S4D_KERNEL_PARAMS]
    return {n: rel(g, w) for n, g, w in zip(names, (out, *grads), (ref, *grads_ref),
                                             strict=True)}


@pytest.mark.parametrize(("bidirectional", "length", "chunk"), CONV_CASES)
def test_chunked_conv_matches_fft(bidirectional: bool, length: int, chunk: int | None) -> None:
    for name, error in _conv_case(bidirectional, length, chunk, torch.float64).items():
        assert error <= 1e-10, f"{name}: relative error {error:.2e}"


# bfloat16 products (autocast): the operands and results carry 8 significant bits, so errors of
# a few bf16 ulps (2^-8 = 3.9e-3) relative to the largest value; measured 1.4e-3 .. 6.1e-3.
BF16_GEMM_TOL = 1.5e-2


@pytest.mark.parametrize(("bidirectional", "length", "chunk"), [(True, 300, 16),
                                                                (False, 1000, None)])
def test_chunked_conv_bf16_products(bidirectional: bool, length: int, chunk: int | None) -> None:
    """float32 in and out, the three products in bfloat16: within bf16's rounding of the
    float64 FFT reference, outputs and every gradient."""
    errors = _conv_case(bidirectional, length, chunk, torch.float32, width=16,
                        gemm_dtype=torch.bfloat16)
    for name, error in errors.items():
        assert error <= BF16_GEMM_TOL, f"{name}: relative error {error:.2e}"


def test_auto_conv_and_autocast_products() -> None:
    """conv="auto" is the FFT off CUDA and below CHUNKED_MIN_LENGTH; under autocast the chunked
    conv's products take the autocast dtype (close to, not equal to, float32) and the FFT
    conv is untouched."""
    from models.ssm import CHUNKED_MIN_LENGTH, resolve_s4d_conv

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for compiled, key in ((False, "eager"), (True, "compiled")):
        threshold = CHUNKED_MIN_LENGTH[key]
        assert resolve_s4d_conv("auto", threshold, cuda, compiled) == "chunked"
        assert resolve_s4d_conv("auto", threshold - 1, cuda, compiled) == "fft"
        assert resolve_s4d_conv("auto", 10 * threshold, cpu, compiled) == "fft"
    assert CHUNKED_MIN_LENGTH["compiled"] < CHUNKED_MIN_LENGTH["eager"]
    assert resolve_s4d_conv("chunked", 8, cpu) == "chunked"
    torch.manual_seed(0)
    u = torch.randn(2, 200, 16)
    for conv in ("fft", "chunked"):
        layer = S4D(16, d_state=16, bidirectional=True, conv=conv)
        plain = layer(u)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(u)
        assert layer.last_conv == conv and mixed.dtype == torch.float32
        error = ((mixed - plain).abs().max() / plain.abs().max()).item()
        if conv == "fft":
            assert error == 0.0
        else:
            assert 0.0 < error <= BF16_GEMM_TOL, error
    assert S4D(4).last_conv == "fft"


def test_auto_conv_knows_it_is_compiled(monkeypatch) -> None:
    """The compiled threshold applies inside torch.compile, the eager one outside."""
    import models.ssm

    seen: list[bool] = []

    def record(conv: str, length: int, device: torch.device, compiled: bool = False) -> str:
        seen.append(compiled)
        return "fft"

    monkeypatch.setattr(models.ssm, "resolve_s4d_conv", record)
    layer = S4D(4, d_state=4)
    u = torch.randn(1, 16, 4)
    seen.clear()
    layer(u)
    torch._dynamo.reset()
    torch.compile(layer, backend="eager")(u)
    torch._dynamo.reset()
    assert seen == [False, True]


@pytest.mark.parametrize("name", ["longvq", "s4d"])
def test_backend_records_the_conv_each_forward_ran(monkeypatch, name: str) -> None:
    """conv="auto" resolves per forward (by length), and so does the model's backend."""
    import models.ssm
    from harness.registry import REGISTRY

    real = models.ssm.resolve_s4d_conv
    monkeypatch.setattr(models.ssm, "resolve_s4d_conv",  # as if on CUDA, threshold 100
                        lambda conv, length, device, compiled=False:
                        ("chunked" if length >= 100 else "fft") if conv == "auto"
                        else real(conv, length, device, compiled))
    entry = REGISTRY.get(name)
    model = entry.build(entry.make_config(d_model=8, n_layers=1, n_heads=2, d_ffn=16))
    assert model.backend.startswith("ssm-fft")  # before any forward: what CPU would run
    for length, conv in ((64, "fft"), (128, "chunked"), (64, "fft")):
        model(torch.randint(0, 100, (1, length)))
        assert model.backend.startswith(f"ssm-{conv}"), (length, model.backend)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_reference_is_the_decayed_sum(reverse: bool) -> None:
    """S_m = sum_{m' < m} a^(m-1-m') s_m' (reverse: m' > m, a^(m'-m-1)), a per row group."""
    gen = torch.Generator().manual_seed(0)
    rows, chunks, nh, group = 4, 6, 3, 2
    s = torch.randn(rows, chunks, 2 * nh, generator=gen, dtype=torch.float64)
    a = torch.randn(rows // group, nh, generator=gen, dtype=torch.complex128) * 0.7
    got = decayed_scan_ref(s, a.real, a.imag, group, reverse=reverse)
    sc = torch.complex(s[..., :nh], s[..., nh:])
    for r in range(rows):
        for m in range(chunks):
            want = torch.zeros(nh, dtype=torch.complex128)
            for m2 in range(chunks):
                gap = m2 - m - 1 if reverse else m - m2 - 1
                if gap >= 0:
                    want += a[r // group] ** gap * sc[r, m2]
            torch.testing.assert_close(torch.complex(got[r, m, :nh], got[r, m, nh:]), want)


def test_s4d_module_chunked_equals_fft() -> None:
    """The module switch: same outputs and gradients (D included) as conv="fft"."""
    torch.manual_seed(0)
    fft = S4D(5, d_state=8, bidirectional=True).double()
    chunked = S4D(5, d_state=8, bidirectional=True, conv="chunked").double()
    chunked.load_state_dict(fft.state_dict())
    u = torch.randn(2, 90, 5, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 90, 5, dtype=torch.float64)
    outs = []
    for layer in (fft, chunked):
        y = layer(u)
        outs.append((y, *torch.autograd.grad(y, [u, *layer.parameters()], dy)))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="'fast'"):
        S4D(5, conv="fast")


# ------------------------------------------------------------------------ (b) CPU interpreter

# (rows, chunks, modes, group): one tile, three tiles (the last partial), two mode blocks (the
# last partial), two chunks
SCAN_CASES = [(6, 5, 3, 2), (4, 150, 40, 4), (3, 64, 32, 1), (2, 2, 5, 1)]
INTERPRETER_CONV_CASES = [(False, 100, None), (True, 300, 16), (True, 77, 8)]


def _scan_case(case) -> dict[str, float]:
    from models.s4d_chunked import _scan_launch, _scan_op

    rows, chunks, nh, group = case
    gen = torch.Generator().manual_seed(rows * chunks)
    s = torch.randn(rows, chunks, 2 * nh, generator=gen, requires_grad=True)
    mag = torch.rand(rows // group, nh, generator=gen) * 0.5 + 0.5
    ang = torch.rand(rows // group, nh, generator=gen) * 6.0
    a_re = (mag * torch.cos(ang)).requires_grad_()
    a_im = (mag * torch.sin(ang)).requires_grad_()
    d = torch.randn(rows, chunks, 2 * nh, generator=gen)
    leaves = (s, a_re, a_im)
    ref = decayed_scan_ref(*(x.double() for x in leaves), group)
    grads_ref = torch.autograd.grad(ref, leaves, d.double())
    out = _scan_op(s, a_re, a_im, group)
    grads = torch.autograd.grad(out, leaves, d)
    back, _ = _scan_launch(s.detach(), a_re.detach(), a_im.detach(), group, reverse=True)
    back_ref = decayed_scan_ref(*(x.detach().double() for x in leaves), group, reverse=True)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()

    return {"out": rel(out, ref), "reverse": rel(back, back_ref),
            **{n: rel(g, w) for n, g, w in zip(("s", "a_re", "a_im"), grads, grads_ref,
                                               strict=True)}}


def _opcheck_case() -> dict[str, float]:
    """torch.library.opcheck of the scan's two custom ops (schema, autograd registration, fake
    tensors, AOT dispatch with dynamic shapes)."""
    from models.s4d_chunked import _scan_backward_op, _scan_op

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(4, 9, 6, generator=gen, requires_grad=True)
    # one decay row for the 4 rows of s: da's two halves are single rows (no aliasing views)
    a_re = (torch.rand(1, 3, generator=gen) * 0.5).requires_grad_()
    a_im = (torch.rand(1, 3, generator=gen) * 0.5).requires_grad_()
    torch.library.opcheck(_scan_op, (s, a_re, a_im, 4))
    out = _scan_op(s.detach(), a_re.detach(), a_im.detach(), 4)
    torch.library.opcheck(_scan_backward_op,
                          (torch.randn(out.shape, generator=gen), out, a_re.detach(),
                           a_im.detach(), 4))
    return {}


def _compiled_conv_case() -> dict[str, float]:
    """The chunked conv compiled with fullgraph=True (the scan is custom ops: no graph break)
    against the conv run eagerly: max abs differences of the output and gradients."""
    torch.manual_seed(0)
    layer = S4D(6, d_state=16, bidirectional=True)
    u = torch.randn(2, 6, 150, requires_grad=True)
    params = [layer.kernel.get_parameter(n) for n in S4D_KERNEL_PARAMS]

    def conv(x):
        return s4d_chunked_conv(x, *params, chunk=16)

    dy = torch.randn(2, 6, 150)
    torch._dynamo.reset()
    results = []
    for fn in (conv, torch.compile(conv, backend="aot_eager", fullgraph=True)):
        out = fn(u)
        results.append((out, *torch.autograd.grad(out, [u, *params], dy)))
    torch._dynamo.reset()
    return {f"d{i}": (a - b).abs().max().item()
            for i, (a, b) in enumerate(zip(*results, strict=True))}


def _interpreter_main() -> None:
    """``TRITON_INTERPRET=1 python -m tests.test_s4d_chunked``: one JSON line of errors."""
    jobs = {**{f"scan-{c}": functools.partial(_scan_case, c) for c in SCAN_CASES},
            **{f"conv-{c}": functools.partial(_conv_case, *c, torch.float32)
               for c in INTERPRETER_CONV_CASES},
            "opcheck": _opcheck_case, "compiled-conv": _compiled_conv_case}
    triton_interpreter.run_cases(jobs)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    return triton_interpreter.interpreter_results("tests.test_s4d_chunked", timeout=600)


@requires_triton
@pytest.mark.parametrize("case", SCAN_CASES, ids=str)
def test_interpreter_scan_kernel(interpreter_results, case) -> None:
    triton_interpreter.check_result(interpreter_results, f"scan-{case}", 5e-6)


@requires_triton
@pytest.mark.parametrize("case", INTERPRETER_CONV_CASES, ids=str)
def test_interpreter_chunked_conv(interpreter_results, case) -> None:
    triton_interpreter.check_result(interpreter_results, f"conv-{case}", 2e-5)


@requires_triton
def test_interpreter_scan_custom_ops_pass_opcheck(interpreter_results) -> None:
    triton_interpreter.check_result(interpreter_results, "opcheck", 0.0)


@requires_triton
def test_interpreter_compiled_chunked_conv_is_one_graph(interpreter_results) -> None:
    triton_interpreter.check_result(interpreter_results, "compiled-conv", 1e-6)


# ----------------------------------------------------------------------------------- (c) CUDA


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("bsz", "length"), [(8, 4096), (1, 65536)])
@pytest.mark.parametrize("gemm_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-products"])
def test_chunked_conv_on_cuda(bsz: int, length: int, gemm_dtype: torch.dtype | None) -> None:
    """d_model-128-like width, bidirectional: 1 scan tile at 4K, 16 at 64K; float32, the
    products in float32 or (autocast) bfloat16."""
    errors = _conv_case(True, length, None, torch.float32, device="cuda", bsz=bsz, width=16,
                        gemm_dtype=gemm_dtype)
    tol = 1e-4 if gemm_dtype is None else BF16_GEMM_TOL
    for name, error in errors.items():
        assert error <= tol, f"{name}: relative error {error:.2e}"


if __name__ == "__main__":
    _interpreter_main()
