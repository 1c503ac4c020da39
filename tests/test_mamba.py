"""Mamba / Mamba-2 references: scans vs independent oracles, layout vs mamba_ssm, causality.

CPU: the vectorised selective scan vs explicit loops over time and state (float64); chunked SSD
vs the sequential recurrence and vs the Mamba-1 scan with a per-head scalar A; state_dict
keys/shapes vs lists written from mamba_simple.py / mamba2.py. CUDA (the lead's GPU run): the
real ``mamba_ssm.Mamba`` / ``Mamba2`` load our state_dict strictly (and back) and compute the same
outputs and gradients as our references in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines.mamba import MambaReference, mamba_reference_forward
from baselines.mamba2 import Mamba2Reference, mamba2_reference_forward
from harness.registry import REGISTRY
from models.selective_scan import (
    ScanMixer,
    _warn_reference,
    rms_norm_gated,
    selective_scan_ref,
    ssd_chunked,
    ssd_sequential,
)
from tests.conftest import assert_close, requires_cuda

pytestmark = pytest.mark.filterwarnings("ignore:.*torch reference:RuntimeWarning")



def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def compare(names, fn_ref, fn_other, inputs, dtype, tol) -> None:
    """Outputs and every input gradient: fn_ref in float64, fn_other in ``dtype``."""
    ref_in = leaves(*(t.double() for t in inputs))
    other_in = leaves(*(t.to(dtype) for t in inputs))
    out_ref, out_other = fn_ref(*ref_in), fn_other(*other_in)
    assert out_other.dtype == dtype
    assert_close("out", out_ref, out_other, tol)
    upstream = torch.randn_like(out_ref)  # random upstream gradient, not .sum()
    out_ref.backward(upstream)
    out_other.backward(upstream.to(dtype))
    for name, a, b in zip(names, ref_in, other_in, strict=True):
        assert_close(f"d{name}", a.grad, b.grad, 10 * tol)


# -- Mamba selective scan -----------------------------------------------------------------------
def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """Δ = softplus(δ + b); loops over t and n: h_n ← exp(Δ A_n) h_n + Δ B_n u; y = Σ_n C_n h_n."""
    delta = F.softplus(delta + delta_bias[:, None])
    batch, dim, length = u.shape
    h = [u.new_zeros(batch, dim) for _ in range(A.shape[1])]
    ys = []
    for t in range(length):
        y_t = D * u[:, :, t]
        for n in range(A.shape[1]):
            decay = torch.exp(delta[:, :, t] * A[:, n])
            h[n] = decay * h[n] + delta[:, :, t] * B[:, n, t, None] * u[:, :, t]
            y_t = y_t + C[:, n, t, None] * h[n]
        ys.append(y_t * F.silu(z[:, :, t]))
    return torch.stack(ys, dim=-1)


def scan_inputs(batch: int, dim: int, state: int, length: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.randn(batch, dim, length, generator=g)
    A = -torch.exp(torch.randn(dim, state, generator=g) * 0.5)
    B, C = (torch.randn(batch, state, length, generator=g) for _ in range(2))
    D = torch.randn(dim, generator=g)
    z = torch.randn(batch, dim, length, generator=g)
    delta_bias = torch.randn(dim, generator=g) * 0.5
    return [u, delta, A, B, C, D, z, delta_bias]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("length", [1, 37])
def test_selective_scan_ref_matches_explicit_loops(length, dtype, tol):
    def ours(u, delta, A, B, C, D, z, bias):
        return selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)

    compare("u delta A B C D z bias".split(), naive_selective_scan, ours,
            scan_inputs(2, 5, 4, length), dtype, tol)


# -- Mamba-2 SSD --------------------------------------------------------------------------------
def ssd_inputs(length: int, heads: int = 4, headdim: int = 3, groups: int = 2, state: int = 5):
    g = torch.Generator().manual_seed(100 + length)
    x = torch.randn(2, length, heads, headdim, generator=g)
    dt = F.softplus(torch.randn(2, length, heads, generator=g) - 1.0)
    A = -torch.exp(torch.randn(heads, generator=g))
    B, C = (torch.randn(2, length, groups, state, generator=g) for _ in range(2))
    D = torch.randn(heads, generator=g)
    return [x, dt, A, B, C, D]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(("length", "chunk"), [(1, 16), (63, 16), (100, 16), (40, 64)])
def test_ssd_chunked_matches_sequential(length, chunk, groups, dtype, tol):
    def chunked(x, dt, A, B, C, D):
        return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk)

    compare("x dt A B C D".split(), ssd_sequential, chunked,
            ssd_inputs(length, groups=groups), dtype, tol)


def test_ssd_is_the_selective_scan_with_one_decay_per_head():
    """Mamba-2 = Mamba-1 on h·p channels with A[d, :] = A_h, Δ_d = Δ_h, B and C of the group."""
    x, dt, A, B, C, D = (t.double() for t in ssd_inputs(29, heads=4, headdim=3, groups=2))
    batch, length, heads, headdim = x.shape
    y = ssd_sequential(x, dt, A, B, C, D)
    for h in range(heads):
        group = h // (heads // B.shape[2])
        u = x[:, :, h].transpose(1, 2)  # (b, p, l)
        delta = dt[:, :, h, None].expand(-1, -1, headdim).transpose(1, 2)
        A_h = A[h].expand(headdim, B.shape[-1])
        y_h = selective_scan_ref(u, delta, A_h, B[:, :, group].transpose(1, 2),
                                 C[:, :, group].transpose(1, 2), D[h].expand(headdim))
        assert_close(f"head{h}", y_h.transpose(1, 2), y[:, :, h], 1e-12)


def test_rms_norm_gated_is_groupwise_rmsnorm_of_gated_input():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(2, 7, 12, generator=g).double(), torch.randn(2, 7, 12, generator=g).double()
    weight = torch.randn(12, generator=g).double()
    out = rms_norm_gated(x, z, weight, eps=1e-5, group_size=4, norm_before_gate=False)
    gated = (x * torch.sigmoid(z) * z).view(2, 7, 3, 4)
    expected = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out, expected.view(2, 7, 12) * weight)


# -- parameter layout, init, model behaviour ----------------------------------------------------
# Written from mamba_simple.py's Mamba.__init__ (d_model=32: d_inner 64, dt_rank ceil(32/16) = 2).
MAMBA_KEYS = {
    "in_proj.weight": (128, 32),  # rows [x, z]
    "conv1d.weight": (64, 1, 4),
    "conv1d.bias": (64,),
    "x_proj.weight": (2 + 2 * 16, 64),  # rows [dt, B, C]
    "dt_proj.weight": (64, 2),
    "dt_proj.bias": (64,),
    "A_log": (64, 16),
    "D": (64,),
    "out_proj.weight": (32, 64),
}
# From mamba2.py's Mamba2.__init__ (d_model=32, d_state=16, headdim=16, ngroups=2: d_inner 64,
# 4 heads; in_proj rows [z 64, x 64, B 32, C 32, dt 4]; conv over [x, B, C]).
MAMBA2_KEYS = {
    "in_proj.weight": (2 * 64 + 2 * 2 * 16 + 4, 32),
    "conv1d.weight": (64 + 2 * 2 * 16, 1, 4),
    "conv1d.bias": (64 + 2 * 2 * 16,),
    "dt_bias": (4,),
    "A_log": (4,),
    "D": (4,),
    "norm.weight": (64,),
    "out_proj.weight": (32, 64),
}


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_state_dict_layout_matches_mamba_ssm():
    assert shapes(MambaReference(32)) == MAMBA_KEYS
    assert shapes(Mamba2Reference(32, d_state=16, headdim=16, ngroups=2)) == MAMBA2_KEYS
    model = REGISTRY.get("mamba").build(d_model=32, n_layers=1, d_ffn=0, head="cls")
    mixer_keys = {k.split("mixer.", 1)[1] for k in model.state_dict() if ".mixer." in k}
    assert mixer_keys == {f"{d}.{k}" for d in ("mamba_fwd", "mamba_rev") for k in MAMBA_KEYS}


def test_init_follows_upstream():
    torch.manual_seed(0)
    m1 = MambaReference(32, dt_min=0.002, dt_max=0.05)
    dt = F.softplus(m1.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    torch.testing.assert_close(-torch.exp(m1.A_log), -torch.arange(1.0, 17.0).expand(64, 16))
    assert torch.equal(m1.D, torch.ones(64))
    m2 = Mamba2Reference(32, headdim=16)
    assert F.softplus(m2.dt_bias).max() <= 0.1 * (1 + 1e-5)
    assert torch.exp(m2.A_log).min() >= 1.0 and torch.exp(m2.A_log).max() <= 16.0
    assert torch.equal(m2.norm.weight, torch.ones(64)) and m2.norm.bias is None


def test_mamba2_config_rejects_headdim_not_dividing_d_inner():
    entry = REGISTRY.get("mamba2")
    with pytest.raises(ValueError, match="headdim"):
        entry.make_config(d_model=32, headdim=48)
    with pytest.raises(ValueError, match="ngroups"):
        entry.make_config(d_model=32, headdim=16, ngroups=3)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_lm_head_is_causal_and_records_reference_backend(name):
    entry = REGISTRY.get(name)
    extra = {"headdim": 16, "d_state": 16, "chunk_size": 8} if name == "mamba2" else {}
    torch.manual_seed(0)
    model = entry.build(d_model=32, n_layers=2, d_ffn=64, head="lm", **extra).double()
    tokens = torch.randint(0, 256, (2, 40))
    changed = tokens.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    out, out_changed = model(tokens), model(changed)
    torch.testing.assert_close(out[:, :25], out_changed[:, :25])
    assert not torch.allclose(out[:, 25:], out_changed[:, 25:])
    assert model.backend == "torch-reference"


@pytest.mark.parametrize(("cls", "fwd"), [(MambaReference, mamba_reference_forward),
                                          (Mamba2Reference, mamba2_reference_forward)])
def test_bidirectional_mixer_sees_both_sides(cls, fwd):
    torch.manual_seed(0)
    kwargs = {"headdim": 16, "d_state": 8, "chunk_size": 8} if cls is Mamba2Reference else {}
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    later = x.clone()
    later[:, 15:] += 1.0
    for bidirectional in (False, True):
        mixer = ScanMixer(lambda: cls(32, **kwargs), bidirectional, cls, fwd, "t").double()
        changed = (mixer(x) - mixer(later))[:, :15].abs().max().item()
        assert (changed > 1e-6) == bidirectional, (bidirectional, changed)


def test_official_module_on_cpu_input_runs_the_reference_on_its_parameters():
    """A model built on a CUDA machine (official modules) and run on CPU must not call kernels."""
    torch.manual_seed(0)
    make = lambda: MambaReference(16)  # noqa: E731
    # any class other than reference_cls counts as "official": here MambaReference itself
    mixer = ScanMixer(make, False, Mamba2Reference, mamba_reference_forward, "t")
    assert mixer.official and mixer.backend == "mamba_ssm"
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(mixer(x), mamba_reference_forward(mixer.mamba_fwd, x))
    assert mixer.backend == "torch-reference"


def test_reference_path_warns_once():
    _warn_reference.cache_clear()
    model = REGISTRY.get("mamba").build(d_model=32, n_layers=2, head="lm")
    with pytest.warns(RuntimeWarning, match="torch reference") as record:
        model(torch.randint(0, 256, (1, 8)))
    assert len(record) == 1


# -- CUDA: the real mamba_ssm modules -----------------------------------------------------------
def official_pair(kind: str):
    mamba_ssm = pytest.importorskip("mamba_ssm")
    if kind == "mamba":
        kwargs = {"d_model": 64, "d_state": 16, "d_conv": 4, "expand": 2}
        return mamba_ssm.Mamba, MambaReference, mamba_reference_forward, kwargs
    kwargs = {"d_model": 64, "d_state": 16, "d_conv": 4, "expand": 2, "headdim": 16,
              "ngroups": 2, "chunk_size": 16}  # 8 heads: in_proj width a multiple of 8
    return mamba_ssm.Mamba2, Mamba2Reference, mamba2_reference_forward, kwargs


@requires_cuda
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_seeded_init_matches_official(kind):
    official_cls, ref_cls, _, kwargs = official_pair(kind)
    torch.manual_seed(0)
    official = official_cls(**kwargs)
    torch.manual_seed(0)
    ours = ref_cls(**kwargs)
    assert shapes(official) == shapes(ours)
    for key, value in official.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key


@pytest.fixture
def no_tf32():
    """Keep the torch side of a CUDA comparison in true fp32 (cuDNN convs default to TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@requires_cuda
@pytest.mark.parametrize("length", [64, 100])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_official_module_matches_reference_on_cuda(kind, length, no_tf32):
    # Mamba's CUDA scan is fp32 throughout; Mamba2's Triton SSD kernels run tl.dot in TF32 on
    # fp32 inputs (upstream's own test_ssd.py uses rtol 1e-2, atol 3e-3), hence the looser bound;
    # gradients (sums over the whole sequence) get twice the output bound.
    tol = 1e-3 if kind == "mamba" else 5e-3
    official_cls, ref_cls, ref_forward, kwargs = official_pair(kind)
    torch.manual_seed(1)
    ours = ref_cls(**kwargs)
    with torch.no_grad():  # move away from the init so every parameter matters
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    official = official_cls(**kwargs)
    official.load_state_dict(ours.state_dict(), strict=True)
    ref_cls(**kwargs).load_state_dict(official.state_dict(), strict=True)  # and back
    ours, official = ours.cuda(), official.cuda()
    x = torch.randn(2, length, kwargs["d_model"], device="cuda")
    x_ours, x_off = leaves(x, x)
    out_ours, out_off = ref_forward(ours, x_ours), official(x_off)
    assert_close("out", out_ours, out_off, tol)
    upstream = torch.randn_like(out_ours)
    out_ours.backward(upstream)
    out_off.backward(upstream)
    assert_close("dx", x_ours.grad, x_off.grad, 2 * tol)
    grads = dict(official.named_parameters())
    for name, param in ours.named_parameters():
        assert_close(name, param.grad, grads[name].grad, 2 * tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_registry_model_uses_mamba_ssm_on_cuda(name, dtype):
    """Registry defaults (mamba2: d_model 128, headdim 64 -> 4 heads, in_proj width 772, not a
    multiple of 8: older causal_conv1d builds reject that stride) under autocast."""
    pytest.importorskip("mamba_ssm")
    model = REGISTRY.get(name).build(n_layers=2, head="cls").cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        logits = model(torch.randint(0, 256, (2, 64), device="cuda"))
    logits.float().sum().backward()
    assert model.backend == "mamba_ssm"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_concurrent_directions_match_sequential_on_cuda(kind):
    """The bidirectional mixer's two directions on two streams give the sequential mixer's
    output and gradients (x and every parameter), eagerly and replayed from a CUDA graph."""
    official_cls, _, _, kwargs = official_pair(kind)
    torch.manual_seed(3)
    mixers = [ScanMixer(lambda: official_cls(**kwargs), True, MambaReference,
                        mamba_reference_forward, "t", concurrent=c).cuda() for c in (False, True)]
    mixers[1].load_state_dict(mixers[0].state_dict())
    x = torch.randn(2, 300, kwargs["d_model"], device="cuda")
    upstream = torch.randn_like(x)
    results = []
    for mixer in mixers:
        leaf = x.clone().requires_grad_()
        mixer(leaf).backward(upstream)
        results.append([leaf.grad] + [p.grad for p in mixer.parameters()])
        mixer.zero_grad(set_to_none=True)
    for want, got in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # captured: the side stream forks from the capture stream and joins it
    mixer, static_x = mixers[1], x.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            mixer(static_x).backward(upstream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    mixer.zero_grad(set_to_none=False)
    static_x.grad = None
    with torch.cuda.graph(graph):
        out = mixer(static_x)
        out.backward(upstream)
    for p in mixer.parameters():
        p.grad.zero_()
    static_x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_x.grad, results[0][0], rtol=1e-5, atol=1e-5)
    for p, want in zip(mixer.parameters(), results[0][1:], strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-5)


def test_shifted_tap_conv_equals_conv1d():
    """causal_depthwise_conv (a sum of shifted taps) is the padded, truncated Conv1d."""
    from models.selective_scan import causal_depthwise_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3).double()
    x = torch.randn(2, 8, 37, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.silu(conv(x)[..., :37])
    out = causal_depthwise_conv(conv, x)
    upstream = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (x, conv.weight, conv.bias), upstream)
    grads = torch.autograd.grad(out, (x, conv.weight, conv.bias), upstream)
    assert_close("out", ref, out, 1e-12)
    for name, g_ref, g in zip(("dx", "dweight", "dbias"), grads_ref, grads, strict=True):
        assert_close(name, g_ref, g, 1e-12)
