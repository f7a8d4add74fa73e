"""The group norm writing e4m3 for an FP8 convolution (`models.fp8.normalize_kernel`,
`models.fused.norms.group_norm_e4m3`, `FusedOptions.norm_writes_e4m3`) on the CPU: the
quantising normalisation in Triton's interpreter against torch's arithmetic, its input checks,
and where the path stands aside. The CUDA coefficients pass and the UNet with the option are the
GPU tests' (tests/gpu/test_fp8.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.fp8.layers import Fp8Conv
from models.fused import FusedOptions
from tests.test_fp8 import run_interpreted

NORMALIZE_CHECK = """
import torch
from models.fp8.e4m3 import E4M3, E4M3_MAX, quantize
from models.fp8.normalize_kernel import _launch, normalize_quantize
torch.manual_seed(0)
b, c, h, w = 2, 80, 5, 7  # 80 channels: a second, partly masked block of 64; 35 pixels: one partial block
x = (torch.randn(b, c, h, w) * 2).half().to(memory_format=torch.channels_last)
x[0, 3, 0, 0] = 1e4  # far beyond the scale's range: saturates
coef = torch.stack([torch.rand(b, c) + 0.5, torch.randn(b, c)], dim=-1).contiguous()  # (A, B) per sample, channel
scale = torch.tensor(2.0 ** -5)
# the arithmetic before the cast (the interpreter's own cast to e4m3 mis-rounds across a binade,
# so rounding is the GPU test's): x · A + B, SiLU, / scale, saturated
for silu in (False, True):
    out = _launch(x, coef, scale, silu, torch.empty_like(x, dtype=torch.float32))
    assert out.is_contiguous(memory_format=torch.channels_last)
    v = x.float() * coef[..., 0, None, None] + coef[..., 1, None, None]
    if silu:
        v = v * torch.sigmoid(v)
    want = (v / scale).clamp(-E4M3_MAX, E4M3_MAX)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert out[0, 3, 0, 0] == E4M3_MAX
    # per (sample, channel): swapping two channels' coefficients swaps exactly their outputs
    swapped = coef.clone()
    swapped[:, [0, 1]] = coef[:, [1, 0]]
    other = _launch(x, swapped, scale, silu, torch.empty_like(out))
    assert not torch.equal(other[:, :2], out[:, :2]) and torch.equal(other[:, 2:], out[:, 2:])
# resized as the up and down blocks' norms write: nearest 2x up, the 2x2 mean of the normalised values down
import torch.nn.functional as F
x6 = x[:, :, :, :6].contiguous(memory_format=torch.channels_last)  # an even width for down (5 x 6)
x6 = torch.cat([x6, x6[:, :, :1]], dim=2).contiguous(memory_format=torch.channels_last)  # 6 x 6
for silu in (False, True):
    v = x6.float() * coef[..., 0, None, None] + coef[..., 1, None, None]
    if silu:
        v = v * torch.sigmoid(v)
    for resize, want in ((1, F.interpolate(v, scale_factor=2, mode="nearest")), (2, F.avg_pool2d(v, 2))):
        out = _launch(x6, coef, scale, silu, torch.empty(want.shape).to(memory_format=torch.channels_last), resize)
        torch.testing.assert_close(out, (want / scale).clamp(-E4M3_MAX, E4M3_MAX), rtol=1e-5, atol=1e-4)
    assert normalize_quantize(x6, coef, scale, silu, up=True).shape == (b, c, 12, 12)
    assert normalize_quantize(x6, coef, scale, silu, down=True).shape == (b, c, 3, 3)
# the e4m3 output on the grid (A a power of two, B zero, x on the grid): exactly torch's bytes
grid = quantize(torch.randn(b, c, h, w) * 4, torch.tensor(1.0)).float().half().to(memory_format=torch.channels_last)
exact = torch.stack([torch.full((b, c), 0.25), torch.zeros(b, c)], dim=-1).contiguous()
q = normalize_quantize(grid, exact, torch.tensor(2.0 ** -6), False)
assert q.dtype == E4M3 and q.shape == grid.shape and q.is_contiguous(memory_format=torch.channels_last)
ref = quantize(grid.float() * 0.25, torch.tensor(2.0 ** -6))
assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
print("ok")
"""


def test_the_quantising_normalisation_gives_torchs_values_in_e4m3():
    """`normalize_quantize` in Triton's interpreter: SiLU?(x · A + B) / scale per sample and
    channel, saturated at ±448, channels-last out, also written 2x up and 2x2-averaged down; on the
    e4m3 grid, torch's quantised bytes."""
    run_interpreted(NORMALIZE_CHECK)


def test_the_quantising_normalisation_refuses_what_it_does_not_take():
    """Off the GPU (no interpreter), or an NCHW map, or coefficients of the wrong shape: a clear
    ValueError before any kernel."""
    pytest.importorskip("triton")
    from models.fp8.normalize_kernel import normalize_quantize, serves

    x = torch.randn(1, 16, 4, 4).to(memory_format=torch.channels_last)
    coef = torch.zeros(1, 16, 2)
    assert not serves(x)  # a CPU tensor without the interpreter
    with pytest.raises(ValueError, match="channels-last"):
        normalize_quantize(x, coef, torch.tensor(1.0), False)
    with pytest.raises(ValueError, match="channels-last"):
        normalize_quantize(torch.randn(1, 16, 4, 4), coef, torch.tensor(1.0), False, down=True)


def test_the_norm_writes_e4m3_only_for_a_calibrated_convolution_on_cutlass():
    """`Fp8Conv.quantized_input_scale`: None for a convolution still measuring its scale, while
    calibrating, off CUDA, or without the CUTLASS kernel (here: none built); `group_norm_e4m3`
    stands aside without the extension; the option is off by default (not yet measured)."""
    from models.fused.norms import group_norm_e4m3
    from models.layers import GroupNorm32

    layer = Fp8Conv.from_float(nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(1, 32, 8, 8).to(memory_format=torch.channels_last)
    assert layer.quantized_input_scale(x) is None  # not calibrated
    layer.set_input_scale(0.01)
    assert layer.quantized_input_scale(x) is None  # a CPU map, no CUTLASS kernel
    layer.observing = True
    assert layer.quantized_input_scale(x) is None
    assert group_norm_e4m3(GroupNorm32(32, True), x, torch.tensor(0.01)) is None
    assert FusedOptions().norm_writes_e4m3 is True
