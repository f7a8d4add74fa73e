"""Shared fixtures: a tiny diffusers unCLIP pipeline (the reference) saved as a diffusers
folder, and our `UnCLIPModel` converted from that folder. Built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# The convolution race's choices are not read from or written to the user's cache by the tests
# (each test that exercises the cache names its own file).
os.environ.setdefault("UNCLIP_RT_CONV_CACHE", "off")

from models.configs import TINY
from models.convert.diffusers_folder import load_diffusers


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def diffusers_folder(tmp_path_factory):
    """(pipeline, folder): a tiny random diffusers UnCLIPPipeline and where it was saved."""
    from tests.diffusers_reference import build_pipeline

    root = tmp_path_factory.mktemp("diffusers")
    pipe = build_pipeline(TINY, root / "tok")
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return pipe, root / "pipe"


@pytest.fixture(scope="session")
def diffusers_pipe(diffusers_folder):
    return diffusers_folder[0]


@pytest.fixture(scope="session")
def ours(diffusers_folder):
    """Our UnCLIPModel converted from the saved diffusers folder (float32, CPU, eval)."""
    return load_diffusers(diffusers_folder[1]).eval()


@pytest.fixture(scope="session")
def default_engine_dir(tmp_path_factory):
    """(folder, printed summary): the shipped default model exported by `python -m export.build_engines`."""
    import contextlib
    import io

    from export.build_engines import main

    out = tmp_path_factory.mktemp("engines") / "default"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--model", "default", "--out", str(out)]) == 0
    return out, printed.getvalue()


@pytest.fixture
def unbiased_fp8_calls(monkeypatch):
    """The FP8 layers (`models.fp8.layers.Fp8Conv`) called without their bias while the test
    runs, in call order: the fused path's calls (`forward(..., with_bias=False)`, `rows(..., False)`)."""
    from models.fp8 import layers as fp8_layers

    calls = []
    forward, rows = fp8_layers.Fp8Conv.forward, fp8_layers.Fp8Conv.rows

    def spy_forward(self, *args, with_bias=True, **kwargs):
        if not with_bias:
            calls.append(self)
        return forward(self, *args, with_bias=with_bias, **kwargs)

    def spy_rows(self, x, with_bias=True):
        if not with_bias:
            calls.append(self)
        return rows(self, x, with_bias)

    monkeypatch.setattr(fp8_layers.Fp8Conv, "forward", spy_forward)
    monkeypatch.setattr(fp8_layers.Fp8Conv, "rows", spy_rows)
    return calls


@pytest.fixture
def keys_around_made(monkeypatch):
    """A list that grows by one each time a `models.fused.keys_around.KeysAround` layout is made."""
    from models.fused import keys_around

    made = []
    real_init = keys_around.KeysAround.__init__

    def counted(self, *args, **kwargs):
        made.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(keys_around.KeysAround, "__init__", counted)
    return made
