"""The CLI (#29 item 7): an unwritable `-o` is refused before any image is generated, and every
error is one line with a non-zero exit, naming flags as the CLI names them; images are written in
the format their file name asks for, and a name that asks for none is refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.__main__ import main

FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2", "--no-progress"]


@pytest.fixture()
def no_model(monkeypatch):
    """Fails the test if a model is loaded (the refusal must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before -o was checked")

    monkeypatch.setattr("runtime.pipeline.UnCLIP.__init__", refuse)


@pytest.mark.parametrize("where", ["under_a_file", "a_directory", "deep_under_a_file", "proc"])
def test_an_unwritable_output_is_refused_before_anything_runs(tmp_path, capsys, no_model, where):
    (tmp_path / "file").write_text("x")
    target = {"under_a_file": tmp_path / "file" / "out.png", "a_directory": tmp_path,
              "deep_under_a_file": tmp_path / "file" / "a" / "b.png", "proc": "/proc/out.png"}[where]
    assert main(["a cat", "-o", str(target), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: -o ")


def test_errors_name_the_cli_flags(tmp_path, capsys):
    assert main(["a cat", "-o", str(tmp_path / "o.png"), "--decoder-guidance-scale", "1e308", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--decoder-guidance-scale must be at most" in err[0]
    assert main(["a cat", "-o", str(tmp_path / "o.png"), "--num-images", "0", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--num-images" in err[0] and "num_images_per_prompt" not in err[0]


@pytest.mark.parametrize("argv", [
    ["a cat", "-o", "{tmp}/out.txt"],
    ["a cat", "--num-images", "2", "-o", "{tmp}/out.gif2"],
    ["variations", "{tmp}/in.png", "-n", "2", "-o", "{tmp}/v.txt"],
    ["interpolate", "{tmp}/in.png", "{tmp}/in.png", "-o", "{tmp}/i.json"],
    ["text-diff", "{tmp}/in.png", "--from", "a", "--to", "b", "-o", "{tmp}/t.safetensors"],
    ["invert", "{tmp}/in.png", "-o", "{tmp}/z.png"],
    ["variations", "{tmp}/in.png", "-o", "{tmp}"],
])
def test_an_output_name_of_the_wrong_kind_is_refused_before_the_model_loads(tmp_path, capsys, no_model, argv):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "in.png")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: -o "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_images_are_written_in_the_format_their_name_asks_for(tmp_path, capsys):
    assert main(["a red circle", "--num-images", "2", "-o", str(tmp_path / "a.JPG"), "--seed", "3", *FAST]) == 0
    assert main(["a red circle", "-o", str(tmp_path / "b.webp"), "--seed", "3", *FAST]) == 0
    assert main(["a red circle", "-o", str(tmp_path / "c"), "--seed", "3", *FAST]) == 0
    assert main(["a red circle", "-o", str(tmp_path / "d.png"), "--seed", "3", *FAST]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / n) for n in ("a-0.JPG", "a-1.JPG", "b.webp", "c", "d.png")]
    formats = {}
    for name in ("a-0.JPG", "a-1.JPG", "b.webp", "c", "d.png"):
        with Image.open(tmp_path / name) as im:
            formats[name] = (im.format, im.size)
    assert formats == {"a-0.JPG": ("JPEG", (256, 256)), "a-1.JPG": ("JPEG", (256, 256)),
                       "b.webp": ("WEBP", (256, 256)), "c": ("PNG", (256, 256)), "d.png": ("PNG", (256, 256))}
    png = np.asarray(Image.open(tmp_path / "d.png"), dtype=np.float64)
    for lossy in ("a-0.JPG", "b.webp"):  # the same seed's image, through a lossy format at quality 95
        assert np.abs(np.asarray(Image.open(tmp_path / lossy), dtype=np.float64) - png).mean() < 4.0
