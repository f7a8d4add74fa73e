"""When `cpp_ext`'s half-precision kernels serve a tensor, and the two memory layouts they read."""

from __future__ import annotations

import torch

import cpp_ext
from models.layers import tracing


def device_serves(x: torch.Tensor) -> bool:
    """Whether the kernels run on `x`'s device and dtype: CUDA, fp16 or bf16."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def fused_kernels_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `cpp_ext`'s kernels serve `x` with `weight`: built, `device_serves(x)`, one dtype,
    eager or graph capture; never while exporting or compiling (the graph must be the reference's)."""
    return cpp_ext.kernels is not None and device_serves(x) and weight.dtype == x.dtype and not tracing()


def layout(t: torch.Tensor) -> str | None:
    """"nchw" (contiguous), "nhwc" (channels-last only) or None (neither)."""
    if t.is_contiguous():
        return "nchw"
    return "nhwc" if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else None


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both contiguous, or both channels-last (the kernels' two layouts)."""
    return layout(a) is not None and layout(a) == layout(b)
