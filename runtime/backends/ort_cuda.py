"""ONNX Runtime's CUDA provider on torch's memory and stream: one session per batch size.

An exported graph has a symbolic batch axis, and the shape arithmetic that goes with it (Shape,
Gather, ConstantOfShape, Expand: hundreds of small nodes in a UNet step) is what ONNX Runtime
places on the CPU, with a Memcpy node wherever its result meets the GPU part. A session opened
with the batch fixed (`add_free_dimension_override_by_name`) constant-folds all of it, so the
whole graph runs on the CUDA provider; `session.disable_cpu_ep_fallback` makes that a condition
of opening the session rather than a hope. A fixed-shape session is also what ONNX Runtime's
CUDA-graph capture (`enable_cuda_graph`) needs: with it, each run after the first replays one
graph. Inputs are copied into, and outputs read from, torch buffers bound once per session
(I/O binding: no host copies). Sessions run on the engine's own stream, ordered after and before
torch's current stream by events, with ONNX Runtime's end-of-run synchronisation off: the host
never waits for a run, and the order holds whichever stream torch is on.

Two ways to replay, chosen by measurement (`graphs`):
- "onnxruntime": ONNX Runtime's own CUDA graph per session; the runtime's loops then run
  eagerly around it.
- "torch": no graph of ONNX Runtime's, so that the runtime's CUDA graph of a whole sampling loop
  can capture the session's kernels like any others (`capturable`; the event waits become graph
  edges). Capture needs a run that allocates nothing: the loop's warm-up run sizes ONNX
  Runtime's memory arena first.

Sessions open on first use of a batch size (each holds its own copy of the weights on the GPU).

`CONV_LAYOUT` picks the provider's layout for convolutions: "nchw" (the graphs' own) or "nhwc"
(its `prefer_nhwc` option: convolutions and the ops between them in channels-last, with
transposes at the edges, which cuDNN's fp16 tensor-core kernels read directly), to be chosen by
measurement (`benchmarks/latency.py --ort-layouts nchw nhwc`).

`UNET_FUSIONS` runs the UNet stages' graphs (the decoder step, the super-res steps) through ONNX
Runtime's own UNet optimizer (`onnxruntime.transformers.optimizer`, model type "unet") when their
sessions open: group norms become its CUDA GroupNorm op (SkipGroupNorm where a residual addition
feeds one directly), and convolutions its channels-last NhwcConv; then each GroupNorm reads and
writes the activations' dtype instead of the float32 copy the export makes for it
(`ort_norm_dtype`). Those ops exist on the CUDA
provider only, so the optimised graph is made in memory for the GPU session, never written to the
engine folder (whose graphs the CPU runs and checks). A model whose norms the CUDA GroupNorm
cannot take (`ort_fused_norms`: an odd number of channels per group) keeps its plain graphs.
Off by default until measured (`benchmarks/latency.py --ort-unet-fusions off on`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runtime.backends.engine import EngineError, cast_inputs
from runtime.backends.ort_fused_norms import float32_initializers, refused_norms
from runtime.backends.ort_norm_dtype import norms_in_activation_dtype
from runtime.backends.signatures import BATCH, StageSignature, is_unet_stage

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
          "tensor(bool)": torch.bool}


def fixed_batch_options(batch: int, cpu_fallback: bool = True):
    """`onnxruntime.SessionOptions` that fix the graphs' batch axis (`BATCH`) to `batch`, so that
    every shape computation folds into constants, with all graph optimisations on; without
    `cpu_fallback`, a node the CUDA provider cannot run fails the session instead of running on
    the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_free_dimension_override_by_name(BATCH, batch)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: the fp16 constant-folding notices are expected
    if not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return options


GRAPHS = ("onnxruntime", "torch", "none")  # who replays a session's kernels from a CUDA graph
CONV_LAYOUT = "nchw"  # "nchw" or "nhwc" (module docstring): read when a session opens
UNET_FUSIONS = False  # ONNX Runtime's UNet fusions for the UNet stages (module docstring): read at an engine's opening
PROTOBUF_BYTES = 1_800_000_000  # a serialised graph must stay under protobuf's 2 GiB; past this, weights go beside it
log = logging.getLogger(__name__)


class FusionsRefused(EngineError):
    """ONNX Runtime's fused graph of a UNet stage has norms its CUDA kernel cannot run (`ort_fused_norms`)."""


