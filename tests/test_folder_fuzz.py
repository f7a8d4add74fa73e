"""Fuzzing model and engine folders (#29 item 2 and its acceptance): random byte flips,
truncations, and deleted or retyped JSON keys in any file of the shipped default model's folder
(its `checksums.json` included) and of its engine folder. Every outcome is either the
original image or a documented exception (`IntegrityError`, `ConfigError`, `CheckpointError`,
`EngineError`) whose message names the file or its folder; 200 + 100 examples."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.checkpoint import CheckpointError
from models.config_schema import ConfigError
from models.file_integrity import IntegrityError
from runtime import UnCLIP
from runtime.backends.engines import EngineError
from runtime.pipeline import DEFAULT_MODEL, load_folder

pytestmark = pytest.mark.slow

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2, "seed": 0, "output_type": "pt"}
DOCUMENTED = (IntegrityError, ConfigError, CheckpointError, EngineError)
MODEL_FILES = ("config.json", "model.safetensors", "checksums.json")


def _json_paths(data, prefix=()):
    """Every key path of a JSON object (lists' items included)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield (*prefix, k)
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield (*prefix, i)
            yield from _json_paths(v, (*prefix, i))


def _damage(path: Path, op: str, where: float, replacement) -> None:
    data = path.read_bytes()
    if op == "flip":
        i = min(int(where * len(data)), len(data) - 1)
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    elif op == "truncate":
        path.write_bytes(data[: int(where * len(data))])
    else:  # "delete" or "retype" a key of a JSON file
        obj = json.loads(data)
        keys = list(_json_paths(obj))
        *parent, last = keys[min(int(where * len(keys)), len(keys) - 1)]
        node = obj
        for k in parent:
            node = node[k]
        if op == "delete":
            node.pop(last) if isinstance(node, dict) else node.pop(last)
        else:
            node[last] = replacement
        path.write_text(json.dumps(obj))


def _linked_copy(src: Path, dst: Path, damaged: str) -> None:
    """`src` into `dst`: hard links for the files left alone, a real copy of the one to damage."""
    dst.mkdir()
    for f in src.iterdir():
        (shutil.copy2 if f.name == damaged else os.link)(f, dst / f.name)


def _damaged_outcome(source: Path, name: str, target: str, op: str, where: float, replacement, run) -> None:
    """Damage `target` in a copy of `source`, then `run(folder)`: it must give the reference result
    (it asserts that itself) or raise a documented error naming the folder's file."""
    if op in ("delete", "retype") and not target.endswith(".json"):
        op = "flip"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        _linked_copy(source, folder, target)
        _damage(folder / target, op, where, replacement)
        try:
            run(folder)
        except DOCUMENTED as exc:
            assert str(folder) in str(exc), exc


@pytest.fixture(scope="module")
def reference_image():
    return UnCLIP(device="cpu", progress=False).generate("a red circle", **FAST).images


OPS = st.sampled_from(["flip", "truncate", "delete", "retype"])
WHERE = st.floats(0, 1, allow_nan=False)
REPLACEMENT = st.sampled_from(["32", None, [], {}, True, -1, 1e308, "x" * 3])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(MODEL_FILES), op=OPS, where=WHERE, replacement=REPLACEMENT)
def test_a_damaged_model_folder_gives_the_image_or_a_documented_error(reference_image, target, op, where,
                                                                     replacement):
    def run(folder: Path) -> None:
        model = load_folder(folder)
        images = UnCLIP(model, device="cpu", progress=False).generate("a red circle", **FAST).images
        assert torch.equal(images, reference_image)

    _damaged_outcome(DEFAULT_MODEL, "model", target, op, where, replacement, run)


@pytest.fixture(scope="module")
def engine_reference(default_engine_dir):
    folder = default_engine_dir[0]
    pipe = UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=folder, backend="onnxruntime", device="cpu", progress=False)
    names = sorted(f.name for f in folder.iterdir() if f.is_file())
    return folder, names, pipe.generate("a red circle", **FAST).images


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=WHERE, op=OPS, where=WHERE, replacement=REPLACEMENT)
def test_a_damaged_engine_folder_gives_the_image_or_a_documented_error(engine_reference, pick, op, where,
                                                                       replacement):
    source, names, reference = engine_reference
    target = names[min(int(pick * len(names)), len(names) - 1)]

    def run(folder: Path) -> None:
        pipe = UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=folder, backend="onnxruntime", device="cpu",
                      progress=False)
        assert torch.equal(pipe.generate("a red circle", **FAST).images, reference)

    _damaged_outcome(source, "engines", target, op, where, replacement, run)
