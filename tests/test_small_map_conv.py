"""Which convolutions the small-map kernel's entries are offered for (`models.small_map_conv`) and
how the fp16 race takes them (`models.implicit_conv`), with the extension stood in for (the kernel
is GPU-only; tests/gpu/test_small_map_conv.py runs it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models import implicit_conv, small_map_conv
from models.small_map_conv import ENTRIES, SmallMap

CUTLASS = SimpleNamespace(configs=lambda: ["f16_128x128x64_c1x1"], split_configs=lambda: [])


@pytest.fixture
def built(monkeypatch):
    monkeypatch.setattr(small_map_conv, "built", lambda: True)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(("x", "w", "pad", "want"), [
    ((2, 1280, 8, 8), (1280, 1280, 3, 3), (1, 1), ENTRIES),           # the decoder's 8² map: 128 rows
    ((2, 960, 16, 16), (960, 960, 3, 3), (1, 1), ENTRIES[2:]),        # 960 outputs: 64-wide blocks only
    ((2, 1280, 8, 8), (5120, 1280, 2, 2), (1, 1), ENTRIES),           # a folded up-block convolution: 162 rows
    ((8, 1280, 8, 8), (1280, 1280, 3, 3), (1, 1), ENTRIES),           # four guided images: 512 rows
    ((2, 640, 32, 32), (640, 640, 3, 3), (1, 1), ()),                 # 2048 rows: a map for the GEMM tiles
    ((2, 200, 8, 8), (256, 200, 3, 3), (1, 1), ()),                   # channels not a multiple of 64
    ((2, 256, 8, 8), (256, 256, 1, 1), (0, 0), (SmallMap(128, 4), SmallMap(64, 4))),  # 4 K steps: 4 parts at most
    ((2, 1280, 8, 8), (1280, 1280, 3, 3), (3, 3), ()),                # padding past the kernel
])
def test_entries_fit_the_shape(x, w, pad, want):
    assert small_map_conv.entries_for(x, w, pad) == tuple(want)


def test_nothing_is_offered_where_the_kernel_is_not_built(monkeypatch):
    monkeypatch.setattr(small_map_conv.cpp_ext, "kernels", None)
    assert not small_map_conv.built()
    assert small_map_conv.entries_for((2, 1280, 8, 8), (1280, 1280, 3, 3), (1, 1)) == ()
    assert small_map_conv.of_name("small_map_128x8") is None


@pytest.mark.usefixtures("built")
def test_entries_go_by_name_both_ways_and_the_environment_says_whether_they_race(monkeypatch):
    assert implicit_conv.SMALL_MAP is False  # off until measured on a GPU
    monkeypatch.setattr(implicit_conv, "SMALL_MAP", True)
    monkeypatch.setattr(implicit_conv.cpp_ext, "cutlass_conv", CUTLASS)
    for entry in ENTRIES:
        name = implicit_conv.describe(entry)
        assert name == entry.name and implicit_conv._entry_of(name, "f16") == entry
        assert implicit_conv._entry_of(name, "e4m3") is None  # an fp16 kernel
    assert implicit_conv._entry_of("small_map_96x3", "f16") is None
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(name="GPU", major=9, minor=0))
    on = implicit_conv.environment(torch.device("cpu"))
    monkeypatch.setattr(implicit_conv, "SMALL_MAP", False)
    off = implicit_conv.environment(torch.device("cpu"))
    assert on != off and "small map True" in on and "small map False" in off
    assert implicit_conv._entry_of("small_map_128x8", "f16") is None  # a stored choice not raced now


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("small_map", [True, False])
def test_the_fp16_race_holds_the_entries_that_fit_only_while_switched_on(monkeypatch, small_map):
    monkeypatch.setattr(implicit_conv, "SMALL_MAP", small_map)
    offered = {}

    def fastest(kind, key, launch, operands, others=()):
        offered[key] = others
        return others[-1]

    monkeypatch.setattr(implicit_conv, "_fastest", fastest)
    cl = torch.channels_last
    x = torch.randn(2, 128, 8, 8).half().to(memory_format=cl)
    w = torch.randn(128, 128, 3, 3).half().to(memory_format=cl)
    entry, _ = implicit_conv._f16_choice(x, w, None, (1, 1))
    others = offered[((2, 128, 8, 8), (128, 128, 3, 3), (1, 1))]
    assert others[0] == implicit_conv.CUDNN  # the fallback, first
    assert others[1:] == (ENTRIES if small_map else ())
    assert entry == (ENTRIES[-1] if small_map else implicit_conv.CUDNN)
