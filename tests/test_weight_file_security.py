"""No code runs from a weight file without the explicit opt-in: TorchScript archives (OpenAI's CLIP
format) are read as data, an archive whose classes carry `__setstate__` code and a pickle with a
payload are refused naming the file and the opt-in, and the payloads' marker files never appear.
With `trust_pickle=True` the same files load (the opt-in is real)."""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings

import pytest
import torch

from models.checkpoint import CheckpointError
from models.clip_towers import OpenAIClip
from models.configs import TINY
from models.convert.karlo import load_checkpoint_state, load_karlo
from models.torchscript_archive import read_torchscript_state
from runtime import UnCLIP
from tests.karlo_files import NAMES, write_karlo_folder


class SetstatePayload(torch.nn.Module):
    """A scripted module whose `__setstate__` writes a file: what `torch.jit.load` runs on load."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]
        torch.save(self.weight, state[1])


class PicklePayload:
    """Unpickling this opens (creates) the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _scripted_clip(path) -> dict:
    """Save the tiny CLIP towers as a traced TorchScript archive (OpenAI's release format); return the
    state dict the archive should give."""
    model = OpenAIClip(TINY.clip).eval()
    mask = model._buffers.pop("attn_mask")  # OpenAI's archive keeps the mask as a plain attribute
    model.attn_mask = mask
    model.__class__ = type("TracedClip", (OpenAIClip,), {"forward": lambda self, px: self.visual(px)})
    pixels = torch.zeros(1, 3, TINY.clip.image_size, TINY.clip.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, pixels, check_trace=False).save(str(path))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def karlo_files(ours, tmp_path_factory):
    """A Karlo folder without its CLIP file (each test writes one: a TorchScript archive, as Kakao
    Brain's release has it, or a payload)."""
    return write_karlo_folder(ours.state_dict(), tmp_path_factory.mktemp("karlo_ts"), skip=("clip",))


def test_a_torchscript_archive_reads_as_the_state_dict_jit_load_gives(tmp_path):
    path = tmp_path / "clip.pt"
    expected = _scripted_clip(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit_state = torch.jit.load(str(path)).state_dict()
    state = read_torchscript_state(path)
    assert state.keys() == jit_state.keys() == expected.keys()
    assert all(torch.equal(state[k], jit_state[k]) and torch.equal(state[k], expected[k]) for k in state)


def test_a_karlo_folder_with_a_torchscript_clip_loads_without_jit(karlo_files, tmp_path, monkeypatch):
    folder = tmp_path / "karlo"
    shutil.copytree(karlo_files, folder)
    expected = _scripted_clip(folder / NAMES["clip"])

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called without trust_pickle")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    model = load_karlo(folder, TINY)
    state = model.state_dict()
    assert all(torch.equal(state[f"clip.model.{k}"], v) for k, v in expected.items())


@pytest.mark.parametrize("part", ["clip", "prior"])
def test_a_torchscript_payload_under_a_karlo_name_is_refused_and_never_runs(karlo_files, tmp_path, part):
    folder, marker = tmp_path / "karlo", tmp_path / "MARKER"
    shutil.copytree(karlo_files, folder)
    _scripted_clip(folder / NAMES["clip"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(SetstatePayload(str(marker))).save(str(folder / NAMES[part]))
    with pytest.raises(CheckpointError, match=r"refused because loading it would run .*trust_pickle=True"):
        UnCLIP.from_karlo(folder, device="cpu", progress=False)
    assert not marker.exists()
    # the opt-in is real: the same file loads with it (and its code runs, as the user accepted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_checkpoint_state(folder / NAMES[part], trust_pickle=True)
    assert marker.exists()


def test_a_pickle_payload_under_a_karlo_name_is_refused_in_one_line(karlo_files, tmp_path):
    folder, marker = tmp_path / "karlo", tmp_path / "MARKER"
    shutil.copytree(karlo_files, folder)
    _scripted_clip(folder / NAMES["clip"])
    content = torch.load(folder / NAMES["prior"], weights_only=True)
    content["callback"] = PicklePayload(str(marker))
    torch.save(content, folder / NAMES["prior"])
    with pytest.raises(CheckpointError) as info:
        UnCLIP.from_karlo(folder, device="cpu", progress=False)
    message = str(info.value)
    assert "\n" not in message and "could run code" in message and "trust_pickle=True" in message
    assert "weights_only=False" not in message
    assert not marker.exists()


def test_the_cli_refuses_the_payload_in_one_line_and_names_its_flag(karlo_files, tmp_path, capsys):
    from runtime.__main__ import main

    folder, marker = tmp_path / "karlo", tmp_path / "MARKER"
    shutil.copytree(karlo_files, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(SetstatePayload(str(marker))).save(str(folder / NAMES["clip"]))
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["--karlo", str(folder), "a cat", "-o", str(tmp_path / "out.png"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--trust-pickle" in err[0] and "Traceback" not in err[0]
    assert not marker.exists() and not (tmp_path / "out.png").exists()
