"""A group norm's normalising pass that writes e4m3: the input of an FP8 convolution straight from
the norm before it, without the fp16 copy and the quantising pass that would read it again.

The norm's statistics and coefficients come from `cpp_ext.kernels.group_norm_coefficients`
((A, B) per sample and channel: the norm's output before SiLU is x · A + B, the affine, FiLM
scale/shift and what is added before the norm folded in). This Triton kernel reads x once
(channels-last), applies x · A + B (one fused multiply-add, as the CUDA pass does), SiLU where
asked, divides by the convolution's calibrated input scale, saturates to ±448 (NaN stays NaN, so
the loops' non-finite check still sees it) and rounds to nearest even: `quantize_kernel`'s
arithmetic on the normalised value, which is rounded once (to e4m3) where the two-pass way rounded
it to fp16 first. Like the norm's own pass it can write its output resized for the up and down
residual blocks (nearest 2x up; 2x2 average of the normalised values down). Under
`TRITON_INTERPRET=1` it runs on the CPU, which is how CI checks it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from models.fp8.e4m3 import E4M3, E4M3_MAX

BLOCK_PIXELS = 64
BLOCK_CHANNELS = 64
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (CI's check), as Triton reads it


@triton.jit
def _store_quantized(q_ptr, offs, mask, v, scale_ptr, LIMIT: tl.constexpr):
    """v / scale saturated at ±LIMIT, rounded to nearest even into q's dtype (float32: not rounded,
    a test's view of the arithmetic before the cast)."""
    y = v / tl.load(scale_ptr)
    y = tl.minimum(tl.maximum(y, -LIMIT, propagate_nan=tl.PropagateNan.ALL), LIMIT, propagate_nan=tl.PropagateNan.ALL)
    if q_ptr.dtype.element_ty == tl.float32:
        tl.store(q_ptr + offs, y, mask=mask)
    else:
        tl.store(q_ptr + offs, y.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _normalized(x_ptr, offs, mask, a, b, SILU: tl.constexpr):
    """SiLU?(x · A + B) of the elements at `offs`, in float32 (one fused multiply-add)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.fma(x, a[None, :], b[None, :])
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _normalize_quantize_kernel(x_ptr, coef_ptr, scale_ptr, q_ptr, height, width, channels, SILU: tl.constexpr,
                               RESIZE: tl.constexpr, LIMIT: tl.constexpr, BLOCK_P: tl.constexpr,
                               BLOCK_C: tl.constexpr):
    # RESIZE 0: as is; 1: nearest 2x up (programs over input pixels, each written to its four);
    # 2: 2x2 average down (programs over output pixels, each the mean of its four normalised inputs)
    sample = tl.program_id(2).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < channels
    row = (sample * channels + chans) * 2
    a = tl.load(coef_ptr + row, mask=chan_ok, other=0.0)
    b = tl.load(coef_ptr + row + 1, mask=chan_ok, other=0.0)
    hw = height * width
    if RESIZE == 2:
        out_w = width // 2
        out_hw = (height // 2) * out_w
        mask = (pixels < out_hw)[:, None] & chan_ok[None, :]
        oy = pixels // out_w
        ox = pixels - oy * out_w
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for d in tl.static_range(4):
            src = sample * hw + (2 * oy + d // 2) * width + 2 * ox + d % 2
            acc += _normalized(x_ptr, src[:, None] * channels + chans[None, :], mask, a, b, SILU)
        dst = (sample * out_hw + pixels)[:, None] * channels + chans[None, :]
        _store_quantized(q_ptr, dst, mask, 0.25 * acc, scale_ptr, LIMIT)
    else:
        mask = (pixels < hw)[:, None] & chan_ok[None, :]
        v = _normalized(x_ptr, (sample * hw + pixels)[:, None] * channels + chans[None, :], mask, a, b, SILU)
        if RESIZE == 0:
            _store_quantized(q_ptr, (sample * hw + pixels)[:, None] * channels + chans[None, :], mask, v, scale_ptr,
                             LIMIT)
        else:
            py = pixels // width
            px = pixels - py * width
            top = sample * 4 * hw + (2 * py) * (2 * width) + 2 * px
            for d in tl.static_range(4):
                dst = (top + (d // 2) * (2 * width) + d % 2)[:, None] * channels + chans[None, :]
                _store_quantized(q_ptr, dst, mask, v, scale_ptr, LIMIT)


def serves(x: torch.Tensor) -> bool:
    """Whether the kernel takes `x`: a channels-last 4-D map on a GPU (or under Triton's
    interpreter), in fp16, bf16 or fp32."""
    return (x.dim() == 4 and x.numel() > 0 and (x.is_cuda or _INTERPRETED)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.is_contiguous(memory_format=torch.channels_last))


def normalize_quantize(x: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, silu: bool, up: bool = False,
                       down: bool = False) -> torch.Tensor:
    """e4m3 `quantize(SiLU?(x · A + B), scale)` of a channels-last map `x` [B, C, H, W], with
    `coef` the float32 [B, C, 2] (A, B) of `cpp_ext.kernels.group_norm_coefficients` and `scale` the
    per-tensor input scale (one float32 value on x's device); channels-last. `up`: written
    nearest-upsampled 2x ([B, C, 2H, 2W]); `down`: 2x2 average-pooled ([B, C, H/2, W/2], the
    average of the normalised values, H and W even), as the group norm's own resizing writes."""
    if not serves(x):
        raise ValueError("normalize_quantize takes a channels-last [B, C, H, W] map on a GPU in fp16, bf16 or fp32")
    b, c, h, w = x.shape
    if coef.shape != (b, c, 2) or coef.dtype != torch.float32 or not coef.is_contiguous():
        raise ValueError(f"coef must be contiguous float32 [{b}, {c}, 2], got {tuple(coef.shape)} {coef.dtype}")
    if coef.device != x.device:
        raise ValueError(f"coef must be on x's device {x.device}, got {coef.device}")
    if up and down:
        raise ValueError("normalize_quantize resizes up or down, not both")
    if down and (h % 2 or w % 2):
        raise ValueError(f"down needs an even height and width, got {h}x{w}")
    size = (2 * h, 2 * w) if up else (h // 2, w // 2) if down else (h, w)
    out = torch.empty((b, c, *size), dtype=E4M3, device=x.device, memory_format=torch.channels_last)
    return _launch(x, coef, scale, silu, out, resize=1 if up else 2 if down else 0)


def _launch(x: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, silu: bool, out: torch.Tensor,
            resize: int = 0) -> torch.Tensor:
    """The kernel into `out` (channels-last, of the resized shape), cast to out's dtype: e4m3, or
    float32 for a test of the arithmetic before the cast. `resize`: 0 none, 1 up, 2 down."""
    b, c, h, w = x.shape
    scale = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    pixels = (h // 2) * (w // 2) if resize == 2 else h * w
    grid = (triton.cdiv(pixels, BLOCK_PIXELS), triton.cdiv(c, BLOCK_CHANNELS), b)
    _normalize_quantize_kernel[grid](x, coef, scale, out, h, w, c, SILU=silu, RESIZE=resize, LIMIT=E4M3_MAX,
                                     BLOCK_P=BLOCK_PIXELS, BLOCK_C=BLOCK_CHANNELS)
    return out
