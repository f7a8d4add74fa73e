"""`benchmarks.stage_variants.kernel_shares`: a profile's CUDA kernels grouped into families by
name (the kernels of a decoder step as the H100's profile named them), summed, counted, and each
family's share of the total."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.stage_variants import kernel_shares


def _event(key: str, us: float, count: int) -> SimpleNamespace:
    return SimpleNamespace(key=key, self_device_time_total=us, count=count)


def test_kernels_are_grouped_by_family_with_their_shares():
    events = [
        _event("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128", 742.0, 16),
        _event("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<unclip_cutlass::ConvMainloop",
               300.0, 10),
        _event("void unclip_rt::group_norm_parts::(anonymous namespace)::one_pass_nhwc<__half, 8>", 372.0, 53),
        _event("void (anonymous namespace)::bias_residual_stats_kernel<__half, 0>", 40.0, 4),
        _event("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", 411.0, 22),
        _event("nvjet_sm90_hsh_160x128_64x5_1x2_h_badd_TNN", 200.0, 3),
        _event("void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor>", 100.0, 30),
        _event("some_new_kernel", 35.0, 1),
        _event("cudaLaunchKernelEx", 0.0, 200),  # a runtime call, no device time: left out
    ]
    shares = kernel_shares(events)
    families = shares["families"]
    assert shares["total_us"] == pytest.approx(2200.0)
    assert list(families) == ["convolution", "attention", "group norm", "matrix product", "elementwise",
                              "residual join", "other"]  # largest first
    assert families["convolution"] == {"us": 1042.0, "launches": 26, "share": pytest.approx(1042 / 2200)}
    assert families["group norm"]["launches"] == 53 and families["other"]["us"] == 35.0
    assert sum(f["share"] for f in families.values()) == pytest.approx(1.0)
