"""Layers with e4m3 weights (one scale per output channel) that quantise their input to e4m3 (one
scale per tensor: calibrated, or measured on each call) before the product.

`Fp8Linear` multiplies through `torch._scaled_mm` (FP8 operands, fp32 accumulation, both scales
applied in its epilogue) where the shapes allow, so the product is the FP8 GEMM itself.
`Fp8Conv` has two ways to compute, with the same quantisation (torch has no FP8 convolution):
- "gemm" (2-D 1×1 and 3×3 stride-1 convolutions): the e4m3 input gathered into its 3×3
  neighbourhoods (one row of 9·C bytes per output pixel, channels last; a 1×1 needs no gather)
  and multiplied with `torch._scaled_mm`, the weight laid out tap-major to match: the product
  runs at the FP8 GEMM rate, at the cost of a copy of nine bytes per input byte that an
  implicit-GEMM kernel would not write (`benchmarks/fp8_convs.py` times both parts).
- "implicit" (the same shapes): the implicit-GEMM Triton kernel of `models.fp8.implicit_gemm`,
  which reads the neighbourhoods straight from the unquantised input and quantises them as it
  loads them: neither a gathered nor a quantised copy is written.
- "readback": both operands read back in the input's dtype and convolved with torch's
  convolution (any shape; in fp32 the same products as the FP8 GEMM).
`CONV_PATH` picks: "auto" (the default) is, on CUDA where the shape allows, "cutlass" for a 3×3
convolution where that kernel is built and serves (it is the fastest way measured, docs/fp8.md)
and "gemm" otherwise (a 1×1 needs no gather: its GEMM is the whole product), else "readback";
"gemm" or "implicit" is that way wherever the shape allows, on any device (the CPU tests run them
so; "implicit" on a CPU needs `TRITON_INTERPRET=1`); "cutlass" is CUTLASS's Hopper implicit GEMM
where it is built and serves (`models.implicit_conv`), else the read-back way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.fp8.e4m3 import E4M3, channel_scales, dequantize, largest_magnitude, quantize, tensor_scale

_GEMM_MULTIPLE = 16  # `_scaled_mm` needs K and N multiples of 16
# (device type, output dtype) → how `_scaled_mm` with row-wise scales runs there: True (directly),
# "bfloat16" (with a bfloat16 result, cast), False (not at all); absent: not tried yet
_SCALED_MM_WORKS: dict[tuple[str, torch.dtype], bool | str] = {}
log = logging.getLogger(__name__)


_Maker = Callable[["_Fp8Layer", torch.Tensor], torch.Tensor]  # (layer, input scale) → a product of the scale


class _Fp8Layer(nn.Module):
    """The weight and scales both layer kinds hold. `input_scale` NaN: measured on each call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        scales = channel_scales(weight)
        view = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("weight_q", quantize(weight, scales.view(view)))
        self.register_buffer("weight_scale", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("input_scale", torch.full((), float("nan"), device=weight.device))  # beside the weight
        self.calibrated = False  # host-side copy of `input_scale`'s state: no device read per call
        self.observed_amax: torch.Tensor | None = None  # while calibrating: the largest |input| seen
        self.observing = False
        self._read: dict[tuple, torch.Tensor] = {}  # the weight read back (per dtype) or laid out for a GEMM
        self._fixed_products: dict[tuple, tuple[torch.Tensor, _Maker]] = {}  # `_fixed`'s: (product, its maker)

    def _apply(self, fn, recurse=True):
        # a dtype conversion of the model (`.half()`, `.to(dtype)`) must leave the e4m3 weight and
        # the fp32 scales as they are: only the bias follows the model's dtype
        kept = {name: getattr(self, name).dtype for name in ("weight_q", "weight_scale", "input_scale")}
        super()._apply(fn, recurse)
        for name, dtype in kept.items():
            if getattr(self, name).dtype != dtype:
                setattr(self, name, getattr(self, name).to(dtype))
        self._read.clear()
        self._fixed_products.clear()
        return self

    def set_input_scale(self, scale: float | None) -> None:
        """A fixed activation scale (calibrated), or None to measure each input's."""
        self.input_scale.fill_(float("nan") if scale is None else scale)
        self.calibrated = scale is not None
        if self.calibrated:  # in place: a captured CUDA graph reads these tensors by address
            for product, make in self._fixed_products.values():
                product.copy_(make(self, self.input_scale))

    def _fixed(self, name: str, scale: torch.Tensor, make: _Maker) -> torch.Tensor:
        """`make(self, scale)`, kept while `scale` is this layer's calibrated one: a fixed scale's
        products are made once, not by a kernel on every call (`set_input_scale` remakes them in
        place)."""
        # made during a graph capture it would live in the graph's memory pool: made there per call
        capturing = scale.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or not (self.calibrated and scale is self.input_scale):
            return make(self, scale)
        key = (name, scale.device)
        if key not in self._fixed_products:
            self._fixed_products[key] = (make(self, scale), make)
        return self._fixed_products[key][0]

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The input's scale (calibrated, or its own), recording its range while calibrating."""
        if self.observing:
            amax = largest_magnitude(x)
            self.observed_amax = amax if self.observed_amax is None else torch.maximum(self.observed_amax, amax)
        return self.input_scale if self.calibrated else tensor_scale(x)

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3 input, its scale): on a GPU in one pass (`models.fp8.quantize_kernel`)."""
        scale = self._input_scale(x)
        if x.is_cuda:
            from models.fp8.quantize_kernel import quantize_fused  # Triton: imported where it runs

            return quantize_fused(x, scale), scale
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


def _scaled_rows(rows: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor, layer: _Fp8Layer,
                 x: torch.Tensor) -> torch.Tensor | None:
    """e4m3 `rows` [M, K] times e4m3 `weight_q` [N, K] transposed, scaled per row by `scale` and per
    column by `layer.weight_scale`, in x's dtype, through `torch._scaled_mm`. Where this build takes
    row-wise scales only with a bfloat16 result, the GEMM writes bfloat16 and it is cast (a
    rounding far below FP8's own); None where it has no row-wise scaled GEMM at all. What works is
    found once per (device type, dtype), with a warning when it is not the direct call."""
    key = (x.device.type, x.dtype)
    known = _SCALED_MM_WORKS.get(key)
    if known is False:
        return None
    tries = [x.dtype] + ([torch.bfloat16] if x.dtype != torch.bfloat16 else [])
    if known == "bfloat16":
        tries = [torch.bfloat16]
    m = rows.shape[0]
    scale_a = layer._fixed(f"rows{m}", scale, lambda _, s: s.expand(m, 1).contiguous())
    for out_dtype in tries:
        try:
            out = torch._scaled_mm(rows, weight_q.t(), scale_a=scale_a, scale_b=layer.weight_scale.view(1, -1),
                                   out_dtype=out_dtype)
        except RuntimeError as exc:
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            continue
        if known is None:
            _SCALED_MM_WORKS[key] = True if out_dtype == x.dtype else "bfloat16"
            if out_dtype != x.dtype:
                log.warning("torch._scaled_mm takes row-wise scales with a bfloat16 result only on %s; FP8 "
                            "layers cast it to %s", x.device, x.dtype)
        return out.to(x.dtype)
    _SCALED_MM_WORKS[key] = False
    log.warning("torch._scaled_mm (row-wise scales) unavailable on %s: %s; FP8 layers read their operands back "
                "instead", x.device, problem)
    return None


def _gemm(layer: _Fp8Layer, x: torch.Tensor, weight_q: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """`x [..., K]` through `layer`'s e4m3 weight `weight_q [N, K]` (its bias added unless not
    `with_bias`) in x's dtype: `torch._scaled_mm` where K and N are multiples of 16, else the
    operands read back."""
    q, scale = layer._input(x)
    rows = q.reshape(-1, q.shape[-1])
    n, k = weight_q.shape
    out = None
    if k % _GEMM_MULTIPLE == 0 and n % _GEMM_MULTIPLE == 0:
        out = _scaled_rows(rows, weight_q, scale, layer, x)
    if out is None:
        weight = layer.dequantized_weight(x.dtype).reshape(n, k)
        out = F.linear(dequantize(rows, scale, x.dtype), weight)
    if with_bias and layer.bias is not None:
        out = out + layer.bias.to(x.dtype)
    return out.view(*x.shape[:-1], n)


class Fp8Linear(_Fp8Layer):
    """`nn.Linear` with e4m3 operands."""

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Fp8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gemm(self, x, self.weight_q)


CONV_PATH = "auto"  # "auto", "gemm", "implicit", "cutlass" or "readback" (module docstring)


def _gathered_rows(q: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """The e4m3 input `q` [B, C, H, W] as GEMM rows [B·H·W, taps·C] for a stride-1 convolution of
    `kernel` (1×1, or 3×3 with zero padding 1): each output pixel's neighbourhood, tap-major."""
    b, c, h, w = q.shape
    nhwc = q.permute(0, 2, 3, 1)
    if kernel == (1, 1):
        return nhwc.reshape(b * h * w, c)
    # bytes, not e4m3: padding and stacking are byte copies (e4m3 zero is the zero byte)
    padded = F.pad(nhwc.contiguous().view(torch.uint8), (0, 0, 1, 1, 1, 1))
    taps = [padded[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)]
    return torch.stack(taps, dim=3).view(q.dtype).reshape(b * h * w, 9 * c)


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

    def gemm_shape(self) -> bool:
        """Whether the "gemm" way takes this convolution (2-D, stride 1, no groups or dilation,
        1×1 unpadded or 3×3 padded by 1, channel counts the FP8 GEMM takes)."""
        w = self.weight_q
        if w.dim() != 4 or self.groups != 1 or tuple(self.stride) != (1, 1) or tuple(self.dilation) != (1, 1):
            return False
        kernel, padding = tuple(w.shape[2:]), tuple(self.padding)
        fits = (kernel, padding) in (((1, 1), (0, 0)), ((3, 3), (1, 1)))
        k = w.shape[1] * w.shape[2] * w.shape[3]
        return fits and k % _GEMM_MULTIPLE == 0 and w.shape[0] % _GEMM_MULTIPLE == 0

    def tap_major_weight(self) -> torch.Tensor:
        """The e4m3 weight as [N, taps·C], tap-major like `_gathered_rows` (kept)."""
        key = (E4M3, self.weight_q.device)
        if key not in self._read:
            w = self.weight_q.view(torch.uint8).permute(0, 2, 3, 1).contiguous()
            self._read[key] = w.view(E4M3).reshape(w.shape[0], -1)
        return self._read[key]

    def forward(self, x: torch.Tensor, path: str | None = None, with_bias: bool = True) -> torch.Tensor:
        """`path`: "gemm", "implicit", "cutlass" or "readback" for this call (strict; "cutlass" reads
        back where its kernel does not serve); None: `CONV_PATH`, where "gemm", "implicit",
        "cutlass" and "auto" (module docstring) mean that way wherever the shape allows.
        `with_bias=False`: the convolution without its bias (the fused path adds it in a later pass)."""
        if path is None:
            wanted = self._auto_path(x) if CONV_PATH == "auto" and x.is_cuda else CONV_PATH
            if wanted == "gemm" and _SCALED_MM_WORKS.get((x.device.type, x.dtype)) is False:
                wanted = "readback"  # no scaled GEMM on this build: gathering would be wasted
            allowed = wanted in ("gemm", "implicit", "cutlass") and x.dim() == 4 and self.gemm_shape()
            path = wanted if allowed else "readback"
        bias = self.bias if with_bias else None
        if path == "cutlass":
            return self._cutlass_forward(x, bias)
        if path in ("gemm", "implicit"):
            return self._gemm_forward(x, bias, implicit=path == "implicit")
        return self._readback(*self._input(x), x, bias)

    def _auto_path(self, x: torch.Tensor) -> str:
        """"auto"'s way on CUDA: CUTLASS for a 3×3 it serves, else the GEMM (see the module docstring)."""
        return "cutlass" if tuple(self.weight_q.shape[2:]) == (3, 3) and self._cutlass_serves() else "gemm"

    def _cutlass_serves(self) -> bool:
        """Whether CUTLASS's e4m3 kernel is built and takes this convolution (a GEMM-way shape)."""
        from models import implicit_conv

        w = self.weight_q
        return self.gemm_shape() and implicit_conv.serves_e4m3(w.shape[1], w.shape[0])

    def _cutlass_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution on CUTLASS's Hopper implicit GEMM with e4m3 operands
        (`models.implicit_conv`): the input quantised channels-last, the scales and the bias
        in the kernel's epilogue; the read-back way where that kernel does not serve."""
        if not (x.is_cuda and x.dim() == 4 and self._cutlass_serves()):
            return self._readback(*self._input(x), x, bias)
        out = self.cutlass_product(*self._input(x), bias)
        return out if x.dtype == torch.float16 else out.to(x.dtype)

    def _runs_on_cutlass(self, x: torch.Tensor) -> bool:
        """Whether the fused path's CUTLASS products take this convolution of `x`: a 3×3 the
        kernel serves, `CONV_PATH` "auto" or "cutlass", an fp16 CUDA map."""
        return (CONV_PATH in ("auto", "cutlass") and x.is_cuda and x.dtype == torch.float16 and x.dim() == 4
                and tuple(self.weight_q.shape[2:]) == (3, 3) and self._cutlass_serves())

    def quantized_input_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """The scale at which this convolution takes `x`'s kind of input already in e4m3
        (`product_of_quantized`): its calibrated input scale, where it runs on CUTLASS
        (`_runs_on_cutlass`) and is not calibrating (it must see the fp16 input then); else None."""
        if self.calibrated and not self.observing and self._runs_on_cutlass(x):
            return self.input_scale
        return None

    def product_of_quantized(self, q: torch.Tensor, with_bias: bool = True,
                             residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of an input already quantised at `quantized_input_scale` (e4m3,
        channels-last), plus the bias unless not `with_bias`, plus `residual` in the kernel's
        epilogue where given (`implicit_conv.residual_fits`): fp16, channels-last."""
        return self.cutlass_product(q, self.input_scale, self.bias if with_bias else None, residual)

    def cutlass_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """`self(x) + residual` with the bias and the residual added in the CUTLASS kernel's
        epilogue (rounded once); None where that kernel does not run this convolution
        (`_runs_on_cutlass`) or does not take `residual`."""
        from models import implicit_conv

        if not (self._runs_on_cutlass(x) and implicit_conv.residual_fits(residual, x, self.weight_q, self.padding)):
            return None
        return self.cutlass_product(*self._input(x), self.bias, residual)

    def cutlass_product(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """The CUTLASS kernel's convolution of the e4m3 input `q` (scale `scale`), plus `bias` (and
        `residual`, in the epilogue): fp16, channels-last. The caller checks that the kernel serves
        (`_cutlass_forward`) and takes the residual."""
        from models import implicit_conv

        weight, scales = self.cutlass_operands(scale)
        bias = None if bias is None else bias.to(torch.float16)
        return implicit_conv.conv2d_e4m3(q.contiguous(memory_format=torch.channels_last), weight, scales, bias,
                                         tuple(self.padding), residual)

    def cutlass_operands(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the CUTLASS kernel reads besides the input (input scale `scale`): the e4m3 weight as
        channels-last [N, C, kh, kw] and the epilogue's per-channel scales (input · weight)."""
        n, c, kh, kw = self.weight_q.shape
        # the tap-major weight's bytes are the channels-last [N, C, kh, kw] the kernel reads: a view
        weight = self.tap_major_weight().view(n, kh, kw, c).permute(0, 3, 1, 2)
        return weight, self._fixed("cutlass", scale, lambda layer, s: s.float() * layer.weight_scale.float())

    def _readback(self, q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution of the e4m3 input `q` (scale `scale`) read back in x's dtype, plus `bias`."""
        conv = F.conv2d if self.weight_q.dim() == 4 else F.conv1d
        bias = None if bias is None else bias.to(x.dtype)
        return conv(dequantize(q, scale, x.dtype), self.dequantized_weight(x.dtype), bias, self.stride,
                    self.padding, self.dilation, self.groups)

    def _gemm_forward(self, x: torch.Tensor, bias: torch.Tensor | None, implicit: bool = False) -> torch.Tensor:
        if not self.gemm_shape():
            raise ValueError(f"the FP8 GEMM way takes 1×1 and padded 3×3 stride-1 2-D convolutions, not "
                             f"{tuple(self.weight_q.shape)} stride {self.stride} padding {self.padding}")
        if implicit:  # the kernel quantises the input as it loads it
            from models.fp8.implicit_gemm import conv2d_nhwc  # Triton: imported where it runs

            return conv2d_nhwc(x, self.tap_major_weight(), self.weight_q.shape[2], bias,
                               a_scale=self._input_scale(x), b_scale=self.weight_scale, out_dtype=x.dtype,
                               tuned=x.is_cuda)
        q, scale = self._input(x)
        b, _, h, w = x.shape
        rows = _gathered_rows(q, tuple(self.weight_q.shape[2:]))
        n = self.weight_q.shape[0]
        out = _scaled_rows(rows, self.tap_major_weight(), scale, self, x)
        if out is None:  # no row-wise scaled GEMM here: the read-back convolution of the same input
            return self._readback(q, scale, x, bias)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.view(b, h, w, n).permute(0, 3, 1, 2)  # channels-last memory

    def rows(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """This 1-wide 1-D convolution as a linear map of rows `x [..., C]` (an FP8 GEMM)."""
        if self.weight_q.dim() != 3 or self.weight_q.shape[2] != 1 or self.groups != 1:
            raise ValueError("rows() is for 1-wide 1-D convolutions")
        return _gemm(self, x, self.weight_q[:, :, 0], with_bias)
