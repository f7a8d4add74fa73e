"""The folded up-block convolution (`models.fused.upsampled_conv`) in fp16 on the GPU: its 2×2
product on every CUTLASS configuration against cuDNN's, the whole fold (CUTLASS's race, and cuDNN
alone) against the fp32 convolution of the upsampled map as closely as fp16's own convolution of
the upsampled map comes, a CUDA-graph replay equal to the eager call, and the fused UNets with
`FusedOptions(fold_upsampling=True)` against the fp32 reference forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models import fused
from models.fused import FusedOptions, upsampled_conv
from models.fused.derived import derived
from models.unet import ResBlock
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
