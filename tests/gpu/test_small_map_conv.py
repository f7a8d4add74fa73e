"""The small-map convolution kernel (`cpp_ext.kernels.small_map_conv`, `models.small_map_conv`)
against float32 convolutions on the decoder's small maps: every entry (block width × split
count), with and without bias, row tiles full, partial and several, 3×3, 2×2 and 1×1 kernels,
non-square maps; the same bits on a repeat and from a CUDA-graph replay; after a norm kernel that
lets it start early (programmatic dependent launch); inside the fp16 race; clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models import implicit_conv, small_map_conv
from models.small_map_conv import SmallMap
from tests.gpu.common import needs_kernel, rel

needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                  reason="small_map_conv needs a Hopper (sm_90) GPU (thread-block clusters)")
pytestmark = [pytest.mark.gpu, needs_kernel, needs_hopper]

CL = torch.channels_last
TOLERANCE = 2e-3  # fp16 output against float32 accumulation: a few of the output's rounding steps


def operands(batch: int, cin: int, cout: int, hw: tuple[int, int], kernel: tuple[int, int], seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, cin, *hw, device="cuda", generator=g).half().to(memory_format=CL)
    w = (torch.randn(cout, cin, *kernel, device="cuda", generator=g) / (cin * kernel[0] * kernel[1]) ** 0.5)
    return x, w.half().to(memory_format=CL), torch.randn(cout, device="cuda", generator=g).half()


def reference(x, w, bias, padding) -> torch.Tensor:
    return F.conv2d(x.float(), w.float(), None if bias is None else bias.float(), padding=padding)


SHAPES = [  # batch, cin, cout, map, kernel, padding: the decoder's at the guided batch, then edge cases
    (2, 1280, 1280, (8, 8), (3, 3), (1, 1)),    # one full row tile
    (2, 2560, 1280, (8, 8), (3, 3), (1, 1)),
    (2, 960, 960, (16, 16), (3, 3), (1, 1)),    # four row tiles, 64-wide blocks only
    (2, 1280, 5120, (8, 8), (2, 2), (1, 1)),    # an up block's folded convolution: 9 × 9 out, 162 rows
    (3, 128, 64, (5, 7), (3, 3), (1, 1)),       # a partial tile, a non-square map, few K steps
    (1, 256, 128, (6, 6), (1, 1), (0, 0)),      # 1×1: 4 K steps
]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize(("batch", "cin", "cout", "hw", "kernel", "padding"), SHAPES)
def test_every_entry_gives_the_convolution(batch, cin, cout, hw, kernel, padding):
    x, w, bias = operands(batch, cin, cout, hw, kernel)
    entries = small_map_conv.entries_for(tuple(x.shape), tuple(w.shape), padding)
    assert entries and all(cout % e.features == 0 for e in entries)
    for entry in (*entries, SmallMap(entries[0].features, 1)):  # and the K loop in one part
        for b in (bias, None):
            want = reference(x, w, b, padding)
            got = small_map_conv.conv2d(entry, x, w, b, padding)
            assert got.shape == want.shape and got.dtype == torch.float16 and got.is_contiguous(memory_format=CL)
            assert rel(got, want) <= TOLERANCE, (entry, b is None)
    # the taps' order matters: the same weight with its taps mirrored gives another convolution
    if kernel != (1, 1):
        mirrored = w.flip(2, 3).contiguous(memory_format=CL)
        assert rel(small_map_conv.conv2d(entries[0], x, mirrored, None, padding), reference(x, w, None, padding)) > 0.1


def test_the_ring_of_stages_changes_no_bit():
    """The stage count only changes how far ahead operands are requested: the same products in the
    same order, so 3, 4 and 6 stages give the same bits (and bad counts are refused)."""
    x, w, bias = operands(2, 2240, 1280, (8, 8), (3, 3))
    for features, splits in ((128, 8), (64, 4), (64, 6)):
        outs = [small_map_conv.conv2d(SmallMap(features, splits, stages), x, w, bias, (1, 1)) for stages in (3, 4, 6)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]), (features, splits)
    with pytest.raises(RuntimeError, match="stages must be 3, 4 or 6"):
        cpp_ext.kernels.small_map_conv(x, w, None, 1, 1, 128, 8, 5)


def test_repeats_and_graph_replays_give_the_same_bits():
    x, w, bias = operands(2, 1280, 1280, (8, 8), (3, 3))
    for entry in small_map_conv.entries_for(tuple(x.shape), tuple(w.shape), (1, 1)):
        eager = small_map_conv.conv2d(entry, x, w, bias, (1, 1))
        assert torch.equal(eager, small_map_conv.conv2d(entry, x, w, bias, (1, 1))), entry
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = small_map_conv.conv2d(entry, x, w, bias, (1, 1))
        out.fill_(0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), entry


@pytest.mark.usefixtures("no_tf32")
def test_after_a_norm_that_lets_it_start_early():
    """The norm kernel allows its dependants to start (pdl.cuh): the convolution must wait for its
    output before reading it, eagerly and in a graph replay with new inputs."""
    x0, w, _ = operands(2, 1280, 1280, (8, 8), (3, 3))
    gamma, beta = torch.rand(1280, device="cuda").half() + 0.5, torch.randn(1280, device="cuda").half()
    entry = SmallMap(128, 8)

    def chain(x):
        h = cpp_ext.kernels.group_norm(x, 32, gamma, beta, silu=True)
        return h, small_map_conv.conv2d(entry, h, w, None, (1, 1))

    h, got = chain(x0)
    assert rel(got, reference(h, w, None, (1, 1))) <= TOLERANCE
    static = x0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_out, out = chain(static)
    x1 = operands(2, 1280, 1280, (8, 8), (3, 3), seed=1)[0]
    static.copy_(x1)
    graph.replay()
    torch.cuda.synchronize()
    want_h, want = chain(x1)
    assert torch.equal(h_out, want_h) and torch.equal(out, want)


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.skipif(cpp_ext.cutlass_conv is None, reason="the race runs where the CUTLASS convolution is built")
def test_the_race_offers_it_on_small_maps_and_keeps_whatever_is_fastest(monkeypatch):
    monkeypatch.setattr(implicit_conv, "SMALL_MAP", True)  # off by default
    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv.conv_choices, "save", lambda *a, **k: None)
    monkeypatch.setattr(implicit_conv.conv_choices, "load", lambda *a, **k: {})
    x, w, _ = operands(2, 1280, 1280, (8, 8), (3, 3))
    seen = []
    race = implicit_conv.race_timing.graph_times

    def spy(entries, launch, ops, **kw):
        seen.extend(entries)
        times = race(entries, launch, ops, **kw)
        assert set(small_map_conv.ENTRIES) <= set(times)  # each agreed with cuDNN's output and was timed
        return times

    monkeypatch.setattr(implicit_conv.race_timing, "graph_times", spy)
    got = implicit_conv.conv2d(x, w, None, 1)
    assert set(small_map_conv.ENTRIES) <= set(seen) and implicit_conv.CUDNN in seen
    assert rel(got, reference(x, w, None, (1, 1))) <= TOLERANCE
    # a small-map choice takes no residual: conv2d_residual stands aside for the caller's join
    monkeypatch.setattr(implicit_conv, "_best", {("f16", tuple(x.shape), tuple(w.shape), (1, 1)): SmallMap(128, 8)})
    assert implicit_conv.conv2d_residual(x, w, None, 1, torch.zeros_like(got)) is None
    assert torch.equal(implicit_conv.conv2d(x, w, None, 1), small_map_conv.conv2d(SmallMap(128, 8), x, w, None, (1, 1)))


@pytest.mark.parametrize(("cin", "cout", "features", "splits", "message"), [
    (96, 128, 128, 4, "multiple of 64"),
    (128, 96, 128, 4, "multiple of 128"),
    (128, 128, 32, 4, "64 or 128"),
    (128, 128, 128, 9, "splits"),
    (64, 128, 128, 8, "splits"),  # 1×1 of 64 channels: one K step
])
def test_bad_arguments_are_refused_clearly(cin, cout, features, splits, message):
    x = torch.randn(2, cin, 8, 8, device="cuda").half().to(memory_format=CL)
    w = torch.randn(cout, cin, 1 if cin == 64 else 3, 1 if cin == 64 else 3, device="cuda").half().to(memory_format=CL)
    pad = 0 if cin == 64 else 1
    with pytest.raises(RuntimeError, match=message):
        cpp_ext.kernels.small_map_conv(x, w, None, pad, pad, features, splits)
    with pytest.raises(RuntimeError, match="channels-last"):
        cpp_ext.kernels.small_map_conv(x.contiguous(), w, None, 1, 1, 128, 4)
