"""One `Engine` interface over the backends that can run a stage: `torch` (the modules) and
`onnxruntime` (the graphs of `python -m export.build_engines`; CPU provider, or the CUDA
provider with I/O binding on device tensors when onnxruntime-gpu is installed).

An engine takes the stage's inputs positionally, in the order of its `StageSignature`, as torch
tensors, and returns its outputs as a tuple of torch tensors on the inputs' device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from models.checkpoint import config_to_dict, weights_sha256
from models.unclip import UnCLIPModel
from runtime.signatures import StageSignature, signatures, stage_module

MANIFEST = "manifest.json"  # an engine folder's record, written by `python -m export.build_engines`
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


class EngineError(RuntimeError):
    """An engine folder that cannot serve this model (missing, stale, foreign or corrupt)."""


class Engine(Protocol):
    signature: StageSignature

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


class TorchEngine:
    """The stage's torch module."""

    def __init__(self, model: UnCLIPModel, name: str) -> None:
        self.signature = signatures(model.cfg)[name]
        self.module = stage_module(model, name)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.module(*inputs))


class OnnxRuntimeEngine:
    """An exported graph in an ONNX Runtime session."""

    def __init__(self, path: Path, signature: StageSignature, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.signature = signature
        self.providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({exc}); rebuild with "
                              f"python -m export.build_engines --force") from exc
        names = [i.name for i in self.session.get_inputs()]
        if names != signature.input_names:
            raise EngineError(f"{path}: inputs {names} != the {signature.name} signature {signature.input_names}")
        self._float = torch.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else torch.float32

    def _cast(self, spec_kind: str, x: torch.Tensor) -> torch.Tensor:
        return x.to(self._float) if spec_kind == "float" else x

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sig = self.signature
        device = inputs[0].device
        batch = inputs[0].shape[0]
        if device.type == "cuda" and "CUDAExecutionProvider" in self.providers:
            return self._run_bound(inputs, batch, device)
        feed = {s.name: self._cast(s.kind, x).detach().cpu().numpy() for s, x in zip(sig.inputs, inputs, strict=True)}
        outs = self.session.run(sig.output_names, feed)
        return tuple(torch.from_numpy(o).to(device) for o in outs)

    def _run_bound(self, inputs, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """CUDA provider: bind torch device buffers as inputs and outputs (no host copies)."""
        sig = self.signature
        binding = self.session.io_binding()
        kept = []
        for spec, x in zip(sig.inputs, inputs, strict=True):
            x = self._cast(spec.kind, x).contiguous()
            kept.append(x)
            binding.bind_input(spec.name, "cuda", device.index or 0, _NUMPY[x.dtype], tuple(x.shape), x.data_ptr())
        outs = []
        for spec in sig.outputs:
            y = torch.empty(spec.concrete(batch), dtype=self._float, device=device)
            outs.append(y)
            binding.bind_output(spec.name, "cuda", device.index or 0, _NUMPY[y.dtype], tuple(y.shape), y.data_ptr())
        torch.cuda.current_stream(device).synchronize()  # ORT runs on its own stream
        self.session.run_with_iobinding(binding)
        return tuple(outs)


def load_onnxruntime_engines(
    folder: Path, model: UnCLIPModel, providers: list[str] | None = None
) -> dict[str, OnnxRuntimeEngine]:
    """Every stage of an engine folder, after checking its manifest against `model`: the same
    config and the same weights (SHA-256), or an `EngineError` naming the command that rebuilds."""
    folder = Path(folder)
    path = folder / MANIFEST
    rebuild = f"python -m export.build_engines --model <this model> --out {folder} --force"
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST}; build the engines with {rebuild}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EngineError(f"{path}: unreadable ({exc}); rebuild with {rebuild}") from exc
    if manifest.get("config") != json.loads(json.dumps(config_to_dict(model.cfg))):
        raise EngineError(f"{folder}: built for another model config; rebuild with {rebuild}")
    if manifest.get("weights_sha256") != weights_sha256(model):
        raise EngineError(f"{folder}: built from other weights; rebuild with {rebuild}")
    sigs = signatures(model.cfg)
    return {name: OnnxRuntimeEngine(folder / entry["files"][0], sigs[name], providers)
            for name, entry in manifest.get("stages", {}).items()}
