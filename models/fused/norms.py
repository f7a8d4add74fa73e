"""Group norm and the residual join on `cpp_ext`'s kernels.

The group norm kernel fuses what surrounds a norm in a ResBlock: an addition before it (the
time embedding's projection, a convolution's bias), the affine, a FiLM scale/shift, SiLU, and a
2x resize of its output (channels-last); statistics in float32. The join adds a block's residual
and the biases its convolutions ran without in one in-place pass, and may also do the next norm's
statistics pass (`NormInput`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

import cpp_ext
from models.fused.availability import layout, same_layout
from models.fused.options import FusedOptions
from models.fused.upsampled_conv import Phased
from models.layers import NORM_GROUPS, GroupNorm32, resample, tracing


class NormInput(NamedTuple):
    """A residual join's output `x` with the statistics pass of the group norm that reads it next
    already done (`cpp_ext.kernels.bias_residual_stats`): `group_norm` takes it and skips that
    pass (one read of `x` fewer); anything else reads `x` (`plain`)."""

    x: torch.Tensor
    partial: torch.Tensor


def plain(x: torch.Tensor | NormInput) -> torch.Tensor:
    """The tensor of `x`, without statistics."""
    return x.x if isinstance(x, NormInput) else x


def _rows(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """`t` as [B, C] rows in `dtype` for the kernel: channels contiguous, rows may be strided."""
    t = t.to(dtype).reshape(shape)
    return t if t.stride(-1) == 1 else t.contiguous()


def group_norm(
    norm: GroupNorm32, x: torch.Tensor | NormInput | Phased, scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None, silu: bool | None = None, add: torch.Tensor | None = None,
    add_bias: torch.Tensor | None = None, up: bool = False, down: bool = False,
) -> torch.Tensor:
    """`norm.forward_film(x + add + add_bias, scale, shift, silu)` then a nearest 2x upsampling
    (`up`) or 2x2 average pooling (`down`), by the kernel: per-sample [B, C] `add`, `scale`,
    `shift` (strided rows read in place, e.g. the two halves of one [B, 2C] projection), per-channel
    [C] `add_bias`, the resize fused into its writes for channels-last maps. A `NormInput`'s
    statistics replace the kernel's own statistics pass (only without `add` and `add_bias`, which
    change them). A `Phased` map is read in place from its folded product where
    `cpp_ext.kernels.group_norm_phased` serves it (`_phased_serves`), else interleaved first.
    `silu` None: the norm's own."""
    if isinstance(x, Phased):
        if not (up or down) and _phased_serves(norm, x):
            scale, shift, add = _sample_rows(x.shape[:2], x.product.dtype, scale, shift, add)
            return cpp_ext.kernels.group_norm_phased(x.product, norm.num_groups, norm.weight, norm.bias, scale, shift,
                                                     add, norm.eps, norm.silu if silu is None else silu, add_bias)
        x = x.tensor()
    x, partial, silu, scale, shift, add = _arguments(norm, x, scale, shift, silu, add, add_bias)
    nhwc = layout(x) == "nhwc"
    fuse_up, fuse_down = up and nhwc, down and nhwc and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
    y = cpp_ext.kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, scale, shift, add, norm.eps,
                                   silu, add_bias, -1, fuse_up, fuse_down, partial)
    return resample(y, up and not fuse_up, down and not fuse_down)


def _arguments(norm: GroupNorm32, x: torch.Tensor | NormInput, scale: torch.Tensor | None, shift: torch.Tensor | None,
               silu: bool | None, add: torch.Tensor | None, add_bias: torch.Tensor | None):
    """`group_norm`'s arguments as the kernels take them: (x, its given statistics or None, silu,
    scale, shift, add), the per-sample rows in x's dtype with their channels contiguous."""
    partial = x.partial if isinstance(x, NormInput) and add is None and add_bias is None else None
    x = plain(x)
    silu = norm.silu if silu is None else silu
    scale, shift, add = _sample_rows(x.shape[:2], x.dtype, scale, shift, add)
    return x, partial, silu, scale, shift, add


def _sample_rows(per_sample: torch.Size, dtype: torch.dtype, *rows: torch.Tensor | None) -> tuple:
    """Each of `rows` (None stays None) as [B, C] rows `per_sample` in `dtype` (`_rows`)."""
    return tuple(None if t is None else _rows(t, per_sample, dtype) for t in rows)


def _phased_serves(norm: GroupNorm32, x: Phased) -> bool:
    """Whether `cpp_ext.kernels.group_norm_phased` reads the `Phased` map `x` in place: built, the
    norm's weights in the product's dtype, and the kernel's own rule
    (`group_norm_phased_serves`: a channels-last half-precision product, K a multiple of 8, a map
    whose norm runs three passes; a small map's one-launch norm of the interleaved copy is left
    as it is)."""
    return (cpp_ext.kernels is not None and hasattr(cpp_ext.kernels, "group_norm_phased") and not tracing()
            and norm.weight.dtype == x.product.dtype
            and cpp_ext.kernels.group_norm_phased_serves(x.product, norm.num_groups))


def _writes_e4m3(x: torch.Tensor) -> bool:
    """Whether the norm can write e4m3 for `x`: the extension has the coefficients pass and the
    quantising normalisation takes the map (channels-last, on a GPU)."""
    from models.fp8 import normalize_kernel  # Triton: imported where it may run

    return (cpp_ext.kernels is not None and hasattr(cpp_ext.kernels, "group_norm_coefficients") and x.is_cuda
            and not tracing() and normalize_kernel.serves(x))


