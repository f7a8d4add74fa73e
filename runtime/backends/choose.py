"""Which backend runs the stages, and opening its engines.

`auto` picks, by what this machine has (see docs/engines.md, "Backends"):
- no engine folder → `torch`;
- a CUDA device → `tensorrt` when the folder holds plans and TensorRT imports; else `measured`
  (each stage on torch or ONNX Runtime, whichever is faster here, `runtime.backends.measured`)
  when ONNX Runtime's CUDA provider is installed and the folder's precision is the asked dtype;
  else `torch` (the CPU provider would copy every step through the host);
- the CPU → `onnxruntime` when it imports (faster than eager torch on the default model on a
  2-core CPU), else `torch`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from models.fused.options import DEFAULT as DEFAULT_FUSED
from models.fused.options import FusedOptions
from models.unclip import UnCLIPModel
from runtime.backends.engines import BACKENDS, Engine, EngineError, EngineFolder, onnxruntime_providers, torch_engines
from runtime.backends.measured import StageChoice, choose_stages
from runtime.backends.signatures import available_stages, generate_stages

CHOICES = (*BACKENDS, "measured", "auto")  # what `backend=` takes


def choose_backend(requested: str, engine_dir: str | Path | None, device: torch.device,
                   dtype: torch.dtype | None = None) -> str:
    """The backend to run: `requested` checked, or `auto` resolved (see module docstring) for a
    call that asks for `dtype` (None: whatever the engines hold)."""
    if requested not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested != "auto":
        if requested != "torch" and engine_dir is None:
            raise ValueError(f"backend {requested!r} runs the engines of a folder: pass engine_dir= (build one with "
                             "python -m export.build_engines)")
        return requested
    if engine_dir is None:
        return "torch"
    if device.type == "cuda":
        folder = EngineFolder.open(engine_dir)
        if folder.has_plans() and importlib.util.find_spec("tensorrt"):
            return "tensorrt"
        same_precision = dtype is None or dtype == folder.float_dtype
        return "measured" if same_precision and "CUDAExecutionProvider" in onnxruntime_providers() else "torch"
    return "onnxruntime" if onnxruntime_providers() else "torch"


def open_engines(
    backend: str, model: UnCLIPModel | None, folder: EngineFolder | None, device: torch.device,
    channels_last: bool = False, options: FusedOptions = DEFAULT_FUSED,
) -> dict[str, Engine]:
    """Every stage's engine: the torch modules of `model` (UNets channels-last if asked, the fused
    path under `options`), or the engines of a checked `folder`."""
    if backend == "torch":
        if model is None:
            raise ValueError("the torch backend needs the model")
        return torch_engines(model, available_stages(model), channels_last, options)
    if folder is None:
        raise ValueError(f"the {backend} backend needs an engine folder")
    missing = [s for s in generate_stages(folder.cfg) if s not in folder.stages]
    if missing:
        raise EngineError(f"{folder.path}: no engine for stage(s) {missing}; rebuild with {folder.rebuild_command}")
    if backend == "onnxruntime":
        return folder.onnxruntime_engines(onnxruntime_device_providers(device), device)
    return folder.tensorrt_engines(device)


def onnxruntime_device_providers(device: torch.device) -> list[str]:
    """ONNX Runtime's providers for `device`: the CUDA provider first where it is installed."""
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    return [p for p in providers if p in onnxruntime_providers()] + ["CPUExecutionProvider"]


def measured_engines(
    model: UnCLIPModel, folder: EngineFolder, device: torch.device, channels_last: bool = False,
    options: FusedOptions = DEFAULT_FUSED,
) -> tuple[dict[str, Engine], list[StageChoice]]:
    """Every stage on whichever of the torch modules of `model` (already in the folder's precision)
    and the folder's graphs under ONNX Runtime is faster here (`runtime.backends.measured`), and
    the choices. On CUDA the graphs run in sessions that the runtime's loop graphs capture."""
    torch_side = torch_engines(model, available_stages(model), channels_last, options)
    graphs = "torch" if device.type == "cuda" else "onnxruntime"
    ort_side = folder.onnxruntime_engines(onnxruntime_device_providers(device), device, graphs)
    return choose_stages(torch_side, ort_side, device)
