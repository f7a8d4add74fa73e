"""The CLI (#29 item 7): an unwritable `-o` is refused before any image is generated, and every
error is one line with a non-zero exit, naming flags as the CLI names them."""

from __future__ import annotations

import pytest

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
