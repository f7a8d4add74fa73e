"""The convolution race's choices kept on disk (`models.conv_choices`, used by
`models.implicit_conv`): the round trip, environments kept apart, a damaged or foreign file ignored
with a warning (never an error), names this build lacks dropped, and a stored choice taken without
racing. The race itself and the file on a GPU: tests/gpu/test_cutlass_conv.py."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

import cpp_ext
from models import conv_choices, implicit_conv

KEY = ("f16", (1, 320, 64, 64), (320, 320, 3, 3), (1, 1))
OTHER = ("e4m3", (2, 640, 32, 32), (640, 640, 3, 3), (1, 1))


def test_choices_come_back_per_environment(tmp_path):
    path = tmp_path / "choices.json"
    conv_choices.save(path, "H100|a", {KEY: "f16_256x160x64_c1x1_persistent"})
    conv_choices.save(path, "H100|a", {OTHER: "e4m3_128x128x128_c1x1"})  # merged with the first
    conv_choices.save(path, "H200|b", {KEY: "cudnn"})
    assert conv_choices.load(path, "H100|a") == {KEY: "f16_256x160x64_c1x1_persistent",
                                                 OTHER: "e4m3_128x128x128_c1x1"}
    assert conv_choices.load(path, "H200|b") == {KEY: "cudnn"}
    assert conv_choices.load(path, "A100|c") == {}
    assert conv_choices.load(None, "H100|a") == {}
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left behind


@pytest.mark.parametrize("damage", ["edited", "truncated", "not json", "wrong format"])
def test_a_damaged_file_is_ignored_with_a_warning_and_then_replaced(tmp_path, caplog, damage):
    path = tmp_path / "choices.json"
    conv_choices.save(path, "env", {KEY: "cudnn"})
    text = path.read_text()
    if damage == "edited":  # a choice changed by hand: the checksum no longer matches
        data = json.loads(text)
        data["environments"]["env"][conv_choices.shape_key(KEY)] = "f16_128x64x64_c1x1"
        path.write_text(json.dumps(data))
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "not json":
        path.write_bytes(b"\x00\xff garbage")
    else:
        data = json.loads(text)
        data["format"] = 99
        path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="models.conv_choices"):
        assert conv_choices.load(path, "env") == {}
    assert "ignoring the convolution choices" in caplog.text
    conv_choices.save(path, "env", {OTHER: "e4m3_128x128x128_c1x1"})  # a fresh, verifying file
    assert conv_choices.load(path, "env") == {OTHER: "e4m3_128x128x128_c1x1"}


def test_the_cache_path_follows_the_environment_variable(tmp_path, monkeypatch):
    for off in ("", "off", "OFF", "0"):
        monkeypatch.setenv(conv_choices.ENV, off)
        assert conv_choices.cache_path() is None
    monkeypatch.setenv(conv_choices.ENV, str(tmp_path / "c.json"))
    assert conv_choices.cache_path() == tmp_path / "c.json"
    monkeypatch.delenv(conv_choices.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert conv_choices.cache_path() == tmp_path / "unclip-rt" / "conv_choices.json"


def test_an_unwritable_place_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="models.conv_choices"):
        conv_choices.save(blocker / "choices.json", "env", {KEY: "cudnn"})  # a file where a folder should be
    assert "could not write" in caplog.text


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """implicit_conv as on a GPU with three configurations built (names only), its stored choices
    in a file of this test's, its own state fresh."""
    names = ["f16_128x128x64_c1x1", "f16_256x160x64_c1x1_persistent", "e4m3_128x128x128_c1x1"]
    monkeypatch.setattr(cpp_ext, "cutlass_conv", SimpleNamespace(configs=lambda: names, split_configs=lambda: []))
    monkeypatch.setattr(implicit_conv, "environment", lambda device: "fake-gpu")
    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv, "_loaded", set())
    monkeypatch.setenv(conv_choices.ENV, str(tmp_path / "choices.json"))
    return tmp_path / "choices.json"


def test_a_stored_choice_is_taken_without_racing(fake_build):
    """A later process: the shape's stored choice runs, no candidate is timed; cuDNN's entry
    stored for fp16 comes back as cuDNN's."""
    conv_choices.save(fake_build, "fake-gpu", {KEY: "f16_256x160x64_c1x1_persistent",
                                               ("f16", (2, 64, 8, 8), (64, 64, 3, 3), (1, 1)): "cudnn"})
    raced = []

    def launch(entry, *operands):
        raced.append(entry)

    operands = (torch.empty(1), torch.empty(1))
    assert implicit_conv._fastest("f16", KEY[1:], launch, operands, others=(implicit_conv.CUDNN,)) == 1
    assert implicit_conv._fastest("f16", ((2, 64, 8, 8), (64, 64, 3, 3), (1, 1)), launch, operands,
                                  others=(implicit_conv.CUDNN,)) == implicit_conv.CUDNN
    assert raced == []


