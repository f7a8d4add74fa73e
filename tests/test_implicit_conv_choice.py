"""`models.implicit_conv`'s configuration choice, with the CUTLASS extension stood in for (it is
GPU-only): a kind's configurations by name, the persistent-kernel ones unless `PERSISTENT` is off,
the stream-K ones again per split count of `SPLITS`, and each entry's name; the convolution as
one explicit product (`conv2d_as_gemm`, torch alone, so tested on the CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models import implicit_conv

NAMES = ["f16_128x128x64_c1x1", "e4m3_128x128x128_c1x1", "f16_256x128x64_c1x1_persistent",
         "e4m3_256x128x128_c1x1_persistent", "f16_128x160x64_c1x1_streamk_persistent"]
STREAM_K = [4]
EXTENSION = SimpleNamespace(configs=lambda: NAMES, split_configs=lambda: STREAM_K)


def test_the_persistent_configurations_join_the_choice_unless_switched_off(monkeypatch):
    assert implicit_conv.PERSISTENT  # on by default
    monkeypatch.setattr(implicit_conv.cpp_ext, "cutlass_conv", EXTENSION)
    monkeypatch.setattr(implicit_conv, "PERSISTENT", False)
    assert implicit_conv._configs("f16") == [0] and implicit_conv._configs("e4m3") == [1]
    monkeypatch.setattr(implicit_conv, "PERSISTENT", True)
    assert implicit_conv._configs("f16") == [0, 2, 4] and implicit_conv._configs("e4m3") == [1, 3]


def test_split_counts_add_the_stream_k_configurations_once_per_count(monkeypatch):
    assert implicit_conv.SPLITS == ()  # none by default
    monkeypatch.setattr(implicit_conv.cpp_ext, "cutlass_conv", EXTENSION)
    monkeypatch.setattr(implicit_conv, "SPLITS", (2, 8))
    assert implicit_conv._configs("f16") == [0, 2, 4, (4, 2), (4, 8)]
    assert implicit_conv._configs("e4m3") == [1, 3]  # no stream-K configuration of that kind
    monkeypatch.setattr(implicit_conv, "PERSISTENT", False)  # the stream-K ones are persistent: out with them
    assert implicit_conv._configs("f16") == [0]
    assert [implicit_conv.describe(e) for e in (implicit_conv.CUDNN, 2, (4, 8))] == [
        "cudnn", "f16_256x128x64_c1x1_persistent", "f16_128x160x64_c1x1_streamk_persistent_split8"]
    assert implicit_conv._split((4, 8)) == (4, 8) and implicit_conv._split(2) == (2, 0)


def test_a_residual_fits_only_as_the_convolutions_fp16_channels_last_output():
    """`residual_fits`: the output's shape (stride 1, the padding given), fp16, channels-last,
    aligned; `conv2d_residual` stands aside (None) where the kernel does not serve (here: a CPU
    map); the option that uses it is off until measured."""
    from models.fused import FusedOptions

    cl = torch.channels_last
    x = torch.randn(2, 32, 8, 8).half().to(memory_format=cl)
    w = torch.randn(16, 32, 3, 3).half().to(memory_format=cl)
    out = torch.randn(2, 16, 8, 8).half().to(memory_format=cl)
    assert implicit_conv.residual_fits(out, x, w, 1) and implicit_conv.residual_fits(out, x, w, (1, 1))
    assert not implicit_conv.residual_fits(out, x, w, 0)  # a 6 x 6 output
    assert not implicit_conv.residual_fits(out.float(), x, w, 1)
    assert not implicit_conv.residual_fits(out.contiguous(), x, w, 1)  # NCHW
    assert not implicit_conv.residual_fits(torch.randn(2, 8, 8, 8).half().to(memory_format=cl), x, w, 1)
    assert implicit_conv.conv2d_residual(x, w, None, 1, out) is None
    assert FusedOptions().residual_in_conv is False


@pytest.mark.parametrize(("batch", "cin", "cout", "taps", "hw", "padding"),
                         [(2, 16, 24, 3, (8, 8), 1), (1, 8, 16, 3, (5, 7), 1), (3, 8, 8, 3, (6, 6), 0),
                          (2, 16, 8, 1, (4, 4), 0)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_gemm_way_gives_torchs_convolution(batch, cin, cout, taps, hw, padding, with_bias):
    """`conv2d_as_gemm`: the gathered neighbourhoods times the weight's [K, kh·kw·C] view, zeros in
    the padding, non-square maps, 1×1 and 3×3 kernels, with and without bias, channels-last out;
    within float32 rounding of float64's convolution, and a weight with its taps transposed does
    not pass (the tap order is checked, not just the sums)."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(batch, cin, *hw).to(memory_format=cl)
    w = torch.randn(cout, cin, taps, taps).to(memory_format=cl)
    bias = torch.randn(cout) if with_bias else None
    want = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), padding=padding)
    got = implicit_conv.conv2d_as_gemm(x, w, bias, padding)
    assert got.shape == want.shape and got.is_contiguous(memory_format=cl)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    if taps > 1:
        swapped = implicit_conv.conv2d_as_gemm(x, w.transpose(2, 3).contiguous(memory_format=cl), bias, padding)
        assert (swapped.double() - want).abs().max() > 1e-2 * want.abs().max()

