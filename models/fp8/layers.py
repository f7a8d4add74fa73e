"""Layers with e4m3 weights (one scale per output channel) that quantise their input to e4m3 (one
scale per tensor: calibrated, or measured on each call) before the product.

`Fp8Linear` multiplies through `torch._scaled_mm` (FP8 operands, fp32 accumulation, both scales
applied in its epilogue) where the shapes allow, so the product is the FP8 GEMM itself.
`Fp8Conv` (1-D and 2-D) reads back both quantised operands in the input's dtype and convolves
them with torch's convolution: the same quantisation, and in fp32 the same products, as an FP8
implicit-GEMM convolution, without its speed (torch has no FP8 convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fp8.e4m3 import channel_scales, dequantize, quantize, tensor_scale

_GEMM_MULTIPLE = 16  # `_scaled_mm` needs K and N multiples of 16


class _Fp8Layer(nn.Module):
    """The weight and scales both layer kinds hold. `input_scale` NaN: measured on each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        scales = channel_scales(weight)
        view = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("weight_q", quantize(weight, scales.view(view)))
        self.register_buffer("weight_scale", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("input_scale", torch.tensor(float("nan")))
        self.calibrated = False  # host-side copy of `input_scale`'s state: no device read per call
        self.observed_amax: torch.Tensor | None = None  # while calibrating: the largest |input| seen
        self.observing = False
        self._read: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # the weight read back, per dtype

    def _apply(self, fn, recurse=True):
        # a dtype conversion of the model (`.half()`, `.to(dtype)`) must leave the e4m3 weight and
        # the fp32 scales as they are: only the bias follows the model's dtype
        kept = {name: getattr(self, name).dtype for name in ("weight_q", "weight_scale", "input_scale")}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            if getattr(self, name).dtype != dtype:
                setattr(self, name, getattr(self, name).to(dtype))
        self._read.clear()
        return self

    def set_input_scale(self, scale: float | None) -> None:
        """A fixed activation scale (calibrated), or None to measure each input's."""
        self.input_scale.fill_(float("nan") if scale is None else scale)
        self.calibrated = scale is not None

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3 input, its scale)."""
        if self.observing:
            amax = x.detach().float().abs().amax()
            self.observed_amax = amax if self.observed_amax is None else torch.maximum(self.observed_amax, amax)
        scale = self.input_scale if self.calibrated else tensor_scale(x)
        return quantize(x, scale), scale

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The e4m3 weight read back in `dtype` (kept: the weight never changes)."""
        key = (dtype, self.weight_q.device)
        if key not in self._read:
            view = (-1,) + (1,) * (self.weight_q.dim() - 1)
            read = dequantize(self.weight_q, self.weight_scale.view(view), dtype)
            if read.dim() == 4 and self.weight_q.is_contiguous(memory_format=torch.channels_last):
                read = read.contiguous(memory_format=torch.channels_last)
            self._read[key] = read
        return self._read[key]

    @property
    def out_features(self) -> int:
        return self.weight_q.shape[0]


def _gemm(layer: _Fp8Layer, x: torch.Tensor, weight_q: torch.Tensor) -> torch.Tensor:
    """`x [..., K]` through `layer`'s e4m3 weight `weight_q [N, K]` (its bias added) in x's dtype:
    `torch._scaled_mm` where K and N are multiples of 16, else the operands read back."""
    q, scale = layer._input(x)
    rows = q.reshape(-1, q.shape[-1])
    n, k = weight_q.shape
    if k % _GEMM_MULTIPLE == 0 and n % _GEMM_MULTIPLE == 0:
        out = torch._scaled_mm(rows, weight_q.t(), scale_a=scale.expand(rows.shape[0], 1).contiguous(),
                               scale_b=layer.weight_scale.view(1, n), out_dtype=x.dtype)
    else:
        weight = layer.dequantized_weight(x.dtype).reshape(n, k)
        out = F.linear(dequantize(rows, scale, x.dtype), weight)
    if layer.bias is not None:
        out = out + layer.bias.to(x.dtype)
    return out.view(*x.shape[:-1], n)


class Fp8Linear(_Fp8Layer):
    """`nn.Linear` with e4m3 operands."""

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Fp8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gemm(self, x, self.weight_q)


class Fp8Conv(_Fp8Layer):
    """`nn.Conv1d` or `nn.Conv2d` with e4m3 operands; a 1-wide 1-D convolution also takes token
    rows with the channels last (`rows`), as the attention blocks apply theirs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups) -> None:
        super().__init__(weight, bias)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @classmethod
    def from_float(cls, conv: nn.Conv1d | nn.Conv2d) -> Fp8Conv:
        if conv.padding_mode != "zeros":
            raise ValueError(f"FP8 convolution supports zero padding only, got {conv.padding_mode!r}")
        return cls(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self._input(x)
        conv = F.conv2d if self.weight_q.dim() == 4 else F.conv1d
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return conv(dequantize(q, scale, x.dtype), self.dequantized_weight(x.dtype), bias, self.stride,
                    self.padding, self.dilation, self.groups)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This 1-wide 1-D convolution as a linear map of rows `x [..., C]` (an FP8 GEMM)."""
        if self.weight_q.dim() != 3 or self.weight_q.shape[2] != 1 or self.groups != 1:
            raise ValueError("rows() is for 1-wide 1-D convolutions")
        return _gemm(self, x, self.weight_q[:, :, 0])
