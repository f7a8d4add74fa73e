"""`models.implicit_conv`'s configuration choice, with the CUTLASS extension stood in for (it is
GPU-only): a kind's configurations by name, the persistent-kernel ones unless `PERSISTENT` is off."""

from __future__ import annotations

from types import SimpleNamespace

from models import implicit_conv

NAMES = ["f16_128x128x64_c1x1", "e4m3_128x128x128_c1x1", "f16_256x128x64_c1x1_persistent",
         "e4m3_256x128x128_c1x1_persistent"]


def test_the_persistent_configurations_join_the_choice_unless_switched_off(monkeypatch):
    assert implicit_conv.PERSISTENT  # on by default
    monkeypatch.setattr(implicit_conv.cpp_ext, "cutlass_conv", SimpleNamespace(configs=lambda: NAMES))
    monkeypatch.setattr(implicit_conv, "PERSISTENT", False)
    assert implicit_conv._configs("f16") == [0] and implicit_conv._configs("e4m3") == [1]
    monkeypatch.setattr(implicit_conv, "PERSISTENT", True)
    assert implicit_conv._configs("f16") == [0, 2] and implicit_conv._configs("e4m3") == [1, 3]
