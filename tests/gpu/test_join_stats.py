"""The residual joins that also do the next group norm's statistics pass (`bias_residual_stats`,
`group_norm(..., partial=)`, `models.fused.norms.NormInput`): the join gives bias_residual_'s bits,
the norm over its statistics gives the bits of the norm that sums its input itself (where that
norm's statistics pass has the same geometry) and float32's values otherwise, bad arguments are
refused, and a UNet gives the same bits with and without them. Skipped without a CUDA GPU and a
built `cpp_ext`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models.configs import UNetConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(cpp_ext.kernels is None, reason=f"cpp_ext not built: {cpp_ext.IMPORT_ERROR}")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.cuda().to(memory_format=torch.channels_last)


# (batch, channels, height, width of h, skip resize): the UNets' joins (Karlo's widths), odd sizes
SHAPES = [(2, 320, 64, 64, "same"), (1, 640, 32, 32, "down"), (2, 960, 16, 16, "up"), (2, 1280, 32, 32, "same"),
          (3, 320, 12, 20, "same"), (1, 256, 40, 40, "down")]


def _join_inputs(shape, dtype, two_biases, seed):
    b, c, hgt, wid, resize = shape
    g = torch.Generator().manual_seed(seed)
    skip_hw = {"same": (hgt, wid), "down": (2 * hgt, 2 * wid), "up": (hgt // 2, wid // 2)}[resize]
    h = _nhwc(torch.randn(b, c, hgt, wid, generator=g).to(dtype))
    skip = _nhwc((torch.randn(b, c, *skip_hw, generator=g) * 2 + 3).to(dtype))  # mean far from 0: the shift matters
    bias = torch.randn(c, generator=g).to(dtype).cuda()
    bias2 = torch.randn(c, generator=g).to(dtype).cuda() if two_biases else None
    return h, skip, bias, bias2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("two_biases", [False, True])
def test_the_join_with_statistics_gives_the_join_and_the_norm_its_bits(shape, dtype, two_biases):
    h, skip, bias, bias2 = _join_inputs(shape, dtype, two_biases, sum(shape[:4]))
    c = shape[1]
    expect = h.clone()
    cpp_ext.kernels.bias_residual_(expect, skip, bias, bias2)
    h_before = h.clone()
    y, partial = cpp_ext.kernels.bias_residual_stats(h, skip, bias, bias2, 32)
    assert torch.equal(y, expect) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(h, h_before)  # out of place
    assert partial.dtype == torch.float32 and partial.shape[0] == shape[0] * 32 and partial.shape[2] == 2
    g = torch.Generator().manual_seed(c)
    weight, beta = (torch.randn(c, generator=g).to(dtype).cuda() for _ in range(2))
    scale, shift = (torch.randn(shape[0], c, generator=g).to(dtype).cuda() * 0.3 for _ in range(2))
    same_geometry = (c // 32) % 8 != 0  # the norm's own statistics pass is the wide one
    for film in (False, True):
        for flags in ({}, {"down": True}, {"up": True}):
            kw = {"scale": scale, "shift": shift} if film else {}
            own = cpp_ext.kernels.group_norm(y, 32, weight, beta, eps=1e-5, silu=True, one_pass_mode=0, **kw, **flags)
            given = cpp_ext.kernels.group_norm(y, 32, weight, beta, eps=1e-5, silu=True, partial=partial, **kw,
                                               **flags)
            assert given.shape == own.shape
            if same_geometry:
                assert torch.equal(given, own), (film, flags)
            ref = F.group_norm(y.float(), 32, weight.float(), beta.float(), 1e-5)
            if film:
                ref = ref * (1 + scale.float()[:, :, None, None]) + shift.float()[:, :, None, None]
            ref = F.silu(ref)
            ref = F.avg_pool2d(ref, 2) if flags.get("down") else ref
            ref = F.interpolate(ref, scale_factor=2, mode="nearest") if flags.get("up") else ref
            tol = 4e-3 if dtype == torch.float16 else 3e-2
            assert _rel(given, ref) <= tol, (film, flags, _rel(given, ref))
    again = cpp_ext.kernels.bias_residual_stats(h, skip, bias, bias2, 32)
    assert torch.equal(again[0], y) and torch.equal(again[1], partial)  # no float atomics


def test_bad_statistics_arguments_are_refused():
    h, skip, bias, _ = _join_inputs((2, 320, 16, 16, "same"), torch.float16, False, 0)
    y, partial = cpp_ext.kernels.bias_residual_stats(h, skip, bias, None, 32)
    weight = torch.ones(320, dtype=torch.float16, device="cuda")
    add = torch.zeros(2, 320, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="no add or add_bias"):
        cpp_ext.kernels.group_norm(y, 32, weight, bias, add=add, partial=partial)
    with pytest.raises(RuntimeError, match="B \\* groups, chunks, 2"):
        cpp_ext.kernels.group_norm(y, 32, weight, bias, partial=partial[:-1])
    with pytest.raises(RuntimeError, match="B \\* groups, chunks, 2"):
        cpp_ext.kernels.group_norm(y, 32, weight, bias, partial=partial.double())
    with pytest.raises(RuntimeError, match="channels_last half-precision"):
        cpp_ext.kernels.bias_residual_stats(h.contiguous(), skip.contiguous(), bias, None, 32)
    with pytest.raises(RuntimeError, match="at least 8 per group"):
        cpp_ext.kernels.bias_residual_stats(h, skip, bias, None, 64)
    with pytest.raises(RuntimeError, match="half its height"):
        cpp_ext.kernels.bias_residual_stats(h, skip[:, :, :8].contiguous(memory_format=torch.channels_last), bias,
                                            None, 32)
    assert cpp_ext.kernels.group_norm_takes_three_passes(320, 32, 64 * 64)
    assert not cpp_ext.kernels.group_norm_takes_three_passes(960, 32, 16 * 16)  # one pass: no statistics to hand on
    assert not cpp_ext.kernels.group_norm_takes_three_passes(64, 32, 256 * 256)  # 2 channels a group: not wide


@torch.no_grad()
@pytest.mark.parametrize("attention", [False, True])
def test_a_unet_gives_the_same_bits_with_the_joins_statistics(attention, monkeypatch):
    """A UNet of Karlo's widths (320, 640: the norms' statistics pass is the wide one) in fp16
    channels-last: the forward with the joins handing their statistics on equals the one without,
    bit for bit, and the joins did hand them on (input, middle and output blocks, attention)."""
    from models import fused
    from models.fused import FusedOptions
    from models.unet import UNet

    cfg = UNetConfig(image_size=64, in_channels=3, out_channels=3, model_channels=320, channel_mult=(1, 2),
                     num_res_blocks=1, attention_ds=(2,) if attention else (), num_head_channels=64,
                     use_scale_shift_norm=attention, middle_attention=attention,
                     context_width=64 if attention else None)
    torch.manual_seed(0)
    net = UNet(cfg).cuda().eval()
    for name, p in net.named_parameters():  # zero-initialised layers and biases would hide the joins
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
        elif p.dim() > 1:
            torch.nn.init.normal_(p, std=0.03)
    net = net.half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device="cuda").half().to(memory_format=torch.channels_last)
    t = torch.tensor([10, 900], device="cuda")
    context = torch.randn(2, 7, 64, device="cuda").half() if attention else None
    real = cpp_ext.kernels.bias_residual_stats
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(cpp_ext.kernels, "bias_residual_stats", counting)
    without = fused.unet_forward(net, x, t, context=context, options=FusedOptions(join_stats=False))
    assert not calls
    with_stats = fused.unet_forward(net, x, t, context=context)
    # input blocks 1-3 (two ResBlocks, a down block), middle (ResBlock [, attention]), the last output
    # block to the out norm; at 32x32 (640 channels, 20 a group) the norms take three passes too
    assert len(calls) >= 5, calls
    assert torch.equal(with_stats, without)
