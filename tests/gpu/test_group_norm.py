"""The group norm kernels (`cpp_ext/group_norm.cu`): the norm with its fused addition, FiLM,
SiLU and resized output against float32 torch, NCHW and channels-last, each pass mode; the
norm that writes the skip concatenation, with the biases deferred to it. Skipped without a CUDA
GPU and a built `cpp_ext`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models.fused.unet_blocks import SkipConcat
from tests.gpu.common import needs_kernel, rel

pytestmark = pytest.mark.gpu


GN_SHAPES = [(1, 320, 256, 256), (2, 1280, 8, 8), (4, 960, 16, 16), (2, 2240, 32, 32), (3, 64, 5, 7), (2, 32, 16, 16)]


@needs_kernel
@pytest.mark.parametrize("shape", GN_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("one_pass_mode", [0, 1])
def test_fused_group_norm_matches_float32_torch(shape, layout, dtype, one_pass_mode):
    """Both kernels (three passes for large maps, one launch for small ones) against torch in float32."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    b, c = shape[:2]
    x = (torch.randn(shape, generator=g, device="cuda") * 3 + 2).to(dtype)  # a mean far from 0
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    weight = (1 + 0.1 * torch.randn(c, generator=g, device="cuda")).to(dtype)
    bias = (0.1 * torch.randn(c, generator=g, device="cuda")).to(dtype)
    scale = (0.2 * torch.randn(b, c, generator=g, device="cuda")).to(dtype)
    shift = (0.2 * torch.randn(b, c, generator=g, device="cuda")).to(dtype)
    add = torch.randn(b, c, generator=g, device="cuda").to(dtype)
    add_bias = torch.randn(c, generator=g, device="cuda").to(dtype)
    # scale/shift as the two halves of one [B, 2C] projection (strided rows, as the ResBlocks pass them)
    film_rows = torch.cat([scale, shift], dim=1)
    strided_scale, strided_shift = film_rows.chunk(2, dim=1)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    cases = ((False, False, False, False), (False, True, False, False), (True, True, False, False),
             (False, True, True, False), (True, True, False, True), (False, True, True, True))
    for film, silu, with_add, with_bias in cases:
        x_in = x.float() + add.float()[:, :, None, None] if with_add else x.float()
        if with_bias:
            x_in = x_in + add_bias.float()[None, :, None, None]
        ref = F.group_norm(x_in, 32, weight.float(), bias.float(), 1e-5)
        if film:
            ref = ref * (1 + scale.float()[:, :, None, None]) + shift.float()[:, :, None, None]
        if silu:
            ref = F.silu(ref)
        kw = {"scale": strided_scale if film else None, "shift": strided_shift if film else None,
              "add": add if with_add else None, "eps": 1e-5, "silu": silu, "add_bias": add_bias if with_bias else None,
              "one_pass_mode": one_pass_mode}
        got = cpp_ext.kernels.group_norm(x, 32, weight, bias, **kw)
        again = cpp_ext.kernels.group_norm(x, 32, weight, bias, **kw)
        assert got.dtype == dtype and got.shape == x.shape
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
        assert rel(got.float(), ref) <= tol, (shape, layout, film, silu, rel(got.float(), ref))
        assert torch.equal(got, again)  # deterministic: no float atomics


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 320, 32, 32), (2, 1280, 8, 8), (3, 64, 6, 10)])
@pytest.mark.parametrize("one_pass_mode", [0, 1])
@pytest.mark.parametrize("resize", ["up", "down"])
def test_fused_group_norm_resized_output_and_residual(shape, one_pass_mode, resize):
    """The up/down ResBlocks' fusions: the norm writing its output nearest-upsampled 2x or 2x2
    average-pooled, and the residual join reading its skip resized the same way, against torch's
    norm/add + F.interpolate / F.avg_pool2d."""
    import torch.nn.functional as F

    def resized(t):
        return F.interpolate(t, scale_factor=2, mode="nearest") if resize == "up" else F.avg_pool2d(t, 2, 2)

    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    b, c, hgt, wid = shape
    x = torch.randn(shape, generator=g, device="cuda").half().to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c, generator=g, device="cuda").half() for _ in range(2))
    add = torch.randn(b, c, generator=g, device="cuda").half()
    ref = resized(F.silu(F.group_norm(x.float() + add.float()[:, :, None, None], 32, weight.float(), bias.float(),
                                      1e-5)))
    flags = {"up": resize == "up", "down": resize == "down"}
    got = cpp_ext.kernels.group_norm(x, 32, weight, bias, None, None, add, 1e-5, True, None, one_pass_mode, **flags)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert rel(got.float(), ref) <= 4e-3
    out_h, out_w = ref.shape[2:]
    h = torch.randn(b, c, out_h, out_w, generator=g, device="cuda").half().to(memory_format=torch.channels_last)
    joined = h.clone()
    cpp_ext.kernels.bias_residual_(joined, x, bias)
    expect = h.double() + resized(x.double()) + bias.double()[None, :, None, None]
    assert rel(joined, expect) <= 1e-3
    with pytest.raises(RuntimeError, match="needs channels_last"):
        cpp_ext.kernels.group_norm(x.contiguous(), 32, weight, bias, **flags)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 320, 320, 32, 32), (1, 640, 320, 64, 64), (2, 256, 256, 32, 32),
                                   (2, 640, 640, 8, 8), (3, 8, 56, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_concat_matches_torch(shape, dtype, silu):
    """The output blocks' norm of cat(h, skip) with the concatenation written by its statistics
    pass (three-pass shapes) or by torch (one-pass shapes): the concatenation exact, the norm
    against float32 torch."""
    b, c1, c2, hgt, wid = shape
    g = torch.Generator().manual_seed(c1 + hgt)
    h = (torch.randn(b, c1, hgt, wid, generator=g) * 2 + 1).to(dtype).cuda().to(memory_format=torch.channels_last)
    skip = torch.randn(b, c2, hgt, wid, generator=g).to(dtype).cuda().to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c1 + c2, generator=g).to(dtype).cuda() for _ in range(2))
    y, cat = cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, silu)
    assert torch.equal(cat, torch.cat([h, skip], dim=1))
    assert cat.is_contiguous(memory_format=torch.channels_last)
    ref = F.group_norm(cat.float(), 32, weight.float(), bias.float(), 1e-5)
    ref = F.silu(ref) if silu else ref
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert rel(y, ref) <= tol, rel(y, ref)
    again, _ = cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, silu)
    assert torch.equal(y, again)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 320, 320, 32, 32), (1, 640, 320, 64, 64), (2, 640, 640, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("two_biases", [False, True])
def test_group_norm_concat_adds_the_deferred_biases_to_the_first_part(shape, dtype, two_biases):
    """An output block that left its biases to the next one's concatenation: the concatenation
    holds h + bias (+ bias2), summed in float32 and rounded once (exact against that), in the
    fused pass (three-pass shapes) and in torch's (one-pass shapes); its norm against float32."""
    b, c1, c2, hgt, wid = shape
    g = torch.Generator().manual_seed(c2 + wid)
    h = (torch.randn(b, c1, hgt, wid, generator=g) * 2 + 1).to(dtype).cuda().to(memory_format=torch.channels_last)
    skip = torch.randn(b, c2, hgt, wid, generator=g).to(dtype).cuda().to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c1 + c2, generator=g).to(dtype).cuda() for _ in range(2))
    h_bias = (torch.randn(c1, generator=g) * 3).to(dtype).cuda()
    h_bias2 = torch.randn(c1, generator=g).to(dtype).cuda() if two_biases else None
    y, cat = cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, True, h_bias, h_bias2)
    total = h_bias.float() + (h_bias2.float() if two_biases else 0.0)
    want_h = (h.float() + total.view(1, -1, 1, 1)).to(dtype)
    assert torch.equal(cat, torch.cat([want_h, skip], dim=1))
    assert torch.equal(SkipConcat(h, skip, h_bias, h_bias2).tensor(), cat)  # the torch fallback agrees
    ref = F.silu(F.group_norm(cat.float(), 32, weight.float(), bias.float(), 1e-5))
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert rel(y, ref) <= tol, rel(y, ref)
    with pytest.raises(RuntimeError, match="first_bias"):
        cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, True, h_bias[:-8], None)
