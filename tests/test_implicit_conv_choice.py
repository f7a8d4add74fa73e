"""`models.implicit_conv`'s configuration choice, with the CUTLASS extension stood in for (it is
GPU-only): a kind's configurations by name, the persistent-kernel ones unless `PERSISTENT` is off,
the stream-K ones again per split count of `SPLITS`, and each entry's name."""

from __future__ import annotations

from types import SimpleNamespace

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
