"""One `Engine` interface over the backends that can run a stage: `torch` (the modules),
`onnxruntime` (the graphs of `python -m export.build_engines`; CPU provider, or on a GPU the CUDA
provider, see `runtime.backends.ort_cuda`) and `tensorrt`
(the plans, see `runtime.backends.tensorrt`).

An engine takes the stage's inputs positionally, in the order of its `StageSignature`, as torch
tensors (float inputs in any float dtype: the engine casts them to its own `float_dtype`), and
returns its outputs as a tuple of torch tensors in `float_dtype` on the inputs' device.

`EngineFolder` reads an engine folder's manifest and refuses one that cannot serve: missing or
unreadable, of another manifest format, built for another model config or other weights, or
(for TensorRT plans) for another TensorRT version or GPU; every refusal names the command that
rebuilds.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import config_from_dict, config_to_dict, weights_sha256
from models.configs import UnCLIPConfig
from models.file_integrity import IntegrityError, sha256_json, verify_files
from models.fused.options import DEFAULT as DEFAULT_FUSED
from models.fused.options import FusedOptions
from models.unclip import UnCLIPModel
from runtime.backends.engine import Engine, EngineError, cast_inputs
from runtime.backends.ort_cuda import OrtCudaEngine
from runtime.backends.signatures import LoopStep, StageSignature, is_unet_stage, signatures, stage_module
from runtime.constants import ModelConstants

MANIFEST = "manifest.json"  # an engine folder's record, written by `python -m export.build_engines`
# Bumped when the folder layout changes; older folders are refused (2: split prior, 3: split decoder,
# 4: SHA-256 of every file and of the manifest).
MANIFEST_FORMAT = 5
BACKENDS = ("torch", "onnxruntime", "tensorrt")
REBUILD_ANY = "python -m export.build_engines --model <the model> --out <the engine folder> --force"
_PRECISION = {"fp32": torch.float32, "fp16": torch.float16}


def normalise_config(cfg_dict: dict) -> dict:
    """A config dict as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(cfg_dict))


