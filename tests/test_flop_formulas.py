"""Every custom op of ours has a FLOP formula: under an ``activation_memory_budget`` the compile
partitioner's last pass weighs what to recompute by FLOPs, and counts an op without a formula as
1 FLOP (free), so it would re-run our kernels in the backward (harness/measure.py,
``with_memory_budget``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import models.fft_conv
import models.s4d_chunked
import models.vq  # noqa: F401 - defines longvq::nearest_code

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def test_every_longvq_custom_op_has_a_flop_formula() -> None:
    if HAVE_TRITON:
        import models.vq_attention.triton  # noqa: F401 - defines the VQ attention ops
    names = [name for name in dir(torch.ops.longvq) if not name.startswith("_")
             and isinstance(getattr(torch.ops.longvq, name), torch._ops.OpOverloadPacket)]
    expected = {"fft_conv", "fft_conv_backward", "nearest_code", "decayed_scan",
                "decayed_scan_backward"}
    if HAVE_TRITON:
        expected |= {"vq_attention_fwd", "vq_attention_bwd"}
    assert expected <= set(names), names
    missing = [n for n in names if getattr(torch.ops.longvq, n) not in flop_registry]
    assert not missing, f"custom ops without a FLOP formula: {missing}"


@pytest.mark.parametrize("n", [64, 4096])
def test_fft_conv_flops_are_counted_and_grow_as_n_log_n(n: int) -> None:
    def flops(size: int) -> int:
        u, k = torch.randn(4, 3, size // 2), torch.randn(3, size // 2)
        with FlopCounterMode(display=False) as mode:
            models.fft_conv._fft_conv_op(u, k, size)
        return mode.get_total_flops()

    small, large = flops(n), flops(2 * n)
    assert small > 4 * 3 * n  # more than one pass over the padded rows
    assert 2.0 < large / small < 2.5  # n log n: a bit more than twice per doubling


def test_vq_attention_flops_count_the_codes_and_the_band() -> None:
    pytest.importorskip("triton")
    from models.vq_attention.triton import vq_attention_flops

    # one query of width 64 against 256 codes (value width 256), bidirectional band of 256 keys
    per_query = 2 * (256 + 256) * (64 + 256)
    assert vq_attention_flops((1, 1, 64), (1, 1, 256), (1, 256, 64), True, False, 64, "window",
                              128) == per_query
    no_band = vq_attention_flops((8, 4096, 64), (8, 4096, 64), (1, 256, 64), False, False, 64,
                                 "ste", 128)
    assert no_band == 8 * 4096 * 2 * 256 * 128
