"""Scaled quantisation to e4m3 in one pass on the GPU: `models.fp8.e4m3.quantize`'s result, bit for
bit, reading the input once and writing one byte per element.

torch's expression of it (`(x.float() / scale).clamp(±448).to(e4m3)`) runs four kernels and
writes three fp32 temporaries: about nine times the memory traffic of the quantised output, before
every FP8 layer. Here one Triton kernel divides by the scale in fp32, saturates (NaN stays NaN, so
the loops' non-finite check still sees it) and rounds to nearest even, on the tensor's storage
order (a channels-last input gives a channels-last output). Under `TRITON_INTERPRET=1` it runs on
the CPU, which is how CI checks it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from models.fp8.e4m3 import E4M3, E4M3_MAX, quantize

BLOCK = 4096
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (CI's check), as Triton reads it


@triton.jit
def _quantize_kernel(x_ptr, scale_ptr, q_ptr, n, LIMIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x / tl.load(scale_ptr)
    y = tl.minimum(tl.maximum(y, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT, propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def dense(x: torch.Tensor) -> bool:
    """Whether `x` covers its storage densely in one of the layouts the kernel keeps."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def quantize_fused(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantize(x, scale)` for a per-tensor `scale` (one fp32 value on x's device): one kernel
    where `x` is dense on a GPU (or under Triton's interpreter), else torch's expression."""
    if scale.numel() != 1 or not dense(x) or not (x.is_cuda or _INTERPRETED) or x.numel() == 0:
        return quantize(x, scale)
    q = torch.empty_like(x, dtype=E4M3)  # the same strides: storage order in, storage order out
    scale = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    n = x.numel()
    _quantize_kernel[(triton.cdiv(n, BLOCK),)](x, scale, q, n, LIMIT=E4M3_MAX, BLOCK=BLOCK)
    return q
