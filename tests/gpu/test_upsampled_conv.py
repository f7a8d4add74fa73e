"""The folded up-block convolution (`models.fused.upsampled_conv`) in fp16 on the GPU: its 2×2
product on every CUTLASS configuration against cuDNN's, the whole fold (CUTLASS's race, and cuDNN
alone) against the fp32 convolution of the upsampled map as closely as fp16's own convolution of
the upsampled map comes, a CUDA-graph replay equal to the eager call, the next norm reading the
folded product in place (`cpp_ext.kernels.group_norm_phased`) as the norm of the interleaved copy,
and the fused UNets with `FusedOptions(fold_upsampling=True)` against the fp32 reference forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models import fused
from models.configs import UNetConfig
from models.fused import FusedOptions, upsampled_conv
from models.fused.derived import derived
from models.unet import ResBlock, UNet
from tests.gpu.common import needs_kernel, rel

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
FOLD = FusedOptions(fold_upsampling=True)


def _operands(batch: int, channels: int, out: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, channels, size, size, generator=g).cuda().half().to(memory_format=torch.channels_last)
    weight = (torch.randn(out, channels, 3, 3, generator=g) / (9 * channels) ** 0.5).cuda().half()
    return y, weight.to(memory_format=torch.channels_last)


def _upsampled_conv(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(y, scale_factor=2, mode="nearest"), weight, padding=1)


@needs_cuda
@pytest.mark.skipif(cpp_ext.cutlass_conv is None, reason="cpp_ext._cutlass_conv not built")
@pytest.mark.parametrize(("batch", "channels", "out", "size"), [(1, 320, 320, 24), (2, 640, 640, 8), (2, 64, 32, 13)])
def test_every_cutlass_configuration_runs_the_folded_product(batch, channels, out, size):
    y, weight = _operands(batch, channels, out, size)
    folded = upsampled_conv.fold_weights(weight)
    want = F.conv2d(y, folded, padding=1)
    for config, name in enumerate(cpp_ext.cutlass_conv.configs()):
        if name.startswith("f16_"):
            got = cpp_ext.cutlass_conv.conv2d(y, folded, None, 1, 1, config)
            assert rel(got, want) <= 2e-3, name


@needs_cuda
@torch.no_grad()
@pytest.mark.parametrize(("batch", "channels", "out", "size"), [(1, 320, 320, 32), (2, 960, 960, 16), (1, 64, 32, 9)])
@pytest.mark.parametrize("cutlass_convs", [True, False])
def test_the_folded_convolution_matches_the_convolution_of_the_upsampled_map(batch, channels, out, size,
                                                                           cutlass_convs):
    y, weight = _operands(batch, channels, out, size)
    ref = _upsampled_conv(y.float(), weight.float())
    options = FusedOptions(fold_upsampling=True, cutlass_convs=cutlass_convs)
    got = upsampled_conv.conv_of_upsampled(y, upsampled_conv.fold_weights(weight), options)
    plain = _upsampled_conv(y, weight)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    errors = {"folded": rel(got, ref), "fp16 plain": rel(plain, ref)}
    print(f"b{batch} {channels}->{out} @{size}²:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["folded"] <= max(2 * errors["fp16 plain"], 1e-3), errors


@needs_cuda
@torch.no_grad()
def test_the_folded_convolution_replays_from_a_cuda_graph():
    y, weight = _operands(1, 320, 320, 32, seed=1)
    folded = upsampled_conv.fold_weights(weight)
    eager = upsampled_conv.conv_of_upsampled(y, folded, FOLD)  # the race runs outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = upsampled_conv.conv_of_upsampled(y, folded, FOLD)
    out.fill_(0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def _norm_arguments(batch: int, k: int, film: bool, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)

    def half(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).cuda().half()

    args = {"weight": 1 + 0.1 * half(k), "bias": 0.1 * half(k), "add_bias": 0.5 * half(k)}
    if film:
        rows = half(batch, 2 * k) * 0.2  # the two halves of one projection: strided rows
        args.update(scale=rows[:, :k], shift=rows[:, k:], silu=True)
    else:
        args.update(add=half(batch, k), silu=False)
    return args


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize(("batch", "k", "h", "w"), [(1, 640, 64, 64), (2, 960, 16, 24), (1, 1280, 32, 32),
                                                    (2, 320, 32, 32)])
@pytest.mark.parametrize("film", [False, True])
def test_the_norm_reads_the_folded_product_in_place_as_the_norm_of_the_interleaved_map(batch, k, h, w, film):
    """`group_norm_phased(product)` equals `group_norm(interleave(product))`: bit for bit where both
    statistics passes are the wide one (channels per group not a multiple of 8: Karlo's 320, 640,
    960), else within fp16 rounding; the output channels-last, and a CUDA-graph replay equal to it."""
    g = torch.Generator().manual_seed(k + h)
    product = torch.randn(batch, 4 * k, h + 1, w + 1, generator=g).cuda().half() * 2 + 0.5
    product = product.to(memory_format=torch.channels_last)
    args = _norm_arguments(batch, k, film)
    assert cpp_ext.kernels.group_norm_phased_serves(product, 32)
    got = cpp_ext.kernels.group_norm_phased(product, 32, eps=1e-5, **args)
    want = cpp_ext.kernels.group_norm(upsampled_conv.interleave(product), 32, eps=1e-5, **args)
    assert got.shape == (batch, k, 2 * h, 2 * w) and got.is_contiguous(memory_format=torch.channels_last)
    if (k // 32) % 8:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=4e-3, rtol=4e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cpp_ext.kernels.group_norm_phased(product, 32, eps=1e-5, **args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)


@needs_kernel
def test_the_phased_norm_refuses_what_it_does_not_take_with_a_clear_error():
    """Small maps (the one-launch norm's), K not a multiple of 8, contiguous (NCHW) or float32
    products: `group_norm_phased_serves` says no, and the kernel raises instead of reading wrongly."""
    def product(k: int, h: int, dtype: torch.dtype = torch.float16, channels_last: bool = True) -> torch.Tensor:
        t = torch.randn(1, 4 * k, h + 1, h + 1, device="cuda", dtype=dtype)
        return t.to(memory_format=torch.channels_last) if channels_last else t

    refused = [product(1280, 4), product(324, 32), product(640, 32, channels_last=False),
               product(640, 32, torch.float32)]
    for p in refused:
        assert not cpp_ext.kernels.group_norm_phased_serves(p, 32)
        ones = torch.ones(p.shape[1] // 4, device="cuda", dtype=p.dtype)
        with pytest.raises(RuntimeError, match="group_norm_phased"):
            cpp_ext.kernels.group_norm_phased(p, 32, ones, ones)


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("scale_shift", [False, True])
def test_the_fused_unet_gives_the_same_output_with_the_interleave_in_the_norm(scale_shift, monkeypatch):
    """A UNet of Karlo's channel counts (320, 640: ten and twenty channels a group, whose up blocks'
    second norms run three passes) with random weights, fp16 on the fused path: every up block's
    second norm reads the folded product in place (`interleave_in_norm`), and the output is as close to the
    fp32 reference forward as with the interleave's copy (the super-res UNet's plain norms, and
    the decoder's FiLM ones with `scale_shift`)."""
    cfg = UNetConfig(image_size=64, in_channels=3, out_channels=3, model_channels=320, channel_mult=(1, 2),
                     num_res_blocks=1, use_scale_shift_norm=scale_shift)
    torch.manual_seed(4)
    unet = UNet(cfg).cuda().eval()
    for name, param in unet.named_parameters():  # zero-initialised output layers would hide a lost term
        if param.dim() == 1:
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
        elif param.abs().sum() == 0:
            param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
    half = copy.deepcopy(unet).half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    t = torch.tensor([700, 40], device="cuda")
    ref = unet(x, t)
    x16 = x.half().to(memory_format=torch.channels_last)
    copied = fused.unet_forward(half, x16, t, options=FusedOptions(interleave_in_norm=False)).float()
    calls = []
    real = cpp_ext.kernels.group_norm_phased
    monkeypatch.setattr(cpp_ext.kernels, "group_norm_phased", lambda *a, **k: calls.append(1) or real(*a, **k))
    in_place = fused.unet_forward(half, x16, t, options=FusedOptions(interleave_in_norm=True)).float()
    ups = [m for m in half.modules() if isinstance(m, ResBlock) and m.up]
    errors = {"in place": rel(in_place, ref), "copy": rel(copied, ref), "in place vs copy": rel(in_place, copied)}
    print("scale_shift" if scale_shift else "plain", len(calls), "phased norms;",
          {k: f"{v:.1e}" for k, v in errors.items()})
    assert ups and len(calls) == len(ups)
    assert errors["in place"] <= max(1.5 * errors["copy"], 2e-3) and errors["in place vs copy"] <= 2e-3, errors


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("stage", ["super_res", "decoder"])
def test_the_fused_unet_with_folded_up_convolutions_matches_fp32(ours, stage):
    """The default model's UNets in fp16, channels-last, on the fused path with the fold: as close
    to the fp32 reference forward as without it (the same bound as the fused path's own test)."""
    model = copy.deepcopy(ours).cuda()
    unet = model.super_res[0].first_steps if stage == "super_res" else model.decoder.unet
    half = copy.deepcopy(unet).half().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    size = unet.cfg.image_size
    x = torch.randn(2, unet.cfg.in_channels, size, size, generator=g).cuda()
    t = torch.tensor([900, 10]).cuda()
    kw = {}
    if stage == "decoder":
        kw["emb_add"] = torch.randn(2, unet.cfg.time_embed_dim, generator=g).cuda() * 0.1
        kw["context"] = torch.randn(2, 7, unet.cfg.context_width, generator=g).cuda()
    ref = unet(x, t, **kw)
    x16 = x.half().to(memory_format=torch.channels_last)
    kw16 = {k: v.half() for k, v in kw.items()}
    folded = fused.unet_forward(half, x16, t, options=FOLD, **kw16).float()
    plain = fused.unet_forward(half, x16, t, options=FusedOptions(fold_upsampling=False), **kw16).float()
    ups = [m for m in half.modules() if isinstance(m, ResBlock) and m.up]
    assert ups and all(derived(m.in_layers[2], "folded_weights").value is not None for m in ups)
    errors = {"folded": rel(folded, ref), "unfolded": rel(plain, ref), "folded vs unfolded": rel(folded, plain)}
    print(stage, {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= 1e-2 for e in errors.values()), errors


@needs_kernel
@torch.no_grad()
def test_the_fold_race_picks_a_way_per_shape_and_either_gives_the_reference(ours, monkeypatch):
    """`FusedOptions(fold_race=True)`: each up block's shape raced once (both ways from CUDA
    graphs), the fused super-res UNet then as close to fp32 as with the fold everywhere."""
    from models import conv_choices

    monkeypatch.setenv(conv_choices.ENV, "off")
    monkeypatch.setattr(upsampled_conv, "_chosen", {})
    unet = copy.deepcopy(ours.super_res[0].first_steps).cuda()
    half = copy.deepcopy(unet).half().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.cfg.in_channels, unet.cfg.image_size, unet.cfg.image_size, generator=g).cuda()
    t = torch.tensor([500, 3]).cuda()
    ref = unet(x, t)
    raced = fused.unet_forward(half, x.half().to(memory_format=torch.channels_last), t,
                               options=FusedOptions(fold_race=True)).float()
    ups = [m for m in half.modules() if isinstance(m, ResBlock) and m.up]
    assert len(upsampled_conv._chosen) == len(ups)  # one race per up block (their maps' sizes differ)
    print("fold race picks:", upsampled_conv._chosen)
    assert rel(raced, ref) <= 1e-2
