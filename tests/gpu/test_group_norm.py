"""The group norm kernels (`cpp_ext/group_norm.cu`): the norm with its fused addition, FiLM,
SiLU and resized output against float32 torch, NCHW and channels-last, each pass mode, in a
thread-block cluster too; the
norm that writes the skip concatenation, with the biases deferred to it. Skipped without a CUDA
GPU and a built `cpp_ext`."""

from __future__ import annotations

import math

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


needs_clusters = pytest.mark.skipif(
    cpp_ext.kernels is None or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="the norm's thread-block clusters need a Hopper (sm_90) GPU and a built cpp_ext")


def _norm_kernels(fn) -> list[str]:
    """The names of the group norm kernels one `fn()` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and "group_norm_parts" in e.name]


def _in_a_cluster(name: str) -> bool:
    """Whether `name` is the bundled kernel launched in clusters (its CLUSTER template argument)."""
    return "bundled" in name and ("true>" in name or "Lb1E" in name)


# the decoder's levels at its guided batch of 2 (bundles of 4, 2, 4 and 1 groups), an output
# block's concatenation, odd sizes, groups of 8 (bundles of one), 3 and 2 channels (bundles of 8, 4)
CLUSTER_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 960, 16, 16), (2, 1280, 8, 8), (2, 960, 64, 64),
                  (1, 320, 48, 40), (3, 256, 13, 11), (2, 96, 12, 12), (2, 64, 20, 20)]


@needs_clusters
@pytest.mark.parametrize("shape", CLUSTER_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("setting", [0, 2, 4, 8])
def test_the_norm_in_a_cluster_matches_float32_torch(shape, dtype, setting, norm_clusters):
    """The bundled one-launch norm (the groups that fill whole 16-byte packs in one block, or split
    over a thread-block cluster of 2, 4 or 8 blocks, or as many as the bundle's size asks for):
    FiLM, SiLU, the added embedding and the 2x upsampled output against float32 torch, the same bits
    on a second call, one kernel launch, the bundled kernel, in clusters wherever more than one
    block is asked for."""
    norm_clusters(setting)
    g = torch.Generator(device="cuda").manual_seed(sum(shape) + setting)
    b, c, hgt, wid = shape
    x = (torch.randn(shape, generator=g, device="cuda") * 3 + 2).to(dtype).to(memory_format=torch.channels_last)
    weight = (1 + 0.1 * torch.randn(c, generator=g, device="cuda")).to(dtype)
    bias = (0.1 * torch.randn(c, generator=g, device="cuda")).to(dtype)
    scale, shift = ((0.2 * torch.randn(b, c, generator=g, device="cuda")).to(dtype) for _ in range(2))
    add = torch.randn(b, c, generator=g, device="cuda").to(dtype)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    for film, silu, with_add, up in ((False, False, False, False), (True, True, False, False),
                                     (False, True, True, False), (True, True, True, True)):
        v = x.float() + add.float()[:, :, None, None] if with_add else x.float()
        ref = F.group_norm(v, 32, weight.float(), bias.float(), 1e-5)
        if film:
            ref = ref * (1 + scale.float()[:, :, None, None]) + shift.float()[:, :, None, None]
        ref = F.silu(ref) if silu else ref
        ref = F.interpolate(ref, scale_factor=2, mode="nearest") if up else ref
        kw = {"scale": scale if film else None, "shift": shift if film else None, "add": add if with_add else None,
              "eps": 1e-5, "silu": silu, "up": up}
        got = cpp_ext.kernels.group_norm(x, 32, weight, bias, **kw)
        assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert rel(got.float(), ref) <= tol, (film, silu, with_add, up, rel(got.float(), ref))
        assert torch.equal(got, cpp_ext.kernels.group_norm(x, 32, weight, bias, **kw))  # the fold's fixed order
    names = _norm_kernels(lambda: cpp_ext.kernels.group_norm(x, 32, weight, bias, scale, shift, None, 1e-5, True))
    assert len(names) == 1 and "bundled" in names[0], names
    cg = c // 32
    bundle_elements = cg * (8 // math.gcd(cg, 8)) * hgt * wid
    assert _in_a_cluster(names[0]) == (setting > 1 or bundle_elements > 16384), names


@needs_clusters
def test_the_cluster_setting_decides_which_maps_take_one_launch(norm_clusters):
    """Without clusters the decoder's 64x64 maps take three passes (and the join before may hand
    on their statistics); by size they take one launch in a cluster; the super-res UNet's 256x256
    maps take three passes either way. A setting other than 0, 1, 2, 4, 8 is refused."""
    x = torch.randn(2, 320, 64, 64, device="cuda").half().to(memory_format=torch.channels_last)
    weight, bias = torch.ones(320, device="cuda").half(), torch.zeros(320, device="cuda").half()
    norm_clusters(1)
    assert cpp_ext.kernels.group_norm_takes_three_passes(320, 32, 64 * 64)
    three = cpp_ext.kernels.group_norm(x, 32, weight, bias)
    assert len(_norm_kernels(lambda: cpp_ext.kernels.group_norm(x, 32, weight, bias))) == 3
    norm_clusters(0)
    assert cpp_ext.kernels.norm_clusters() == 0
    assert not cpp_ext.kernels.group_norm_takes_three_passes(320, 32, 64 * 64)
    assert cpp_ext.kernels.group_norm_takes_three_passes(320, 32, 256 * 256)
    assert rel(cpp_ext.kernels.group_norm(x, 32, weight, bias), three) <= 2e-3
    with pytest.raises(RuntimeError, match="2, 4 or 8"):
        cpp_ext.kernels.set_norm_clusters(3)
    assert cpp_ext.kernels.norm_clusters() == 0


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
