"""VectorQuantizer: straight-through, nearest code, EMA k-means, restarts, stats, commit loss."""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch

from models.vq import VectorQuantizer, code_stats
from tests import triton_interpreter
from tests.conftest import assert_close_max as assert_close
from tests.conftest import requires_cuda


def _set_codebook(vq: VectorQuantizer, codebook: torch.Tensor) -> None:
    vq.codebook.copy_(codebook)
    vq.embed_sum.copy_(codebook)
    vq.cluster_size.fill_(1.0)


def test_straight_through_gradient_is_identity() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, heads=2).train()
    k = torch.randn(3, 2, 10, 8, requires_grad=True)
    out = vq(k)
    grad = torch.randn_like(out.k_hat)
    out.k_hat.backward(grad)
    assert torch.equal(k.grad, grad)
    assert_close("k_hat=c", vq.lookup(out.codes, out.codebook), out.k_hat.detach(), 1e-6)


@pytest.mark.parametrize("chunk", [None, 7])
def test_codes_are_cdist_argmin(chunk: int | None) -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 32, heads=3, distance_chunk=chunk).eval()
    k = torch.randn(2, 3, 25, 6)
    out = vq(k)
    for h in range(3):
        dist = torch.cdist(k[:, h].double(), vq.codebook[h].double())  # (B, L, S)
        assert torch.equal(out.codes[:, h], dist.argmin(-1))
        assert_close("dist", dist.pow(2), vq.distances(k)[:, h].double(), 1e-5)
    assert out.codes.dtype == torch.int64 and out.codes.shape == (2, 3, 25)


def test_ema_update_exact_and_moves_codes_toward_means() -> None:
    torch.manual_seed(0)
    heads, size, dim, decay, eps = 2, 8, 4, 0.9, 1e-5
    vq = VectorQuantizer(dim, size, heads=heads, decay=decay, eps=eps).train()
    k = torch.randn(4, heads, 30, dim)
    old = vq.codebook.clone()
    out = vq(k)
    flat = k.transpose(0, 1).reshape(heads, -1, dim)
    codes = out.codes.transpose(0, 1).reshape(heads, -1)
    onehot = torch.nn.functional.one_hot(codes, size).float()  # (H, N, S)
    counts, sums = onehot.sum(1), torch.einsum("hns,hnd->hsd", onehot, flat)
    n_ema = decay * 1.0 + (1 - decay) * counts
    m_ema = decay * old + (1 - decay) * sums
    total = n_ema.sum(-1, keepdim=True)
    expected = m_ema / ((n_ema + eps) / (total + size * eps) * total)[..., None]
    assert_close("cluster", n_ema, vq.cluster_size, 1e-6)
    assert_close("codebook", expected, vq.codebook, 1e-5)
    assert torch.equal(out.codebook, old)  # the snapshot is the codebook used to quantise
    used = counts > 0
    means = sums / counts.clamp_min(1)[..., None]
    before = (old - means).norm(dim=-1)[used]
    after = (vq.codebook - means).norm(dim=-1)[used]
    assert used.sum() > 4 and (after < before).all()


def test_codebook_unchanged_without_update() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 8)
    k = torch.randn(2, 1, 9, 4)
    state = {n: b.clone() for n, b in vq.named_buffers()}
    vq.eval()(k)
    vq.train()
    with torch.no_grad():
        vq(k)  # training mode, but no grad: not a training step
    vq(k, update=False)
    for name, buf in vq.named_buffers():
        assert torch.equal(buf, state[name]), name
    vq.eval()(k, update=True)  # explicit flag wins
    assert not torch.equal(vq.codebook, state["codebook"])


