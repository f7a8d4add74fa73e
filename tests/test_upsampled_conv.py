"""`models.fused.upsampled_conv`: a 3×3 convolution of a nearest-2x-upsampled map as the folded
2×2 convolution of the map before upsampling, against the convolution of the upsampled map (in
float64, exact up to summation order); the fused UNet taking that route (`FusedOptions.
fold_upsampling`, the default) is checked in `tests/test_fused_path.py`, in fp16 on CUTLASS and
cuDNN in `tests/gpu/test_upsampled_conv.py`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.fused import FusedOptions, upsampled_conv

PLAIN = FusedOptions(fold_upsampling=True, cutlass_convs=False)


def _reference(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(y, scale_factor=2, mode="nearest"), weight, padding=1)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), channels=st.integers(1, 5), out=st.integers(1, 5), height=st.integers(1, 6),
       width=st.integers(1, 6), channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_the_folded_convolution_is_the_convolution_of_the_upsampled_map(batch, channels, out, height, width,
                                                                       channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64)
    weight = torch.randn(out, channels, 3, 3, generator=g, dtype=torch.float64)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    got = upsampled_conv.conv_of_upsampled(y, upsampled_conv.fold_weights(weight), PLAIN)
    ref = _reference(y, weight)
    assert got.shape == ref.shape == (batch, out, 2 * height, 2 * width)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("channels", "unit"), [(8, torch.complex128), (12, torch.int64), (6, torch.int32),
                                              (3, torch.int16)])
def test_the_interleave_moves_the_widest_unit_the_channels_fill(channels, unit):
    """fp16 maps: the phases interleaved as 16-, 8-, 4- or 2-byte elements, as the channel count
    allows, every value where the phase rule puts it."""
    out = torch.randn(2, 4 * channels, 4, 6).half().contiguous(memory_format=torch.channels_last)
    assert upsampled_conv._unit(out.permute(0, 2, 3, 1), channels) == unit
    got = upsampled_conv.interleave(out)
    want = torch.empty(2, channels, 6, 10, dtype=torch.float16)
    for a, b in upsampled_conv.PHASES:
        slot = upsampled_conv.PHASES.index((a, b))
        want[:, :, a::2, b::2] = out[:, slot * channels:(slot + 1) * channels, a:a + 3, b:b + 5]
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)


def test_the_folded_weights_are_the_phases_sums_rounded_once():
    """fp16 weights: each folded tap is the float64 sum of the 3×3 taps it holds, rounded once to
    fp16 (summing in fp16 would round up to three times)."""
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(16, 8, 3, 3, generator=g) * 0.1).half()
    folded = upsampled_conv.fold_weights(weight)
    assert folded.shape == (64, 8, 2, 2) and folded.dtype == torch.float16
    w = weight.double()
    # phase (1, 0): rows [w0 + w1, w2], columns [w0, w1 + w2]; its kernels are the third K-block
    tap = folded[32:48, :, 0, 1].double()
    exact = w[:, :, 0, 1] + w[:, :, 0, 2] + w[:, :, 1, 1] + w[:, :, 1, 2]
    assert torch.equal(tap, exact.half().double())
    assert torch.equal(folded[48:, :, 1, 1].double(), w[:, :, 2, 2])  # phase (1, 1)'s corner: one tap, no sum


def test_only_plain_3x3_convolutions_padded_by_one_are_folded():
    y = torch.zeros(1, 4, 5, 5)
    assert upsampled_conv.serves(torch.nn.Conv2d(4, 4, 3, padding=1), y)
    for conv in (torch.nn.Conv2d(4, 4, 3, padding=0), torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 3, padding=1,
                 stride=2), torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),
                 torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        assert not upsampled_conv.serves(conv, y)


@torch.no_grad()
def test_the_folded_weights_follow_the_convolutions_weight():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    first = upsampled_conv.folded_weights(conv, torch.float32)
    assert upsampled_conv.folded_weights(conv, torch.float32) is first  # kept
    conv.weight.mul_(2.0)  # written in place: folded again
    again = upsampled_conv.folded_weights(conv, torch.float32)
    torch.testing.assert_close(again, 2 * first)


@pytest.fixture
def fold_race(monkeypatch, tmp_path):
    """`fold_pays` on the CPU: a fresh process's state, the choices file in `tmp_path`, the
    environment named, and the graph race replaced by `times` (way → ms), which also checks that
    both ways it is handed compute the convolution of the upsampled map."""
    from models import conv_choices, implicit_conv, race_timing

    monkeypatch.setattr(upsampled_conv, "_chosen", {})
    monkeypatch.setattr(upsampled_conv, "_loaded", set())
    monkeypatch.setenv(conv_choices.ENV, str(tmp_path / "choices.json"))
    monkeypatch.setattr(implicit_conv, "environment", lambda device: "fake-gpu")
    state = {"times": {"folded": 1.0, "plain": 2.0}, "races": 0}

    def fake_graph_times(ways, launch, operands):
        state["races"] += 1
        sample, upsampled, weight, folded = operands
        outputs = [launch(way, *operands) for way in ways]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs[1], F.conv2d(upsampled, weight, padding=1))
        return dict(state["times"])

    monkeypatch.setattr(race_timing, "graph_times", fake_graph_times)
    return state


def _race_operands(channels: int = 8, side: int = 5):
    g = torch.Generator().manual_seed(5)
    y = torch.randn(2, channels, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    return y, weight, upsampled_conv.fold_weights(weight)


@pytest.mark.parametrize(("folded_ms", "pays"), [(1.0, True), (3.0, False)])
def test_the_fold_runs_where_its_race_finds_it_faster_and_the_choice_is_kept(fold_race, folded_ms, pays):
    fold_race["times"] = {"folded": folded_ms, "plain": 2.0}
    y, weight, folded = _race_operands()
    options = FusedOptions()
    assert upsampled_conv.fold_pays(y, weight, folded, options) is pays
    assert upsampled_conv.fold_pays(y, weight, folded, options) is pays and fold_race["races"] == 1  # kept
    # a new process reads the stored choice instead of racing again
    upsampled_conv._chosen.clear()
    upsampled_conv._loaded.clear()
    fold_race["times"] = {"folded": 2.0 if pays else 1.0, "plain": 1.5}  # would now pick the other way
    assert upsampled_conv.fold_pays(y, weight, folded, options) is pays and fold_race["races"] == 1
    # another shape, or cuDNN alone, races on its own
    y2, weight2, folded2 = _race_operands(side=6)
    upsampled_conv.fold_pays(y2, weight2, folded2, options)
    upsampled_conv.fold_pays(y, weight, folded, FusedOptions(cutlass_convs=False))
    assert fold_race["races"] == 3