def test_stored_names_this_build_lacks_are_dropped(fake_build):
    """A configuration no longer built, cuDNN stored for an e4m3 shape, or a kind's name under
    another kind: not taken (those shapes would race again)."""
    conv_choices.save(fake_build, "fake-gpu", {
        KEY: "f16_999x999x64_gone", OTHER: "cudnn",
        ("e4m3", (1, 320, 32, 32), (320, 320, 3, 3), (1, 1)): "f16_128x128x64_c1x1"})
    implicit_conv._load_stored("fake-gpu")
    assert implicit_conv._best == {}
    conv_choices.save(fake_build, "fake-gpu", {OTHER: "e4m3_128x128x128_c1x1"})
    implicit_conv._loaded.clear()
    implicit_conv._load_stored("fake-gpu")
    assert implicit_conv._best == {OTHER: 2}


@pytest.mark.parametrize("timing", ["eager", "graph"])
def test_a_new_shape_is_timed_the_race_timing_way_and_its_fastest_stored(fake_build, monkeypatch, timing):
    """A shape with no stored choice: `_fastest` hands every candidate (cuDNN first) and the
    operands to the timer `RACE_TIMING` names, keeps the entry it timed fastest, and stores that
    entry's name; the other timer is not called."""
    calls = []

    def timer(name, times):
        def timed(entries, launch, operands, accept=None):
            calls.append((name, list(entries), operands))
            assert all(accept(entry, launch(entry, *operands)) for entry in entries)  # they all agree here
            return {entry: times[entry] for entry in entries}
        return timed

    monkeypatch.setattr(implicit_conv.race_timing, "eager_times", timer("eager", {-1: 3.0, 0: 2.0, 1: 1.0}))
    monkeypatch.setattr(implicit_conv.race_timing, "graph_times", timer("graph", {-1: 1.0, 0: 2.0, 1: 3.0}))
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", timing)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    operands = (torch.empty(2), torch.empty(3))
    chosen = implicit_conv._fastest("f16", KEY[1:], lambda entry, *ops: torch.ones(4), operands,
                                    others=(implicit_conv.CUDNN,))
    assert [(name, entries) for name, entries, _ in calls] == [(timing, [implicit_conv.CUDNN, 0, 1])]
    assert calls[0][2] is operands
    assert chosen == (1 if timing == "eager" else implicit_conv.CUDNN)
    assert conv_choices.load(fake_build, "fake-gpu") == {KEY: "f16_256x160x64_c1x1_persistent" if timing == "eager"
                                                         else "cudnn"}


def test_the_race_timing_is_part_of_the_stored_choices_environment(monkeypatch):
    """Choices raced one way are not taken by a process that races the other way."""
    props = SimpleNamespace(name="H200", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    monkeypatch.setattr(cpp_ext, "cutlass_conv", SimpleNamespace(configs=lambda: ["f16_a"], split_configs=lambda: []))
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", "eager")
    eager = implicit_conv.environment("cuda")
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", "graph")
    assert implicit_conv.environment("cuda") != eager and "race graph" in implicit_conv.environment("cuda")


@pytest.mark.parametrize("wrong", [torch.full((4,), 1.02), torch.tensor([1.0, 1.0, float("nan"), 1.0]), -torch.ones(4)])
def test_an_entry_whose_output_does_not_agree_with_cudnns_is_left_out_of_the_race(fake_build, monkeypatch, wrong):
    """The race checks each fp16 entry's first output against cuDNN's on the same operands: one
    off by more than `AGREEMENT` of the output's largest value (or with a NaN) never races, however
    fast, and a warning names it; one within it races."""
    outputs = {implicit_conv.CUDNN: torch.ones(4), 0: torch.full((4,), 1.005), 1: wrong}
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", "eager")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    launch = lambda entry, *ops: outputs[entry]  # noqa: E731
    monkeypatch.setattr(implicit_conv.race_timing, "eager_times", lambda entries, launch, operands, accept=None: {
        entry: {implicit_conv.CUDNN: 3.0, 0: 2.0, 1: 1.0}[entry] for entry in entries
        if implicit_conv.race_timing._runs(launch, entry, operands, accept)})
    with pytest.warns(UserWarning, match="f16_256x160x64_c1x1_persistent differs from cuDNN"):
        chosen = implicit_conv._fastest("f16", KEY[1:], launch, (torch.empty(2),), others=(implicit_conv.CUDNN,))
    assert chosen == 0  # entry 1 was fastest but wrong
    assert conv_choices.load(fake_build, "fake-gpu")[KEY] == "f16_128x128x64_c1x1"