def test_stats_hand_made() -> None:
    vq = VectorQuantizer(2, 4).eval()
    _set_codebook(vq, torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]]))
    k = vq.codebook[0, [0, 0, 1, 1]].view(1, 1, 4, 2)  # codes [0, 0, 1, 1]
    out = vq(k)
    assert out.codes.view(-1).tolist() == [0, 0, 1, 1]
    assert out.utilisation.item() == pytest.approx(0.5)
    assert out.perplexity.item() == pytest.approx(2.0)
    assert vq.last_stats == {"utilisation": out.utilisation, "perplexity": out.perplexity}
    util, ppl = code_stats(torch.tensor([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    assert util.item() == pytest.approx(0.75) and ppl.item() == pytest.approx(3.0)
    # a mask drops the pads from the histogram: only code 0 is left
    masked = vq(k, mask=torch.tensor([[True, True, False, False]]))
    assert masked.utilisation.item() == pytest.approx(0.25)
    assert masked.perplexity.item() == pytest.approx(1.0)


def test_commit_loss_value_and_mask() -> None:
    torch.manual_seed(0)
    beta = 0.25
    vq = VectorQuantizer(5, 6, heads=2, commitment=beta).eval()
    k = torch.randn(3, 2, 7, 5, requires_grad=True)
    out = vq(k)
    c = vq.lookup(out.codes)
    expected = beta * (k.detach() - c).pow(2).sum(-1).mean()
    assert_close("commit", expected, out.commit_loss.detach(), 1e-6)
    out.commit_loss.backward()
    assert_close("d commit", 2 * beta * (k.detach() - c) / (3 * 2 * 7), k.grad, 1e-5)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 3:] = False
    masked = vq(k, mask=mask)
    err = (k.detach() - c).pow(2).sum(-1)  # (B, H, L)
    expected_masked = beta * err[mask[:, None, :].expand_as(err)].mean()
    assert_close("commit mask", expected_masked, masked.commit_loss.detach(), 1e-6)


def test_dead_code_restart() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 3, decay=0.5, dead_code_threshold=0.75).train()
    far = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1e3, 1e3]]])  # code 2 is never chosen
    _set_codebook(vq, far)
    k = 0.1 * torch.randn(2, 1, 16, 2)
    k[:, :, 8:] += 1.0  # half the keys near code 0, half near code 1
    out = vq(k, generator=torch.Generator().manual_seed(1))
    assert (out.codes != 2).all() and set(out.codes.unique().tolist()) == {0, 1}
    restarted = vq.codebook[0, 2]
    keys = k.reshape(-1, 2)
    assert (keys - restarted).abs().sum(-1).min() == 0  # it is one of the batch keys
    assert vq.cluster_size[0, 2].item() == pytest.approx(0.75)
    assert torch.equal(vq.embed_sum[0, 2], restarted * 0.75)
    assert (vq.cluster_size[0, :2] >= 0.75).all()  # live codes were not touched
    # same generator seed, same restart
    vq2 = VectorQuantizer(2, 3, decay=0.5, dead_code_threshold=0.75).train()
    _set_codebook(vq2, far)
    vq2(k, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vq.codebook, vq2.codebook)


def test_init_from_batch_and_seed() -> None:
    torch.manual_seed(0)
    assert torch.equal(
        VectorQuantizer(4, 8, seed=3).codebook, VectorQuantizer(4, 8, seed=3).codebook
    )
    assert not torch.equal(
        VectorQuantizer(4, 8, seed=3).codebook, VectorQuantizer(4, 8, seed=4).codebook
    )
    vq = VectorQuantizer(4, 8, heads=2, init_from_batch=True).train()
    assert not bool(vq.initialised)
    k = torch.randn(2, 2, 12, 4)
    vq(k, update=False)  # no training step, no init
    assert not bool(vq.initialised)
    start = vq.codebook.clone()
    out = vq(k)
    assert bool(vq.initialised)
    assert torch.equal(out.codebook, start)  # this batch was quantised with the start codebook
    for h in range(2):
        keys = k[:, h].reshape(-1, 4)
        match = torch.cdist(vq.codebook[h], keys).min(-1).values
        assert (match < 1e-6).all() and torch.unique(vq.codebook[h], dim=0).size(0) == 8
    frozen = vq.codebook.clone()
    vq.eval()(torch.randn(2, 2, 12, 4))
    assert torch.equal(vq.codebook, frozen)


def test_bf16_autocast() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, heads=2).train()
    k = torch.randn(2, 2, 20, 8).bfloat16().requires_grad_()
    ref_codes = vq.eval()(k.detach().float()).codes
    vq.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(k)
    assert out.k_hat.dtype == torch.bfloat16 and torch.equal(out.codes, ref_codes)
    assert vq.codebook.dtype == torch.float32 and torch.isfinite(vq.codebook).all()
    assert out.commit_loss.dtype == torch.float32 and math.isfinite(out.perplexity.item())
    (out.k_hat.float().sum() + out.commit_loss).backward()
    assert k.grad is not None and torch.isfinite(k.grad).all()


def test_shape_check() -> None:
    with pytest.raises(ValueError):
        VectorQuantizer(4, 8, heads=2)(torch.randn(1, 1, 3, 4))


