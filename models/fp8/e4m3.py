"""The e4m3 number format (`torch.float8_e4m3fn`: 4 exponent bits, 3 mantissa bits, no infinities,
largest finite ±448) and scaled quantisation into it.

A tensor `x` is stored as `q = round_e4m3(clamp(x / scale, ±448))` and read back as `q · scale`.
Weights get one scale per output channel (the largest magnitude of that channel's weights maps
to 448), activations one per tensor (its largest magnitude, measured on the fly or calibrated
once). Values beyond a calibrated range saturate at ±448 · scale rather than overflow: the cast
alone would give NaN.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
_TINY = 1e-12  # the scale of an all-zero tensor or channel (any positive value reads back zeros)


def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [out] scales of a weight [out, ...]: each output channel's largest magnitude / 448."""
    amax = weight.detach().float().abs().flatten(1).amax(dim=1)
    return (amax / E4M3_MAX).clamp_min(_TINY)


def largest_magnitude(x: torch.Tensor) -> torch.Tensor:
    """fp32 scalar: the largest |x|, as the infinity norm, one reduction that reads `x` once (exact
    in x's own dtype; NaN stays NaN)."""
    return torch.linalg.vector_norm(x.detach(), ord=float("inf")).float()


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """fp32 scalar scale of a whole tensor: its largest magnitude / 448."""
    return (largest_magnitude(x) / E4M3_MAX).clamp_min(_TINY)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` saturated to ±448 and rounded to e4m3 (`scale` broadcasts against `x`)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q · scale` in `dtype`."""
    return (q.float() * scale).to(dtype)
