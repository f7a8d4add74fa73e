"""`models.implicit_conv`'s configuration choice, with the CUTLASS extension stood in for (it is
GPU-only): a kind's configurations by name, the persistent-kernel ones unless `PERSISTENT` is off,
the stream-K ones again per split count of `SPLITS`, and each entry's name."""

from __future__ import annotations

from types import SimpleNamespace

import torch

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