def test_data_init_flag_survives_state_dict_round_trip() -> None:
    """The host-side copy of ``initialised`` (read without a device sync once True) follows a
    loaded state: loading an uninitialised state makes the next training step data-init again."""
    fresh = VectorQuantizer(4, 8, init_from_batch=True).train()
    trained = VectorQuantizer(4, 8, init_from_batch=True).train()
    k = torch.randn(2, 1, 12, 4)
    trained(k)
    assert bool(trained.initialised)
    trained.load_state_dict(fresh.state_dict())
    assert not bool(trained.initialised)
    trained(k)  # data init again: the codebook becomes 8 of this batch's keys
    flat = k.reshape(-1, 4)
    assert all((flat == code).all(-1).any() for code in trained.codebook[0])
    fresh.load_state_dict(trained.state_dict())
    before = fresh.codebook.clone()
    fresh(k)  # initialised state loaded: an EMA step, not a data init
    assert not all((flat == code).all(-1).any() for code in fresh.codebook[0])
    assert not torch.equal(before, fresh.codebook)


def test_stats_are_tensors_read_lazily() -> None:
    vq = VectorQuantizer(4, 8).train()
    out = vq(torch.randn(2, 1, 12, 4))
    assert isinstance(out.utilisation, torch.Tensor) and out.utilisation.dim() == 0
    quiet = VectorQuantizer(4, 8, compute_stats=False)(torch.randn(2, 1, 12, 4))
    assert math.isnan(quiet.perplexity.item()) and quiet.stats == {}


# ------------------------------------------------- the fused nearest-code kernel (Triton)
HAVE_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
# (batch, heads, length, dim, codebook size): partial row and code tiles, dim < 16 (padded dots),
# several code tiles, LongVQ's z_dim
NEAREST_CASES = [(2, 1, 100, 64, 256), (1, 3, 37, 8, 37), (2, 2, 130, 24, 200)]


def _nearest_errors(codes: torch.Tensor, k: torch.Tensor, codebook: torch.Tensor,
                    ) -> dict[str, float]:
    """How far ``codes`` are from the nearest codes (float64): the largest excess squared
    distance of a chosen code over the nearest one (relative to the mean squared distance),
    and the fraction of rows whose code differs from torch's argmin."""
    dist = torch.cdist(k.double().transpose(0, 1).flatten(1, 2),
                       codebook.double()).pow(2)  # (H, B L, S)
    chosen = dist.gather(-1, codes.transpose(0, 1).flatten(1, 2).unsqueeze(-1)).squeeze(-1)
    excess = ((chosen - dist.min(-1).values).max() / dist.mean()).item()
    reference = dist.argmin(-1).view(k.shape[1], k.shape[0], k.shape[2]).transpose(0, 1)
    return {"excess": excess, "mismatch": (codes != reference).double().mean().item()}


def _nearest_case(case) -> dict[str, float]:
    from models._vq_nearest_triton import nearest_code_triton

    bsz, heads, length, dim, size = case
    gen = torch.Generator().manual_seed(length * dim)
    k = torch.randn(bsz, heads, length, dim, generator=gen)
    codebook = torch.randn(heads, size, dim, generator=gen)
    errors = _nearest_errors(nearest_code_triton(k, codebook), k, codebook)
    # ties: every code duplicated at a later index, and keys equal to codes: the lower index
    # wins, as torch.argmin's
    twin = torch.cat([codebook, codebook], dim=1)
    exact = codebook[:, torch.arange(length) % size].unsqueeze(0).expand(bsz, -1, -1, -1)
    codes = nearest_code_triton(exact, twin)
    errors["ties_not_first"] = (codes >= size).double().mean().item()
    # through the quantiser, forced onto the kernel, against its torch path
    fused = VectorQuantizer(dim, size, heads=heads, nearest_impl="triton").eval()
    plain = VectorQuantizer(dim, size, heads=heads, nearest_impl="torch").eval()
    plain.load_state_dict(fused.state_dict())
    want = plain(k).codes
    errors["quantiser_mismatch"] = (fused(k).codes != want).double().mean().item()
    # traced: the kernel is one custom op (its fake gives dynamo the codes' shape and dtype)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=False)
    errors["compiled_mismatch"] = (compiled(k).codes != want).double().mean().item()
    return errors


def _interpreter_main() -> None:
    """``TRITON_INTERPRET=1 python -m tests.test_vq``: one JSON line of the kernel's errors."""
    triton_interpreter.run_cases({f"nearest-{c}": functools.partial(_nearest_case, c)
                                  for c in NEAREST_CASES})


@pytest.fixture(scope="module")
def nearest_interpreter_results() -> dict:
    return triton_interpreter.interpreter_results("tests.test_vq", timeout=600)


