"""The residual join kernel (`cpp_ext/residual.cu`, `bias_residual_`): h += skip + biases in
place, a resized skip read in place, against torch. Its variant that also does the next norm's
statistics: `test_join_stats.py`. Skipped without a CUDA GPU and a built `cpp_ext`."""

from __future__ import annotations

import pytest
import torch

import cpp_ext
from tests.gpu.common import needs_kernel, rel

pytestmark = pytest.mark.gpu


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 320, 64, 64), (2, 640, 8, 8), (3, 6, 5, 7), (2, 12, 3, 3)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bias_residual_matches_torch(shape, layout, dtype):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    h, skip = (torch.randn(shape, generator=g, device="cuda").to(dtype).to(memory_format=fmt) for _ in range(2))
    bias, bias2 = (torch.randn(shape[1], generator=g, device="cuda").to(dtype) for _ in range(2))
    for second in (None, bias2):
        ref = h.double() + skip.double() + bias.double()[None, :, None, None]
        if second is not None:
            ref = ref + second.double()[None, :, None, None]
        got, again = h.clone(), h.clone()
        cpp_ext.kernels.bias_residual_(got, skip, bias, second)
        cpp_ext.kernels.bias_residual_(again, skip, bias, second)
        assert got.is_contiguous(memory_format=fmt)
        assert rel(got, ref) <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        assert torch.equal(got, again)
    other = torch.contiguous_format if layout == "nhwc" else torch.channels_last
    with pytest.raises(RuntimeError, match="contiguous or both channels_last"):
        cpp_ext.kernels.bias_residual_(h.clone(), skip.to(memory_format=other), bias)
