"""Runtime backends through the public `UnCLIP` API: the ONNX Runtime engines of the shipped
default model give the torch image for the same seed; `auto` picks a backend; stale, foreign,
half-built or damaged engine folders are refused with the command that rebuilds."""

from __future__ import annotations

import copy
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from export import build_engines
from runtime import UnCLIP
from runtime.backends.engines import EngineError, EngineFolder
from runtime.pipeline import DEFAULT_MODEL, load_folder
from tests.metrics import psnr

PROMPTS = ["a red circle on a blue background", "a small green square"]


@pytest.fixture(scope="module")
def default_model():
    return load_folder(DEFAULT_MODEL)


def test_onnxruntime_backend_gives_the_torch_image_for_the_same_seed(default_engine_dir, default_model):
    folder, _ = default_engine_dir
    on_torch = UnCLIP(copy.deepcopy(default_model), backend="torch", device="cpu", progress=False)
    on_ort = UnCLIP(copy.deepcopy(default_model), engine_dir=folder, backend="onnxruntime", device="cpu",
                    progress=False)
    assert on_ort.model is None and {type(e).__name__ for e in on_ort.engines.values()} == {"OnnxRuntimeEngine"}
    a = on_torch.generate(PROMPTS, seed=11, output_type="pt", return_image_embeds=True)
    b = on_ort.generate(PROMPTS, seed=11, output_type="pt", return_image_embeds=True)
    assert a.images.shape == b.images.shape == (2, 3, 256, 256)
    assert psnr(a.images, b.images) >= 40
    assert torch.allclose(a.image_embeds, b.image_embeds, rtol=1e-3, atol=1e-4)
    # a different seed is a different image on both: the comparison above is not vacuous
    c = on_ort.generate(PROMPTS, seed=12, output_type="pt")
    assert psnr(b.images, c.images) < 30


def test_the_ar_prior_draws_the_same_codes_on_onnxruntime_as_on_torch(default_engine_dir, default_model):
    folder, _ = default_engine_dir
    on_torch = UnCLIP(copy.deepcopy(default_model), backend="torch", device="cpu", progress=False, prior="ar")
    on_ort = UnCLIP(copy.deepcopy(default_model), engine_dir=folder, backend="onnxruntime", device="cpu",
                    progress=False, prior="ar")
    ar = default_model.ar_prior
    kw = {"decoder_steps": 3, "super_res_steps": 2, "output_type": "pt", "return_image_embeds": True}
    embeds = []
    for seed in (0, 1, 2):
        a = on_torch.generate(PROMPTS + [""], seed=seed, **kw)
        b = on_ort.generate(PROMPTS + [""], seed=seed, **kw)
        assert torch.equal(ar.encode(a.image_embeds), ar.encode(b.image_embeds))  # the same 48 codes each
        torch.testing.assert_close(b.image_embeds, a.image_embeds, atol=1e-5, rtol=0)
        assert psnr(a.images, b.images) >= 40
        embeds.append(a.image_embeds)
    assert not torch.equal(embeds[0], embeds[1])  # seeds differ: the comparison is not vacuous


def test_auto_picks_onnxruntime_on_the_cpu_with_engines_and_torch_without(default_engine_dir, default_model):
    folder, _ = default_engine_dir
    assert UnCLIP(default_model, device="cpu", progress=False).backend == "torch"
    assert UnCLIP(default_model, engine_dir=folder, device="cpu", progress=False).backend == "onnxruntime"


