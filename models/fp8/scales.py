"""Activation scales calibrated once per model, and their file.

Calibration runs the FP8 model (activations scaled on the fly) over some prompts while every FP8
layer records the largest input magnitude it sees (`observe`); a layer's scale is that / 448.
The file, `fp8_scales.safetensors` beside the weights, holds one float32 scalar per layer name
and records in its metadata the SHA-256 of the weights it was calibrated on
(`models.checkpoint.weights_sha256`) and of its own scales: a file of other weights, or one edited
after it was written, is refused.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from models.atomic_files import atomic_write
from models.file_integrity import IntegrityError, sha256_json
from models.fp8.e4m3 import E4M3_MAX
from models.fp8.policy import fp8_layers

SCALES_FILE = "fp8_scales.safetensors"
FORMAT = "unclip-rt fp8 input scales 1"


def folder_scales(folder: str | Path) -> Path | None:
    """A model folder's calibrated scales file, or None where it has none."""
    path = Path(folder) / SCALES_FILE
    return path if path.is_file() else None


@contextlib.contextmanager
def observe(model: nn.Module) -> Iterator[dict[str, float]]:
    """While inside, every FP8 layer of `model` records its largest input magnitude; on leaving,
    the dict yielded is filled with name → calibrated scale (that magnitude / 448) for every layer
    that saw an input."""
    layers = fp8_layers(model)
    scales: dict[str, float] = {}
    for layer in layers.values():
        layer.observing, layer.observed_amax = True, None
    try:
        yield scales
    finally:
        for name, layer in layers.items():
            if layer.observed_amax is not None:
                scales[name] = max(float(layer.observed_amax) / E4M3_MAX, 1e-12)
            layer.observing, layer.observed_amax = False, None


def save_scales(path: str | Path, scales: dict[str, float], weights_sha256: str, note: str = "") -> None:
    """Write the scales file atomically (see module docstring)."""
    if not scales:
        raise ValueError("no scales to save: no FP8 layer saw an input")
    tensors = {name: torch.tensor(value, dtype=torch.float32) for name, value in sorted(scales.items())}
    meta = {"format": FORMAT, "weights_sha256": weights_sha256, "scales_sha256": _digest(tensors), "note": note}
    atomic_write(Path(path), lambda p: save_file(tensors, str(p), metadata=meta))


def load_scales(path: str | Path, weights_sha256: str, layer_names: list[str]) -> dict[str, float]:
    """The scales of a file written by `save_scales` for these weights, covering `layer_names`."""
    path = Path(path)
    hint = "calibrate again: python -m runtime.fp8_calibration --model <the model folder>"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise IntegrityError(f"{path}: unreadable FP8 scales ({exc}); {hint}") from None
    if meta.get("format") != FORMAT:
        raise IntegrityError(f"{path}: not an FP8 scales file of this format (format {meta.get('format')!r}); {hint}")
    if meta.get("scales_sha256") != _digest(tensors):
        raise IntegrityError(f"{path}: its scales differ from what was written (SHA-256 mismatch); {hint}")
    if meta.get("weights_sha256") != weights_sha256:
        raise IntegrityError(f"{path}: calibrated for other weights (weights SHA-256 differs); {hint}")
    missing = sorted(set(layer_names) - set(tensors))
    if missing:
        raise IntegrityError(f"{path}: no scale for {len(missing)} FP8 layer(s), e.g. {missing[0]}; {hint}")
    scales = {name: float(t) for name, t in tensors.items()}
    bad = [name for name, v in scales.items() if not (v > 0 and v < float("inf"))]
    if bad:
        raise IntegrityError(f"{path}: scale of {bad[0]} is not a positive finite number; {hint}")
    return scales


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    return sha256_json({name: float(t) for name, t in tensors.items()}) if tensors else json.dumps(None)