class TorchEngine:
    """The stage's torch module (in the model's dtype and device). With `channels_last`, image
    inputs are passed in channels-last memory (the module's weights must be converted too, see
    `UnCLIP(channels_last=...)`); outputs come back in whatever layout the module produces."""

    capturable = True

    def __init__(self, model: UnCLIPModel, name: str, channels_last: bool = False,
                 options: FusedOptions = DEFAULT_FUSED) -> None:
        self.signature = signatures(model.cfg)[name]
        self.module = stage_module(model, name, options)
        self.float_dtype = next(self.module.parameters()).dtype
        self.channels_last = channels_last

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._run(self.module, inputs)

    def _run(self, module: Callable[..., tuple[torch.Tensor, ...]],
             inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        inputs = cast_inputs(self.signature, inputs, self.float_dtype)
        if self.channels_last:
            inputs = [x.to(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs]
        return tuple(module(*inputs))

    @torch.no_grad()
    def prepare_loop(self, timesteps: torch.Tensor, batch: int, *invariant: torch.Tensor) -> LoopStep | None:
        """The stage's call for each step of a sampling loop over `timesteps` at `batch` rows, with
        what its module can make for every step at once made now (the UNets' time-embedding
        projections; `invariant`: the inputs that stay the same over the loop, as the module's
        `prepare_loop` takes them): `step(i, *inputs)` is `self(*inputs)` at step i. None where
        the module makes nothing ahead (the loop then calls the engine)."""
        prepare = getattr(self.module, "prepare_loop", None)
        if prepare is None:
            return None
        invariant = tuple(x.to(self.float_dtype) if x.is_floating_point() else x for x in invariant)
        run = prepare(timesteps, batch, *invariant)
        if run is None:
            return None
        return lambda i, *inputs: self._run(functools.partial(run, i), inputs)


class OnnxRuntimeEngine:
    """An exported graph in an ONNX Runtime session of any batch, fed through the host (the CPU
    provider; on a GPU, `runtime.backends.ort_cuda.OrtCudaEngine` runs the graphs instead)."""

    capturable = False  # its inputs and outputs pass through host memory

    def __init__(self, path: Path, signature: StageSignature, providers: list[str] | None = None,
                 rebuild: str = REBUILD_ANY) -> None:
        import onnxruntime as ort

        self.signature = signature
        self.providers = providers or ["CPUExecutionProvider"]
        if not Path(path).is_file():
            raise EngineError(f"{path}: missing; rebuild with {rebuild}")
        try:
            self.session = ort.InferenceSession(str(path), providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            raise EngineError(f"{path}: ONNX Runtime cannot load it ({exc}); rebuild with {rebuild}") from exc
        names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if names != signature.input_names or outputs != signature.output_names:
            raise EngineError(f"{path}: its inputs {names} and outputs {outputs} are not the {signature.name} stage's "
                              f"({signature.input_names} → {signature.output_names}); rebuild with {rebuild}")
        out_type = self.session.get_outputs()[0].type  # every stage has a float first output
        self.float_dtype = torch.float16 if out_type == "tensor(float16)" else torch.float32

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sig = self.signature
        inputs = cast_inputs(sig, inputs, self.float_dtype)
        device = inputs[0].device
        feed = {s.name: x.detach().cpu().numpy() for s, x in zip(sig.inputs, inputs, strict=True)}
        outs = self.session.run(sig.output_names, feed)
        return tuple(torch.from_numpy(o).to(device) for o in outs)


def onnxruntime_providers() -> list[str]:
    """ONNX Runtime's execution providers on this machine ([] when onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


@dataclass(frozen=True)
class EngineFolder:
    """A checked engine folder: its path and manifest."""

    path: Path
    manifest: dict

    @property
    def rebuild_command(self) -> str:
        return rebuild_command(self.path, self.manifest.get("source"))

    @staticmethod
    def open(folder: str | Path) -> EngineFolder:
        """Read and check the manifest (present, readable, of this format)."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise EngineError(f"{folder}: no {MANIFEST}; build the engines with {rebuild_command(folder, None)}")
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as exc:
            raise EngineError(f"{path}: unreadable ({type(exc).__name__}: {exc}); rebuild with "
                              f"{rebuild_command(folder, None)}") from None
        source = manifest.get("source")
        engines = EngineFolder(folder, manifest if isinstance(source, str | None) else {**manifest, "source": None})
        if manifest.get("format") != MANIFEST_FORMAT:
            raise EngineError(f"{folder}: manifest format {manifest.get('format')!r}, this runtime reads "
                              f"{MANIFEST_FORMAT}; rebuild with {engines.rebuild_command}")
        problem = _manifest_problem(manifest)
        if problem:
            raise EngineError(f"{path}: {problem}; rebuild with {engines.rebuild_command}")
        try:
            verify_files(folder, manifest["files_sha256"], f"rebuild with {engines.rebuild_command}")
        except IntegrityError as exc:
            raise EngineError(str(exc)) from None
        return engines

    @property
    def cfg(self) -> UnCLIPConfig:
        try:
            return config_from_dict(self.manifest["config"], "manifest.json's config")
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{self.path}: the manifest's model config is unreadable ({exc}); rebuild with "
                              f"{self.rebuild_command}") from exc

    @property
    def float_dtype(self) -> torch.dtype:
        return _PRECISION[self.manifest["precision"]]

    @property
    def stages(self) -> list[str]:
        return list(self.manifest["stages"])

    def check_model(self, model: UnCLIPModel) -> None:
        """Refuse a folder built for another config or other weights than `model`'s."""
        if self.manifest.get("config") != normalise_config(config_to_dict(model.cfg)):
            raise EngineError(f"{self.path}: built for another model config; rebuild with {self.rebuild_command}")
        if self.manifest.get("weights_sha256") != weights_sha256(model):
            raise EngineError(f"{self.path}: built from other weights than this model's (stale engines); rebuild "
                              f"with {self.rebuild_command}")

    def constants(self) -> ModelConstants:
        try:
            return ModelConstants.load(self.path)
        except ValueError as exc:
            raise EngineError(f"{exc}; rebuild with {self.rebuild_command}") from exc

    def files(self, stage: str) -> list[Path]:
        return [self.path / f for f in self.manifest["stages"][stage]["files"]]

    def has_plans(self) -> bool:
        return "tensorrt" in self.manifest.get("backends", [])

    def onnxruntime_engines(self, providers: list[str] | None = None, device: torch.device | None = None,
                            graphs: str = "onnxruntime") -> dict[str, Engine]:
        """Every stage's graph in ONNX Runtime: on a CUDA `device` with the CUDA provider in
        `providers`, `OrtCudaEngine`s (fixed-batch sessions, the whole graph on the GPU, replayed
        from CUDA graphs as `graphs` says); else sessions of `providers`."""
        sigs = signatures(self.cfg)
        paths = {name: next(f for f in self.files(name) if f.suffix == ".onnx") for name in self.stages}
        if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in (providers or []):
            return {name: OrtCudaEngine(path, sigs[name], device, self.float_dtype, self.rebuild_command, graphs)
                    for name, path in paths.items()}
        return {name: OnnxRuntimeEngine(path, sigs[name], providers, self.rebuild_command)
                for name, path in paths.items()}

    def tensorrt_engines(self, device: torch.device) -> dict[str, Engine]:
        from runtime.backends import tensorrt as tensorrt_engine

        if not self.has_plans():
            raise EngineError(f"{self.path}: has no TensorRT plans; build them with {self.rebuild_command} "
                              "--backends onnxruntime,tensorrt on a machine with TensorRT")
        tensorrt_engine.check_compatible(self.manifest, device, self.rebuild_command)
        sigs = signatures(self.cfg)
        return {name: tensorrt_engine.TensorRTEngine(next(f for f in self.files(name) if f.suffix == ".plan"),
                                                     sigs[name], device)
                for name in self.stages}


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a manifest's structure and seal, or None."""
    if manifest.get("precision") not in _PRECISION:
        return "incomplete manifest (precision)"
    stages = manifest.get("stages")
    if not isinstance(stages, dict) or not stages:
        return "incomplete manifest (no stages)"
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            return f"stage {name!r} is {type(entry).__name__}, not an object"
        files = entry.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            return f"stage {name!r} lists no files"
        if not any(f.endswith(".onnx") for f in files):
            return f"stage {name!r} has no .onnx graph"
    recorded = manifest.get("files_sha256")
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        return "no record of its files' SHA-256"
    unrecorded = sorted(({f for e in stages.values() for f in e["files"]} | {"constants.safetensors"}) - set(recorded))
    if unrecorded:
        return f"files not recorded in files_sha256: {', '.join(unrecorded)}"
    sealed = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != sha256_json(sealed):
        return "the manifest was changed after it was written (manifest_sha256 mismatch)"
    return None


def rebuild_command(folder: Path, source: str | None) -> str:
    return f"python -m export.build_engines --model {source or '<the model>'} --out {folder} --force"


def torch_engines(model: UnCLIPModel, stages: list[str], channels_last: bool = False,
                  options: FusedOptions = DEFAULT_FUSED) -> dict[str, TorchEngine]:
    """The torch engines of `stages`; with `channels_last`, the UNet stages run channels-last
    (converts the decoder's and super-res UNets' weights in place); `options`: the fused path's
    switches."""
    if channels_last:
        model.decoder.unet.to(memory_format=torch.channels_last)
        model.super_res.to(memory_format=torch.channels_last)
    return {name: TorchEngine(model, name, channels_last and is_unet_stage(name), options) for name in stages}


def load_onnxruntime_engines(
    folder: Path, model: UnCLIPModel, providers: list[str] | None = None
) -> dict[str, OnnxRuntimeEngine]:
    """Every stage of an engine folder, after checking its manifest against `model`: the same
    config and the same weights (SHA-256), or an `EngineError` naming the command that rebuilds."""
    engines = EngineFolder.open(folder)
    engines.check_model(model)
    return engines.onnxruntime_engines(providers)
