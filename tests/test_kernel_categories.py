"""Profile categories: real kernel names (H200 profiles of LongVQ, SDPA and a compiled step) and
CPU operator names land where a reader of the profile would put them; totals add up."""

from __future__ import annotations

import pytest

from harness.kernel_categories import OTHER, category_totals, kernel_category


@pytest.mark.parametrize(("name", "category"), [
    ("_cache_sums_kernel", "VQ attention"),
    ("_bwd_dkdv_kernel", "VQ attention"),
    ("_VQAttentionBackward", "VQ attention"),
    ("triton_per_fused_native_layer_norm_backward_12", "inductor (fused)"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<32, 128, 128, 4>>",
     "attention (flash / SDPA)"),
    ("void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<32, 4>>", "mamba-ssm / fla"),
    ("void vector_fft_symm_r2c<8192u, EPT<16u>, 1u, 0u>", "FFT"),
    ("aten::_fft_r2c", "FFT"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer"),
    ("nvjet_sm90_tst_32x64_64x16_2x1_v_bz_splitK_NTN", "GEMM"),
    ("sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x8_stage3", "GEMM"),
    ("aten::bmm", "GEMM"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<float>",
     "normalisation"),
    ("void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16>>", "reduction"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda>",
     "copy / cast"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "elementwise (ATen)"),
    ("exp_kernel_vectorized2_kernel", "elementwise (ATen)"),
    ("aten::add_", "elementwise (ATen)"),
    ("aten::silu_backward", "elementwise (ATen)"),
    ("aten::as_strided", "other ATen operators"),
    ("cudaLaunchKernel", OTHER),
])
def test_kernel_category(name, category):
    assert kernel_category(name) == category


def test_category_totals_sum_and_order():
    events = [("_fwd_kernel", 2, 3000.0), ("_scan_kernel", 4, 1000.0), ("aten::bmm", 1, 2000.0),
              ("mystery", 1, 0.0)]
    rows = category_totals(events, steps=2)
    assert [r["category"] for r in rows] == ["VQ attention", "GEMM", OTHER]
    assert rows[0]["calls"] == 6 and rows[0]["self_ms_per_step"] == pytest.approx(2.0)
    assert rows[0]["calls_per_step"] == 3 and rows[1]["calls_per_step"] == 0.5
    assert sum(r["self_pct"] for r in rows) == pytest.approx(100.0)
    assert category_totals([], steps=1) == []
