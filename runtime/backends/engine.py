"""What every backend shares: the `Engine` interface, `EngineError`, and the casting of a stage's
inputs to an engine's float dtype (used by `runtime.backends.engines` and `runtime.backends.tensorrt`)."""

from __future__ import annotations

from typing import Protocol

import torch

from runtime.backends.signatures import StageSignature


class EngineError(RuntimeError):
    """An engine folder that cannot serve this model (missing, stale, foreign or corrupt)."""


class Engine(Protocol):
    """A stage's network on one backend. An engine may also offer `prepare_loop(timesteps, batch,
    *invariant)`, the call for each step of a sampling loop with what it can make for every step
    at once made beforehand (`runtime.backends.engines.TorchEngine`); the loops use it where present."""

    signature: StageSignature
    float_dtype: torch.dtype
    capturable: bool  # runs inside CUDA graph capture (no host sync, works on the current stream)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


def cast_inputs(signature: StageSignature, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """Float inputs to `dtype`; integer and bool inputs as they are."""
    if len(inputs) != len(signature.inputs):
        raise TypeError(f"{signature.name} takes {len(signature.inputs)} inputs {signature.input_names}, "
                        f"got {len(inputs)}")
    return [x.to(dtype) if spec.kind == "float" else x for spec, x in zip(signature.inputs, inputs, strict=True)]