def test_backend_arguments_are_checked(default_engine_dir, default_model):
    folder, _ = default_engine_dir
    with pytest.raises(ValueError, match="backend must be one of"):
        UnCLIP(default_model, backend="openvino", device="cpu")
    with pytest.raises(ValueError, match="engine_dir"):
        UnCLIP(default_model, backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match="fp32 engines"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu", dtype=torch.float16)


def test_engines_of_other_weights_are_refused_with_the_rebuild_command(default_engine_dir, default_model):
    folder, _ = default_engine_dir
    changed = copy.deepcopy(default_model)
    with torch.no_grad():
        changed.decoder.text_proj.cf_param.add_(0.01)
    expected = f"--model default --out {folder} --force"
    with pytest.raises(EngineError, match="other weights") as err:
        UnCLIP(changed, engine_dir=folder, backend="onnxruntime", device="cpu")
    assert expected in str(err.value)


def _copy(folder, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(folder, dst)
    return dst


def test_a_stale_manifest_format_or_damaged_files_are_refused(default_engine_dir, default_model, tmp_path):
    folder = _copy(default_engine_dir[0], tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())

    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 0}))
    with pytest.raises(EngineError, match="format 0.*--force"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")
    (folder / "manifest.json").write_text(json.dumps(manifest)[:100])
    with pytest.raises(EngineError, match="unreadable"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")
    (folder / "manifest.json").write_text(json.dumps(manifest))

    (folder / "constants.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(EngineError, match="constants.safetensors"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")
    shutil.copy(default_engine_dir[0] / "constants.safetensors", folder)

    data = (folder / "prior_step.onnx").read_bytes()
    (folder / "prior_step.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="prior_step.onnx"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")
    (folder / "prior_step.onnx").unlink()
    with pytest.raises(EngineError, match="prior_step.onnx.*missing"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")

    del manifest["stages"]["decoder_step"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"changed after it was written.*--out"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")
    from models.file_integrity import sha256_json

    shutil.copy(default_engine_dir[0] / "prior_step.onnx", folder)
    manifest.pop("manifest_sha256")
    manifest["manifest_sha256"] = sha256_json(manifest)  # a consistent manifest that lacks a stage
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=r"no engine for stage\(s\) \['decoder_step'\]"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")


def test_a_rebuild_that_dies_midway_leaves_a_folder_the_runtime_refuses(default_engine_dir, default_model, tmp_path,
                                                                        monkeypatch):
    folder = _copy(default_engine_dir[0], tmp_path)
    model = copy.deepcopy(default_model).float()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # what a kill between two stages looks like to the folder

    monkeypatch.setattr(build_engines, "check_graph", dies)
    with pytest.raises(KeyboardInterrupt):
        build_engines.build(model, folder, ["onnxruntime"], force=True)
    assert not (folder / "manifest.json").exists()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(EngineError, match="no manifest.json"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")


def test_tensorrt_plans_of_another_version_or_gpu_are_refused(monkeypatch):
    from runtime.backends import tensorrt as tensorrt_engine

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    manifest = {"versions": {"tensorrt": "10.8.0"}, "compute_capability": "9.0"}
    with pytest.raises(EngineError, match="TensorRT 10.8.0.*10.9.0.*REBUILD"):
        tensorrt_engine.check_compatible(manifest, torch.device("cuda"), "REBUILD")
    manifest["versions"]["tensorrt"] = "10.9.0"
    with pytest.raises(EngineError, match="CUDA device"):
        tensorrt_engine.check_compatible(manifest, torch.device("cpu"), "REBUILD")


def test_a_folder_without_plans_refuses_the_tensorrt_backend(default_engine_dir):
    folder = EngineFolder.open(default_engine_dir[0])
    assert not folder.has_plans()
    with pytest.raises(EngineError, match="no TensorRT plans.*--backends onnxruntime,tensorrt"):
        folder.tensorrt_engines(torch.device("cpu"))


def test_the_cli_runs_engines_and_reports_a_refused_folder(default_engine_dir, tmp_path, capsys):
    from runtime.__main__ import main

    folder = default_engine_dir[0]
    out = tmp_path / "x.png"
    args = ["a red circle", "-o", str(out), "--device", "cpu", "--no-progress", "--seed", "0", "--super-res-steps", "2"]
    assert main([*args, "--engine-dir", str(folder), "--backend", "onnxruntime"]) == 0 and out.is_file()
    assert main([*args, "--engine-dir", str(tmp_path / "none"), "--backend", "onnxruntime"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_a_rebuild_killed_with_sigkill_leaves_a_folder_the_runtime_refuses(default_engine_dir, default_model,
                                                                          tmp_path):
    """A real `kill -9` of `python -m export.build_engines --force` while it writes graphs."""
    import os
    import signal
    import subprocess
    import time

    folder = _copy(default_engine_dir[0], tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "export.build_engines", "--model", "default", "--out", str(folder),
                             "--force"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        # wait until the old manifest is gone and at least one graph has been rewritten
        while time.monotonic() < deadline and proc.poll() is None:
            rewritten = [p for p in folder.iterdir()
                         if p.suffix == ".onnx" and p.stat().st_mtime_ns != stamps.get(p.name)]
            if not (folder / "manifest.json").exists() and rewritten:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (folder / "manifest.json").exists()
    with pytest.raises(EngineError, match="no manifest.json"):
        UnCLIP(default_model, engine_dir=folder, backend="onnxruntime", device="cpu")
