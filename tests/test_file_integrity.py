"""Integrity of what we load (#29 items 2 and 6): each file's SHA-256 recorded when written and
verified on load; swapped graphs, a manifest pointing a stage at another's file, malformed stage
entries and a deeply nested manifest are refused naming the file and the full rebuild command; the
build's check does not call an all-NaN graph exact."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export.check import max_relative_error
from models.file_integrity import IntegrityError, sha256_json
from runtime import UnCLIP
from runtime.backends.engines import EngineError
from runtime.pipeline import DEFAULT_MODEL, load_folder


def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model.safetensors: its content differs .*save_model"):
        UnCLIP(folder, device="cpu")


def _engine_copy(default_engine_dir, tmp_path):
    folder = tmp_path / "engines"
    shutil.copytree(default_engine_dir[0], folder)
    return folder, json.loads((folder / "manifest.json").read_text())


def _reseal(folder, manifest):
    manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = sha256_json(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_swapped_graphs_are_refused_with_the_full_rebuild_command(default_engine_dir, tmp_path):
    folder, _ = _engine_copy(default_engine_dir, tmp_path)
    first, last = folder / "super_res_first.onnx", folder / "super_res_last.onnx"
    a, b = first.read_bytes(), last.read_bytes()
    first.write_bytes(b)
    last.write_bytes(a)
    with pytest.raises(EngineError, match=r"super_res_(first|last).onnx: its content differs.*--out .*--force"):
        UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=folder, backend="onnxruntime", device="cpu")


def test_a_stage_pointed_at_another_stages_graph_is_refused(default_engine_dir, tmp_path):
    folder, manifest = _engine_copy(default_engine_dir, tmp_path)
    manifest["stages"]["prior_step"]["files"] = ["decoder_step.onnx"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="changed after it was written"):
        UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=folder, backend="onnxruntime", device="cpu")
    _reseal(folder, manifest)  # even a consistent manifest: the graph's inputs are not the stage's
    with pytest.raises(EngineError, match=r"decoder_step.onnx: its inputs .* not the prior_step stage's.*--out"):
        UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=folder, backend="onnxruntime", device="cpu")


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"files": []}, "lists no files"), ({}, "lists no files"), (None, "not an object"),
    ({"files": ["prior_step.onnx.data"]}, "has no .onnx graph"),
])
def test_malformed_stage_entries_are_refused(default_engine_dir, tmp_path, entry, fragment):
    folder, manifest = _engine_copy(default_engine_dir, tmp_path)
    manifest["stages"]["prior_step"] = entry
    _reseal(folder, manifest)
    with pytest.raises(EngineError, match=fragment + ".*--out"):
        UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=folder, backend="onnxruntime", device="cpu")


def test_a_deeply_nested_manifest_is_refused(default_engine_dir, tmp_path):
    folder, _ = _engine_copy(default_engine_dir, tmp_path)
    (folder / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(EngineError, match="unreadable"):
        UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=folder, backend="onnxruntime", device="cpu")


def test_the_build_check_is_nan_and_inf_aware():
    ref = np.array([1.0, -np.inf, 2.0])
    assert max_relative_error(np.array([1.0, -np.inf, 2.0]), ref) == 0.0  # the mask bias agrees
    assert max_relative_error(np.full(3, np.nan), ref) == float("inf")
    assert max_relative_error(np.array([1.0, 0.0, 2.0]), ref) == float("inf")
    assert max_relative_error(np.array([1.0, -np.inf, 2.2]), ref) == pytest.approx(0.1)
