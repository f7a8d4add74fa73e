"""Which backend runs the stages, and opening its engines.

`auto` picks, by what this machine has (measured choices, see docs/engines.md, "Backends"):
- no engine folder → `torch`;
- a CUDA device → `tensorrt` when the folder holds plans and TensorRT imports, else `torch`
  (the CPU provider would copy every step through the host; ONNX Runtime's CUDA provider was
  not on the GPU machine, so it is never picked unasked);
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
from runtime.backends.signatures import available_stages, generate_stages


def choose_backend(requested: str, engine_dir: str | Path | None, device: torch.device) -> str:
    """The backend to run: `requested` checked, or `auto` resolved (see module docstring)."""
    if requested not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {', '.join((*BACKENDS, 'auto'))}, got {requested!r}")
    if requested != "auto":
        if requested != "torch" and engine_dir is None:
            raise ValueError(f"backend {requested!r} runs the engines of a folder: pass engine_dir= (build one with "
                             "python -m export.build_engines)")
        return requested
    if engine_dir is None:
        return "torch"
    if device.type == "cuda":
        has_plans = EngineFolder.open(engine_dir).has_plans()
        return "tensorrt" if has_plans and importlib.util.find_spec("tensorrt") else "torch"
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
        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else []
        providers = [p for p in providers if p in onnxruntime_providers()] + ["CPUExecutionProvider"]
        return folder.onnxruntime_engines(providers, device)
    return folder.tensorrt_engines(device)
