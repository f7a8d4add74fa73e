"""config.json against its schema (#29 item 3): damaged JSON, missing sections, wrong types, head
counts that do not divide widths and unknown keys are refused with a `ConfigError` naming the file
and the key; nothing falls back to a default silently."""

from __future__ import annotations

import json
import shutil

import pytest

from models.config_schema import ConfigError
from runtime import UnCLIP
from runtime.pipeline import DEFAULT_MODEL


@pytest.fixture()
def folder(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, out)
    (out / "checksums.json").unlink()  # the schema's checks, not the recorded hashes' (see test_file_integrity)
    return out


def _edit(folder, change) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("text", "fragment"), [
    ("{not json", "not valid JSON"), ("", "not valid JSON"), ("null", "must be a JSON object"),
    ("[1, 2]", "must be a JSON object"),
])
def test_damaged_files_name_the_file(folder, text, fragment):
    (folder / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=fragment) as info:
        UnCLIP(folder, device="cpu")
    assert "config.json" in str(info.value)


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda d: d["decoder"].pop("diffusion"), "missing key decoder.diffusion"),
    (lambda d: d["decoder"]["diffusion"].pop("prediction"), "missing key decoder.diffusion.prediction"),
    (lambda d: d["decoder"].__setitem__("model_channels", "32"), "decoder.model_channels must be an integer"),
    (lambda d: d["prior"].__setitem__("heads", d["prior"]["width"] + 1),
     "prior.width must be divisible by prior.heads"),
    (lambda d: d["prior"].__setitem__("surprise", 1), r"unknown key\(s\) prior.surprise"),
    (lambda d: d["decoder"]["diffusion"].__setitem__("prediction", "v"), "decoder.diffusion.prediction must be one of"),
    (lambda d: d["clip"].__setitem__("image_mean", [0.5, 0.5]), "clip.image_mean must hold 3 values"),
    (lambda d: d["sampling"].__setitem__("prior_steps", True), "sampling.prior_steps must be an integer"),
    (lambda d: d.__setitem__("decoder", None), "decoder must be a JSON object"),
])
def test_schema_errors_name_the_file_and_key(folder, change, fragment):
    _edit(folder, change)
    with pytest.raises(ConfigError, match=fragment) as info:
        UnCLIP(folder, device="cpu")
    assert "config.json" in str(info.value)


def test_the_cli_prints_a_schema_error_in_one_line(folder, tmp_path, capsys):
    from runtime.__main__ import main

    _edit(folder, lambda d: d["decoder"].pop("diffusion"))
    assert main(["a cat", "--model", str(folder), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing key decoder.diffusion" in err[0]
