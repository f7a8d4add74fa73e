"""A 3×3 convolution of a nearest-2x-upsampled map, computed on the map before upsampling.

Nearest upsampling repeats each pixel in a 2×2 block, so each output pixel of
`conv3x3(upsample(y))` reads only two distinct rows and two distinct columns of `y`, and which
ones depends only on the pixel's row and column parity (its phase a, b). Per phase the 3×3
kernel's rows fold into two — a = 0: [w0, w1 + w2] over y's rows i-1 and i; a = 1: [w0 + w1, w2]
over rows i and i+1 — and its columns likewise. The four phases together are one 2×2
convolution of `y` padded by 1, with four times the output channels; each phase's H×W outputs
sit at a shifted window of its (H+1)×(W+1) output, from which `interleave` writes the upsampled
map. That product is 4/9 of the 3×3 one at twice the size (the UNets' up blocks: a tenth of a
Karlo super-res forward's products), and the upsampled input is never written. The folded
weights are summed in float32 and rounded once to the weights' dtype, so the result equals the
reference within that dtype's rounding, not bit for bit.

The interleave need not be a copy of its own: `folded_product` returns the product as a `Phased`
map, which the up block's second norm (its only reader) reads in place where its kernel serves
(`models.fused.norms.group_norm`, `cpp_ext.kernels.group_norm_phased`); anything else takes
`Phased.tensor()`, the interleaved copy.

Where the map is small the folded product is no shorter than the plain one and the copy is extra
(the decoder's 8×8 maps at its guided batch of two, docs/kernels.md); with
`FusedOptions.fold_race` the fold runs only where a race of both ways on the shape (`fold_pays`)
finds it faster.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models import conv_choices, implicit_conv, race_timing
from models.fused.availability import layout
from models.fused.derived import derived
from models.fused.options import FusedOptions

# FOLD[a][u, t]: how much of the 3×3 kernel's row (column) t the 2×2 kernel's row u of phase a holds
FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # the phases' order along the folded output channels
_chosen: dict[tuple, bool] = {}  # fold_pays' race key → whether the fold runs
_loaded: set[str] = set()  # the environments whose stored choices this process has read


class Phased(NamedTuple):
    """The upsampled map [B, K, 2H, 2W] a folded convolution computed, still as its product
    [B, 4K, H+1, W+1] (`interleave`'s input): phase (a, b)'s K channels at pixel (i + a, j + b)
    are the map's pixel (2i + a, 2j + b)."""

    product: torch.Tensor

    def tensor(self) -> torch.Tensor:
        """The map itself (`interleave`'s copy, channels-last)."""
        return interleave(self.product)

    @property
    def shape(self) -> torch.Size:
        """The map's shape, [B, K, 2H, 2W]."""
        b, k4, h1, w1 = self.product.shape
        return torch.Size((b, k4 // 4, 2 * (h1 - 1), 2 * (w1 - 1)))


def serves(conv: nn.Module, y: torch.Tensor) -> bool:
    """Whether `conv` is a plain 3×3 convolution padded by 1 (zeros), stride, dilation and groups
    1, and `y` a 4-D map: what the fold computes exactly."""
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and y.dim() == 4)


def fold_weights(weight: torch.Tensor) -> torch.Tensor:
    """[K, C, 3, 3] → [4K, C, 2, 2]: the 2×2 kernels of the four phases (`PHASES` order, K output
    channels each), summed in float32 (or float64 weights' own), in `weight`'s dtype and memory format."""
    work = torch.promote_types(weight.dtype, torch.float32)
    fold = torch.tensor(FOLD, dtype=work, device=weight.device)
    w = weight.to(work)
    phases = [torch.einsum("uy,kcyx,vx->kcuv", fold[a], w, fold[b]) for a, b in PHASES]
    out = torch.cat(phases).to(weight.dtype)
    if layout(weight) == "nhwc":
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def interleave(out: torch.Tensor) -> torch.Tensor:
    """The folded product [B, 4K, H+1, W+1] → the upsampled map [B, K, 2H, 2W]: phase (a, b) of
    output pixel (i, j), i.e. pixel (2i + a, 2j + b), is the folded output at (i + a, j + b) in
    that phase's channels. One copy, read through a strided view whose elements are the widest
    unit (up to 16 bytes) that K channels fill evenly: a pixel's channels move as a few wide
    elements, not K half-precision ones. Channels-last out."""
    b, k4, h1, w1 = out.shape
    k, h, w = k4 // 4, h1 - 1, w1 - 1
    rows = out.permute(0, 2, 3, 1).contiguous()  # [B, H+1, W+1, 4K]; no copy for a channels-last `out`
    unit = _unit(rows, k)
    rows = rows.view(unit)
    n, row = k * out.element_size() // unit.itemsize, w1 * 4 * k * out.element_size() // unit.itemsize
    # [B, H, 2 (a), W, 2 (b), n]: offset of (i, a, j, b, c) = (i + a)·row + (j + b)·4n + (2a + b)·n + c
    phased = rows.as_strided((b, h, 2, w, 2, n), (rows.stride(0), row, row + 2 * n, 4 * n, 5 * n, 1),
                             rows.storage_offset())
    y = torch.empty((b, h, 2, w, 2, n), dtype=unit, device=out.device)
    y.copy_(phased)
    return y.view(out.dtype).view(b, 2 * h, 2 * w, k).permute(0, 3, 1, 2)


def _unit(rows: torch.Tensor, k: int) -> torch.dtype:
    """The widest dtype (16, 8, 4 or 2 bytes, or `rows`' own) whose elements tile a pixel's K
    channels of `rows` evenly and start aligned: `interleave`'s element."""
    nbytes = k * rows.element_size()
    offset = rows.storage_offset() * rows.element_size()
    for unit in (torch.complex128, torch.int64, torch.int32, torch.int16):
        if unit.itemsize >= rows.element_size() and nbytes % unit.itemsize == 0 and offset % unit.itemsize == 0:
            return unit
    return rows.dtype


def folded_weights(conv: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor | None:
    """`fold_weights(conv.weight)` in `dtype`, kept while the weight stays as it is; None during a
    CUDA graph capture that finds it not yet made (the caller takes the plain path)."""
    def build() -> torch.Tensor:
        return fold_weights(conv.weight.detach().to(dtype))

    return derived(conv, "folded_weights").get((conv.weight,), (dtype,), build)


def conv_of_upsampled(y: torch.Tensor, folded: torch.Tensor, options: FusedOptions) -> torch.Tensor:
    """`conv(upsample(y))` without the convolution's bias, from its folded weights `folded`
    (`folded_weights`): the 2×2 product on CUTLASS's implicit GEMM or cuDNN, whichever the
    shape's race keeps (`options.cutlass_convs`; else cuDNN's), then `interleave`."""
    return interleave(_product(y, folded, options))


def folded_product(y: torch.Tensor, folded: torch.Tensor, options: FusedOptions) -> Phased:
    """`conv_of_upsampled(y, folded, options)` as a `Phased` map: the product without the
    interleave, for a reader that takes each pixel where the product holds it."""
    return Phased(_product(y, folded, options))


def _product(x: torch.Tensor, weight: torch.Tensor, options: FusedOptions) -> torch.Tensor:
    """`x`'s convolution by `weight` padded by 1 (the 3×3 one of an upsampled map, or the fold's
    2×2 one), on the race of CUTLASS and cuDNN (`options.cutlass_convs`) or cuDNN's."""
    if options.cutlass_convs:
        return implicit_conv.conv2d(x, weight, None, (1, 1))
    return F.conv2d(x, weight, None, padding=1)


def fold_pays(y: torch.Tensor, weight: torch.Tensor, folded: torch.Tensor, options: FusedOptions) -> bool:
    """Whether the fold (`conv_of_upsampled(y, folded)`) is faster than the convolution of the
    upsampled map for maps of `y`'s shape, dtype and device: raced once per shape on operands of
    its kind, each way replayed from CUDA graphs (`models.race_timing.graph_times`; each way's own
    convolution choices made at its first, untimed launch), and kept beside the convolutions'
    choices (`models.conv_choices`, the same environment); a later process reads it. Inside a
    CUDA-graph capture that finds no choice: the fold (the race cannot run there)."""
    kind = "fold" if options.cutlass_convs else "fold_cudnn"
    key = (kind, tuple(y.shape), tuple(weight.shape), (1, 1))
    if key in _chosen:
        return _chosen[key]
    environment = implicit_conv.environment(y.device)
    if environment not in _loaded:
        _loaded.add(environment)
        for stored, name in conv_choices.load(conv_choices.cache_path(), environment).items():
            if stored[0] in ("fold", "fold_cudnn") and name in ("folded", "plain"):
                _chosen.setdefault(stored, name == "folded")
        if key in _chosen:
            return _chosen[key]
    if y.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    sample = torch.randn(y.shape, dtype=y.dtype, device=y.device).contiguous(memory_format=torch.channels_last)
    upsampled = F.interpolate(sample, scale_factor=2, mode="nearest").contiguous(memory_format=torch.channels_last)

    def launch(way: str, sample: torch.Tensor, upsampled: torch.Tensor, weight: torch.Tensor,
               folded: torch.Tensor) -> torch.Tensor:
        if way == "folded":
            return conv_of_upsampled(sample, folded, options)
        return _product(upsampled, weight, options)

    times = race_timing.graph_times(("folded", "plain"), launch, (sample, upsampled, weight, folded))
    _chosen[key] = pays = times.get("folded", float("inf")) <= times.get("plain", float("inf"))
    conv_choices.save(conv_choices.cache_path(), environment, {key: "folded" if pays else "plain"})
    return pays