@functools.lru_cache(maxsize=4)
def unet_fused_graph(path: Path) -> bytes | str:
    """The graph at `path` through ONNX Runtime's UNet optimizer (GPU fusions; the session's own
    graph optimisations still run when it opens), for the sessions of every batch size to open
    from: serialised, or, past protobuf's size limit (`PROTOBUF_BYTES`), the path of a copy with
    its weights in one external-data file, in a temporary folder of this process. Raises
    `FusionsRefused` where the fused norms are ones the CUDA kernel cannot run."""
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as exc:  # the optimizer ships inside the onnxruntime wheels; a trimmed install lacks it
        raise EngineError(f"ort_cuda.UNET_FUSIONS needs ONNX Runtime's UNet optimizer (onnxruntime.transformers, "
                          f"part of the onnxruntime-gpu wheel), which this installation lacks ({exc}): reinstall "
                          f"onnxruntime-gpu, or leave UNET_FUSIONS off") from exc

    with float32_initializers():
        model = optimize_model(str(path), model_type="unet", opt_level=0, use_gpu=True).model
    refused = refused_norms(model.graph)
    if refused:
        raise FusionsRefused(f"{path.name}: ONNX Runtime's CUDA GroupNorm takes an even number of channels per "
                             f"group, at most 512; {len(refused)} fused norms have other counts "
                             f"({'; '.join(refused[:3])}{'; ...' if len(refused) > 3 else ''})")
    norms_in_activation_dtype(model.graph)
    if model.ByteSize() <= PROTOBUF_BYTES:
        return model.SerializeToString()
    import onnx

    folder = Path(tempfile.mkdtemp(prefix="unclip-ort-unet-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    onnx.save_model(model, str(folder / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    return str(folder / path.name)


def session_graph(path: Path, stage: str) -> tuple[bytes | str, str]:
    """What a session of `stage` opens and whether it is fused: with `UNET_FUSIONS`, a UNet stage's
    fused graph ("on"), unless its norms are ones ONNX Runtime's CUDA kernel refuses (then the
    plain graph, "refused: " and why); else the exported graph ("off")."""
    if not (UNET_FUSIONS and is_unet_stage(stage)):
        return str(path), "off"
    try:
        return unet_fused_graph(path), "on"
    except FusionsRefused as exc:
        return str(path), f"refused: {exc}"


def cuda_provider(device: torch.device, cuda_graph: bool,
                  stream: torch.cuda.Stream | None = None) -> tuple[str, dict[str, str]]:
    """The CUDA provider entry: on `device`, on `stream` (default torch's current one), ONNX
    Runtime's own CUDA graph capture when `cuda_graph`. fp32 matrix products use TF32 exactly when
    torch's do (`torch.backends.cuda.matmul.allow_tf32`; ONNX Runtime's own default is on), so
    an fp32 engine computes what the torch stage it replaces computes."""
    if CONV_LAYOUT not in ("nchw", "nhwc"):
        raise ValueError(f"ort_cuda.CONV_LAYOUT must be 'nchw' or 'nhwc', got {CONV_LAYOUT!r}")
    stream = stream or torch.cuda.current_stream(device)
    return ("CUDAExecutionProvider", {
        "use_tf32": "1" if torch.backends.cuda.matmul.allow_tf32 else "0",
        "device_id": str(device.index or 0),
        "has_user_compute_stream": "1",
        "user_compute_stream": str(stream.cuda_stream),
        "enable_cuda_graph": "1" if cuda_graph else "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "prefer_nhwc": "1" if CONV_LAYOUT == "nhwc" else "0",
    })


@functools.cache
def _load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries the provider links to from the NVIDIA wheels torch
    installed (ONNX Runtime's documented `preload_dlls`, where this version has it)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


@dataclass
class _BatchSession:
    session: object  # onnxruntime.InferenceSession
    binding: object  # onnxruntime.IOBinding, bound once to `inputs` and `outputs`
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


class OrtCudaEngine:
    """An exported graph on ONNX Runtime's CUDA provider, one fixed-batch session per batch size."""

    def __init__(self, path: Path, signature: StageSignature, device: torch.device, float_dtype: torch.dtype,
                 rebuild: str, graphs: str = "onnxruntime") -> None:
        if graphs not in GRAPHS:
            raise ValueError(f"graphs must be one of {GRAPHS}, got {graphs!r}")
        self.path, self.signature, self.device = Path(path), signature, torch.device(device)
        self.float_dtype, self.rebuild, self.graphs = float_dtype, rebuild, graphs
        self.capturable = graphs == "torch"  # inside the runtime's loop graphs
        self._stream = torch.cuda.Stream(self.device)
        self._sessions: dict[int, _BatchSession] = {}
        self._run_options = None
        self.fusions = "not opened"  # whether the sessions run ONNX Runtime's fused UNet graph (`_graph`)
        self._source: bytes | str | None = None

    def _graph(self) -> bytes | str:
        """What every batch size's session opens (`session_graph`), settled at the first: a refusal
        is said once in the log, and its optimisation not run again."""
        if self._source is None:
            self._source, self.fusions = session_graph(self.path, self.signature.name)
            if self.fusions.startswith("refused"):
                log.warning("%s; %s runs its unfused graph", self.fusions.removeprefix("refused: "),
                            self.signature.name)
        return self._source

    def session(self, batch: int) -> _BatchSession:
        """The session of `batch`, opened (and bound) on first use."""
        if batch not in self._sessions:
            self._sessions[batch] = self._open(batch)
        return self._sessions[batch]

    def _open(self, batch: int) -> _BatchSession:
        import onnxruntime as ort

        sig = self.signature
        _load_cuda_libraries()
        provider = cuda_provider(self.device, self.graphs == "onnxruntime", self._stream)
        graph = self._graph()
        try:
            session = ort.InferenceSession(graph, fixed_batch_options(batch, cpu_fallback=False), providers=[provider])
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"{self.path}: ONNX Runtime's CUDA provider cannot run it whole at batch {batch} "
                              f"({exc}); rebuild with {self.rebuild}") from exc
        index = self.device.index or 0
        binding = session.io_binding()
        # buffers bound in the types the graph declares (`copy_` converts on the way in): an fp16
        # graph keeps some tensors in float32, as the torch stage does (the decoder's context bias)
        declared = {v.name: _TORCH[v.type] for v in [*session.get_inputs(), *session.get_outputs()]}
        inputs, outputs = [], []
        for spec in sig.inputs:
            x = torch.zeros(spec.concrete(batch), dtype=declared[spec.name], device=self.device)
            inputs.append(x)
            binding.bind_input(spec.name, "cuda", index, _NUMPY[x.dtype], tuple(x.shape), x.data_ptr())
        for spec in sig.outputs:
            y = torch.empty(spec.concrete(batch), dtype=declared[spec.name], device=self.device)
            outputs.append(y)
            binding.bind_output(spec.name, "cuda", index, _NUMPY[y.dtype], tuple(y.shape), y.data_ptr())
        if self._run_options is None:
            self._run_options = ort.RunOptions()
            # no stream synchronisation at the end of a run (a sync cannot be captured, and would
            # hold the host): the events in `__call__` order the engine's stream with torch's
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if self.capturable:
            # Two runs before any capture: the first times cuDNN's algorithms and records the
            # memory pattern, the second allocates that pattern's block from the arena. A capture
            # may then run the session, since a run that asks CUDA for memory breaks a capture.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the zeroed inputs
            for _ in range(2):
                session.run_with_iobinding(binding, self._run_options)  # on the engine's stream
            self._stream.synchronize()
        return _BatchSession(session, binding, inputs, outputs)

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = cast_inputs(self.signature, inputs, self.float_dtype)
        s = self.session(inputs[0].shape[0])
        for buf, x in zip(s.inputs, inputs, strict=True):
            buf.copy_(x)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        s.session.run_with_iobinding(s.binding, self._run_options)
        current.wait_stream(self._stream)
        # The bound outputs are overwritten by the next run at this batch size: hand out copies.
        return tuple(y.clone() for y in s.outputs)


def tensorrt_provider_status(graph: Path, device: torch.device) -> str:
    """What happens when ONNX Runtime's TensorRT provider is asked to run `graph` at batch 1 on
    `device`: "runs" when the session keeps it, else why not (the wheel lists the provider, but
    it needs TensorRT's own libraries at run time; without them ONNX Runtime falls back)."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "not in this onnxruntime build"
    _load_cuda_libraries()
    try:
        session = ort.InferenceSession(
            str(graph), fixed_batch_options(1),
            providers=[("TensorrtExecutionProvider", {"device_id": str(device.index or 0)}),
                       cuda_provider(device, cuda_graph=False)])
    except Exception as exc:  # ORT raises its own exception types
        return f"fails to open: {exc}"
    kept = session.get_providers()
    return "runs" if kept and kept[0] == "TensorrtExecutionProvider" else f"falls back to {kept}"
