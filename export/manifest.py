"""The manifest of an engine folder: what was built from what, so that an unchanged model is not
rebuilt and the runtime can refuse a stale or foreign engine.

`manifest.json` holds the model config, the SHA-256 of the weights the graphs came from, the
precision, opset, library versions, GPU compute capability (for plans), every stage's I/O
signature, per stage its files, their sizes, build seconds and measured error, the SHA-256 of
every file it lists (`files_sha256`) and its own (`manifest_sha256`), which the runtime verifies.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import torch

from models.checkpoint import atomic_write, config_to_dict, weights_sha256
from models.file_integrity import sha256_file, sha256_json
from models.unclip import UnCLIPModel
from runtime.backends.engines import MANIFEST, MANIFEST_FORMAT, normalise_config
from runtime.backends.signatures import StageSignature
from runtime.constants import FILE as CONSTANTS

__all__ = ["MANIFEST", "weights_sha256"]  # re-exported: the build side names them from here


def library_versions() -> dict[str, str]:
    import onnx

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def signature_dict(sig: StageSignature) -> dict:
    return dataclasses.asdict(sig)


def build_key(model: UnCLIPModel, precision: str, max_images: int, backends: list[str]) -> dict:
    """What decides whether an existing build can be reused."""
    return {"format": MANIFEST_FORMAT, "config": config_to_dict(model.cfg), "weights_sha256": weights_sha256(model),
            "precision": precision, "max_images": max_images, "backends": sorted(backends)}


def read(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def seal(folder: Path, manifest: dict) -> None:
    """Record the SHA-256 of the constants and of every stage's files, then of the manifest itself."""
    names = [CONSTANTS] + [f for entry in manifest["stages"].values() for f in entry["files"]]
    manifest["files_sha256"] = {name: sha256_file(folder / name) for name in names}
    manifest.pop("manifest_sha256", None)
    manifest["manifest_sha256"] = sha256_json(manifest)


def write(folder: Path, manifest: dict) -> None:
    atomic_write(folder / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))


def is_current(folder: Path, key: dict, stages: list[str]) -> bool:
    """True when the folder's manifest was built with `key` and every file it lists exists."""
    try:
        old = read(folder)
    except (OSError, ValueError):
        return False
    as_json = normalise_config(key)  # tuples in the config read back as lists
    if not isinstance(old, dict) or {k: old.get(k) for k in as_json} != as_json:
        return False
    if not (folder / CONSTANTS).is_file():
        return False
    built = old.get("stages", {})
    return all(s in built and all((folder / f).is_file() for f in built[s]["files"]) for s in stages)