def group_norm_e4m3(
    norm: GroupNorm32, x: torch.Tensor | NormInput, out_scale: torch.Tensor, scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None, silu: bool | None = None, add: torch.Tensor | None = None,
    add_bias: torch.Tensor | None = None, up: bool = False, down: bool = False,
) -> torch.Tensor | None:
    """`quantize(group_norm(norm, x, scale, shift, silu, add, add_bias, up, down), out_scale)`
    without the fp16 output: the kernel's statistics and coefficients passes, then a normalising
    pass that writes e4m3 (`models.fp8.normalize_kernel`, resized as `group_norm` would) for an
    FP8 convolution whose calibrated input scale is `out_scale`. None where it does not serve (see
    `_writes_e4m3`; `down` on an odd height or width): the caller runs `group_norm` and the
    convolution's own quantisation."""
    t = plain(x)
    if not _writes_e4m3(t) or (down and (t.shape[2] % 2 or t.shape[3] % 2)):
        return None
    from models.fp8.normalize_kernel import normalize_quantize

    x, partial, silu, scale, shift, add = _arguments(norm, x, scale, shift, silu, add, add_bias)
    coef = cpp_ext.kernels.group_norm_coefficients(x, norm.num_groups, norm.weight, norm.bias, scale, shift, add,
                                                   norm.eps, add_bias, partial)
    return normalize_quantize(x, coef, out_scale, silu, up=up, down=down)


def group_norm_concat_e4m3(
    norm: GroupNorm32, first: torch.Tensor, second: torch.Tensor, out_scale: torch.Tensor,
    first_bias: torch.Tensor | None = None, first_bias2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(`group_norm_e4m3` of cat(first (+ first_bias + first_bias2), second), that concatenation),
    by `cpp_ext.kernels.group_norm_concat_coefficients` (its statistics pass writes the
    concatenation) and the quantising normalisation; None where it does not serve."""
    if not _writes_e4m3(first):
        return None
    from models.fp8.normalize_kernel import normalize_quantize

    coef, cat = cpp_ext.kernels.group_norm_concat_coefficients(first, second, norm.num_groups, norm.weight, norm.bias,
                                                               norm.eps, first_bias, first_bias2)
    return normalize_quantize(cat, coef, out_scale, norm.silu), cat


def bias_residual(h: torch.Tensor, skip: torch.Tensor, bias: torch.Tensor, bias2: torch.Tensor | None = None,
                  stats: bool = False, options: FusedOptions | None = None) -> torch.Tensor | NormInput:
    """`h + skip + bias (+ bias2)` with per-channel biases of [B, C, ...] activations: the residual
    join of a block whose last convolution ran without its bias. `skip` may have half h's height
    and width (it is then nearest-upsampled 2x: an up ResBlock's identity skip) or twice them (it
    is then 2x2 average-pooled: a down ResBlock's). With `cpp_ext` built, one in-place pass over
    `h` (it must be a fresh tensor the caller owns; a resized skip is read in place when both are
    channels-last); else torch ops.

    :param stats: a group norm reads the result next: where that norm would run three passes
        (`_join_stats_serve`), the join also computes its statistics and returns a `NormInput`
        (the sum then goes to a new tensor; `h` is left as it is)."""
    four_d = h.dim() == 4 and skip.dim() == 4 and skip.shape[:2] == h.shape[:2]
    up = four_d and skip.shape[2] * 2 == h.shape[2] and skip.shape[3] * 2 == h.shape[3]
    down = four_d and skip.shape[2] == h.shape[2] * 2 and skip.shape[3] == h.shape[3] * 2
    same = h.shape == skip.shape and same_layout(h, skip)
    if (cpp_ext.kernels is not None and not tracing() and h.dtype == skip.dtype == bias.dtype
            and (same or ((up or down) and layout(h) == layout(skip) == "nhwc"))):
        if stats and (options is None or options.join_stats) and _join_stats_serve(h, skip, bias2):
            return NormInput(*cpp_ext.kernels.bias_residual_stats(h, skip, bias, bias2, NORM_GROUPS))
        cpp_ext.kernels.bias_residual_(h, skip, bias, bias2)
        return h
    skip = resample(skip, up, down)
    shape = (1, -1, *([1] * (h.dim() - 2)))
    out = h + bias.reshape(shape).to(h.dtype)
    if bias2 is not None:
        out = out + bias2.reshape(shape).to(h.dtype)
    return skip + out


def _join_stats_serve(h: torch.Tensor, skip: torch.Tensor, bias2: torch.Tensor | None) -> bool:
    """Whether `bias_residual_stats` serves this join (given `bias_residual_` does) and pays: both
    maps channels-last, 16-byte aligned, and the next norm over h's size would run three
    passes (`cpp_ext.kernels.group_norm_takes_three_passes`; one-pass norms read small maps from
    L2 anyway)."""
    return (h.dim() == 4 and layout(h) == layout(skip) == "nhwc" and (bias2 is None or bias2.dtype == h.dtype)
            and h.data_ptr() % 16 == 0 and skip.data_ptr() % 16 == 0
            and cpp_ext.kernels.group_norm_takes_three_passes(h.shape[1], NORM_GROUPS, h.shape[2] * h.shape[3]))