@requires_triton
@pytest.mark.parametrize("case", NEAREST_CASES, ids=str)
def test_interpreter_nearest_code_kernel(nearest_interpreter_results, case) -> None:
    """The kernel's codes are nearest codes (float64 check), equal to torch's argmin (random
    data has no near-ties), lowest index on exact ties, and the quantiser's forced Triton path
    gives its torch path's codes."""
    triton_interpreter.check_result(nearest_interpreter_results, f"nearest-{case}", 1e-6)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", [*NEAREST_CASES, (8, 1, 4096, 64, 256), (4, 4, 1000, 32, 512)],
                         ids=str)
def test_cuda_nearest_code_kernel(case) -> None:
    """On CUDA the dots are tf32x3 (about float32): chosen codes are nearest to within 1e-5 of
    the mean squared distance, and differ from torch's float32 argmin on at most 0.1 % of rows
    (near-ties)."""
    from models._vq_nearest_triton import nearest_code_triton

    bsz, heads, length, dim, size = case
    gen = torch.Generator().manual_seed(length * dim)
    k = torch.randn(bsz, heads, length, dim, generator=gen).cuda()
    codebook = torch.randn(heads, size, dim, generator=gen).cuda()
    errors = _nearest_errors(nearest_code_triton(k, codebook), k, codebook)
    assert errors["excess"] <= 1e-5 and errors["mismatch"] <= 1e-3, errors
    vq = VectorQuantizer(dim, size, heads=heads).cuda().eval()
    assert vq.fused_nearest(k)  # "auto" picks the kernel on CUDA


def test_optional_imports_are_constants_to_dynamo() -> None:
    """``importable`` answers once per module and traces as a constant (no graph break), so a
    compiled model may ask it on every forward."""
    from models._optional import importable

    assert importable("math") and not importable("no_such_module_for_longvq")

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if importable("math") and not importable("no_such_module_for_longvq") else x

    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(2)), torch.ones(2))


def test_nearest_impl_is_checked_and_auto_keeps_torch_on_cpu() -> None:
    with pytest.raises(ValueError, match="nearest_impl='cuda'"):
        VectorQuantizer(8, 16, nearest_impl="cuda")
    vq = VectorQuantizer(8, 16)
    assert not vq.fused_nearest(torch.randn(1, 1, 4, 8))  # CPU: the torch reference


if __name__ == "__main__":
    _interpreter_main()


@pytest.mark.parametrize("init_from_batch,threshold", [(True, None), (False, 0.5)])
def test_deferred_update_matches_immediate(init_from_batch: bool, threshold: float | None) -> None:
    """Deferred mode (snapshot before, update after the forward) gives the same codes, outputs,
    gradients and buffers step by step as the update inside ``forward``, with the data init
    and dead-code restarts (both sample keys with the generator)."""
    quantizers = {}
    for deferred in (False, True):
        torch.manual_seed(0)
        vq = VectorQuantizer(4, 16, heads=2, decay=0.8, init_from_batch=init_from_batch,
                             dead_code_threshold=threshold).train()
        vq.defer_update = deferred
        quantizers[deferred] = vq
    gens = {d: torch.Generator().manual_seed(3) for d in quantizers}
    for step in range(3):
        k = torch.randn(2, 2, 40, 4, generator=torch.Generator().manual_seed(step)) * 2 + step
        outs, grads = {}, {}
        for deferred, vq in quantizers.items():
            if deferred:
                vq.take_snapshot()
            kk = k.clone().requires_grad_()
            out = vq(kk, generator=gens[deferred])
            (out.k_hat.square().sum() + out.commit_loss).backward()
            if deferred:  # nothing changed before the update is applied
                assert vq._pending is not None and torch.equal(vq.codebook,
                                                               vq.codebook_snapshot)
                vq.apply_pending_update()
                assert vq._pending is None
            outs[deferred], grads[deferred] = out, kk.grad
        assert torch.equal(outs[True].codes, outs[False].codes), step
        assert torch.equal(outs[True].k_hat, outs[False].k_hat), step
        assert torch.equal(outs[True].codebook, outs[False].codebook), step
        assert torch.equal(grads[True], grads[False]), step
        for name, buf in quantizers[False].named_buffers():
            if name != "codebook_snapshot":
                assert torch.equal(buf, quantizers[True].get_buffer(name)), (step, name)
    assert not torch.equal(quantizers[True].codebook, quantizers[True].codebook_snapshot)


def test_deferred_mode_without_update_keeps_nothing_pending() -> None:
    vq = VectorQuantizer(4, 8).eval()
    vq.defer_update = True
    vq.take_snapshot()
    before = vq.codebook.clone()
    vq(torch.randn(2, 1, 9, 4))
    vq.apply_pending_update()
    assert vq._pending is None and torch.equal(vq.codebook, before)
