"""The `tensorrt` backend: a deserialised plan per stage, run with `execute_async_v3` on torch
device buffers, one execution context per CUDA stream (a context holds shapes and addresses, so
two streams must not share one).

torch's own streams and CUDA graphs drive it (`torch.cuda.current_stream().cuda_stream` is the
stream handle TensorRT enqueues on, and an enqueue is capturable by `torch.cuda.graph`), so
cuda-python is not needed here; see docs/engines.md.

TensorRT cannot be installed on the machines this project is developed on (only its lean runtime
wheels are on PyPI, and no plan can be built without the builder): this module is written against
the documented TensorRT 10 Python API and has not run. Nothing imports it unless the `tensorrt`
backend is asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runtime.backends.engine import EngineError, cast_inputs
from runtime.backends.signatures import StageSignature


def _tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError("backend tensorrt asked for, but the tensorrt package does not import here") from exc
    return tensorrt


def check_compatible(manifest: dict, device: torch.device, rebuild: str) -> None:
    """Plans run only with the TensorRT version and GPU architecture that built them."""
    trt = _tensorrt()
    built = manifest.get("versions", {}).get("tensorrt")
    if built != trt.__version__:
        raise EngineError(f"plans built with TensorRT {built}, this process has {trt.__version__}; rebuild with "
                          f"{rebuild}")
    if device.type != "cuda":
        raise EngineError(f"the tensorrt backend runs on a CUDA device, not {device}")
    major, minor = torch.cuda.get_device_capability(device)
    if manifest.get("compute_capability") != f"{major}.{minor}":
        raise EngineError(f"plans built for compute capability {manifest.get('compute_capability')}, this GPU is "
                          f"{major}.{minor}; rebuild with {rebuild}")


class TensorRTEngine:
    """One stage's plan. Enqueue is asynchronous on torch's current stream and capturable in a
    CUDA graph; one execution context serves every call (`UnCLIP` serialises calls)."""

    capturable = True

    def __init__(self, path: Path, signature: StageSignature, device: torch.device) -> None:
        trt = _tensorrt()
        self.signature = signature
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise EngineError(f"{path}: cannot read the plan ({exc})") from exc
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT cannot deserialise it (corrupt, or built by another version)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted(signature.input_names + signature.output_names):
            raise EngineError(f"{path}: tensors {names} do not match the {signature.name} signature")
        out_dtype = self.engine.get_tensor_dtype(signature.output_names[0])
        self.float_dtype = torch.float16 if out_dtype == trt.DataType.HALF else torch.float32
        self._context = self.engine.create_execution_context()  # allocates here, never during graph capture
        # The optimisation profile's (min, opt, max) shapes; the batch axis may not exceed max.
        first = signature.inputs[0].name
        self.max_rows = int(self.engine.get_tensor_profile_shape(first, 0)[2][0])

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sig = self.signature
        inputs = [x.contiguous() for x in cast_inputs(sig, inputs, self.float_dtype)]
        batch = inputs[0].shape[0]
        if batch > self.max_rows:
            raise ValueError(f"{sig.name}: batch {batch} exceeds the plan's profile (at most {self.max_rows} rows); "
                             "pass fewer images per call, or rebuild the engines with a larger --max-batch")
        stream = torch.cuda.current_stream(self.device).cuda_stream
        context = self._context
        for spec, x in zip(sig.inputs, inputs, strict=True):
            context.set_input_shape(spec.name, tuple(x.shape))
            context.set_tensor_address(spec.name, x.data_ptr())
        outs = tuple(torch.empty(spec.concrete(batch), dtype=self.float_dtype, device=self.device)
                     for spec in sig.outputs)
        for spec, y in zip(sig.outputs, outs, strict=True):
            context.set_tensor_address(spec.name, y.data_ptr())
        if not context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to enqueue stage {sig.name} at batch {batch}")
        return outs
