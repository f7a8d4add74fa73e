"""Small building blocks shared by the prior and the UNets.

Norms compute their statistics in float32 whatever the input dtype (as Karlo's `GroupNorm32`/
`LayerNorm` do), so fp16 inference keeps float32 statistics (float64 inputs stay float64, for
reference runs); on CUDA, half-precision group norm gets that from the native kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import cpp_ext


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding `[cos | sin]` of (possibly fractional) timesteps.

    :param timesteps: [N] tensor of timesteps (the original 0..T-1 index).
    :param dim: embedding size (even).
    :param dtype: dtype of the computation and result (float32 as Karlo and diffusers; float64
        for float64 reference runs).
    :return: [N, dim] tensor; frequency i is exp(-ln(max_period) * i / (dim/2)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half)
    args = timesteps.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class DerivedTensors:
    """What a module derives from some of its tensors (a stacked, widened or tabulated copy of
    weights), kept while they stay as they are: the same storage (`data_ptr`), no in-place write
    (`_version`) and the same `extra` key (dtypes, devices). `get` returns the kept value, or
    builds it anew — except during a CUDA graph capture (its kernels would not run then) or from
    inference tensors (they keep no version counter), where it returns None and the caller takes
    its plain path."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, tensors: Iterable[torch.Tensor], extra: tuple, build: Callable[[], Any]) -> Any:
        tensors = tuple(tensors)
        try:
            key = extra + tuple((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors: no version counter
            return None
        if self.key != key:
            if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
                return None
            with torch.no_grad():
                self.value = build()
            self.key = key
        return self.value


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def fused_kernels_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `cpp_ext`'s half-precision kernels serve `x` with `weight` (built, CUDA, fp16/bf16,
    one dtype, eager or graph capture; never while exporting or compiling)."""
    return (cpp_ext.kernels is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and not _tracing())


NORM_GROUPS = 32  # GroupNorm32's

# Whether residual joins on the fused path compute the statistics of the group norm that reads
# their output next (`bias_residual(..., stats=True)`); a switch for tests and benchmarks.
JOIN_STATS = True


class NormInput(NamedTuple):
    """A residual join's output `x` with the statistics pass of the group norm that reads it next
    already done (`cpp_ext.kernels.bias_residual_stats`): `GroupNorm32` takes it and skips that
    pass (one read of `x` fewer); anything else reads `x` (`plain`)."""

    x: torch.Tensor
    partial: torch.Tensor


def plain(x: torch.Tensor | NormInput) -> torch.Tensor:
    """The tensor of `x`, without statistics."""
    return x.x if isinstance(x, NormInput) else x


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups with float32 statistics, optionally followed by SiLU.

    On CUDA in half precision it runs `cpp_ext`'s kernel when built (NCHW or channels-last; the
    affine, an optional scale/shift and SiLU fused into the normalising pass), else torch's."""

    def __init__(self, channels: int, silu: bool) -> None:
        super().__init__(NORM_GROUPS, channels, eps=1e-5)
        self.silu = silu

    def forward(self, x: torch.Tensor | NormInput, up: bool = False, down: bool = False) -> torch.Tensor:
        """The norm (and SiLU); `up`: then a nearest 2x upsampling, `down`: then a 2x2 average
        pooling (both fused into the kernel's writes for channels-last input). A `NormInput`'s
        statistics replace the kernel's own statistics pass."""
        partial = x.partial if isinstance(x, NormInput) else None
        return self.forward_film(plain(x), None, None, self.silu, up=up, down=down, partial=partial)

    def forward_film(
        self, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, silu: bool,
        add: torch.Tensor | None = None, add_bias: torch.Tensor | None = None, up: bool = False,
        down: bool = False, partial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`act(norm(x + add + add_bias) * (1 + scale) + shift)` with per-sample [B, C] `add`, `scale`
        and `shift` and per-channel [C] `add_bias` (each None: left out), nearest-upsampled 2x if
        `up`. The fused kernel reads strided rows (e.g. the two halves of one [B, 2C] projection)
        without copies. `partial`: x's statistics from the join that made it (`NormInput`; used
        by the fused kernel, and only without `add` and `add_bias`)."""
        if fused_kernels_available(x, self.weight):
            per_sample = x.shape[:2]
            if scale is not None:
                scale, shift = _rows(scale, per_sample, x.dtype), _rows(shift, per_sample, x.dtype)
            if add is not None:
                add = _rows(add, per_sample, x.dtype)
            nhwc = _layout(x) == "nhwc"
            fuse_up, fuse_down = up and nhwc, down and nhwc and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            if add is not None or add_bias is not None:
                partial = None
            y = cpp_ext.kernels.group_norm(x, self.num_groups, self.weight, self.bias, scale, shift, add, self.eps,
                                           silu, add_bias, -1, fuse_up, fuse_down, partial)
            return resample(y, up and not fuse_up, down and not fuse_down)
        if up or down:
            return resample(self.forward_film(x, scale, shift, silu, add, add_bias), up, down)
        broadcast = (*x.shape[:2], *([1] * (x.dim() - 2)))  # [B, C] → [B, C, 1, ...]
        if add is not None:
            x = x + add.reshape(broadcast).to(x.dtype)
        if add_bias is not None:
            x = x + add_bias.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.weight.dtype == x.dtype:
            # CUDA's half-precision group norm accumulates its statistics in float32 already.
            y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            w = work_dtype(x.dtype)
            y = F.group_norm(x.to(w), self.num_groups, self.weight.to(w), self.bias.to(w), self.eps)
        if scale is not None:
            y = y * (1 + scale.reshape(broadcast).to(y.dtype)) + shift.reshape(broadcast).to(y.dtype)
        if silu:
            y = F.silu(y)
        return y.to(x.dtype)


def resample(x: torch.Tensor, up: bool = False, down: bool = False) -> torch.Tensor:
    """Nearest 2x upsampling (`up`) or 2x2 average pooling (`down`), the UNets' two resamplings."""
    if up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.avg_pool2d(x, kernel_size=2, stride=2) if down else x


def _rows(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """`t` as [B, C] rows in `dtype` for the group norm kernel: channels contiguous, rows may be strided."""
    t = t.to(dtype).reshape(shape)
    return t if t.stride(-1) == 1 else t.contiguous()


def bias_residual(h: torch.Tensor, skip: torch.Tensor, bias: torch.Tensor, bias2: torch.Tensor | None = None,
                  stats: bool = False) -> torch.Tensor | NormInput:
    """`h + skip + bias (+ bias2)` with per-channel biases of [B, C, ...] activations: the residual
    join of a block whose last convolution ran without its bias. `skip` may have half h's height
    and width (it is then nearest-upsampled 2x: an up ResBlock's identity skip) or twice them (it
    is then 2x2 average-pooled: a down ResBlock's). On CUDA with `cpp_ext` built, one in-place
    pass over `h` (it must be a fresh tensor the caller owns; a resized skip is read in place when
    both are channels-last); else torch ops.

    :param stats: a `GroupNorm32` reads the result next: where that norm would run three passes
        (`_join_stats_serve`), the join also computes its statistics and returns a `NormInput`
        (the sum then goes to a new tensor; `h` is left as it is)."""
    four_d = h.dim() == 4 and skip.dim() == 4 and skip.shape[:2] == h.shape[:2]
    up = four_d and skip.shape[2] * 2 == h.shape[2] and skip.shape[3] * 2 == h.shape[3]
    down = four_d and skip.shape[2] == h.shape[2] * 2 and skip.shape[3] == h.shape[3] * 2
    same = h.shape == skip.shape and _same_layout(h, skip)
    if (cpp_ext.kernels is not None and h.is_cuda and not _tracing() and h.dtype == skip.dtype == bias.dtype
            and (same or ((up or down) and _layout(h) == _layout(skip) == "nhwc"))):
        if stats and _join_stats_serve(h, skip, bias2):
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
    maps channels-last fp16/bf16, 16-byte aligned, and the next norm over h's size would run three
    passes (`cpp_ext.kernels.group_norm_takes_three_passes`; one-pass norms read small maps from
    L2 anyway)."""
    kernels = cpp_ext.kernels
    return (JOIN_STATS and h.dim() == 4
            and h.dtype in (torch.float16, torch.bfloat16) and _layout(h) == _layout(skip) == "nhwc"
            and (bias2 is None or bias2.dtype == h.dtype)
            and h.data_ptr() % 16 == 0 and skip.data_ptr() % 16 == 0
            and kernels.group_norm_takes_three_passes(h.shape[1], NORM_GROUPS, h.shape[2] * h.shape[3]))


def _layout(t: torch.Tensor) -> str | None:
    """"nchw" (contiguous), "nhwc" (channels-last only) or None (neither)."""
    if t.is_contiguous():
        return "nchw"
    return "nhwc" if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else None


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both contiguous, or both channels-last (the kernel's two layouts)."""
    return _layout(a) is not None and _layout(a) == _layout(b)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in (at least) float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.weight is not None
                and self.weight.dtype == x.dtype and not _tracing()):
            # CUDA's half-precision layer norm computes in float32 already: one kernel, not three.
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        work = work_dtype(x.dtype)
        w = None if self.weight is None else self.weight.to(work)
        b = None if self.bias is None else self.bias.to(work)
        return F.layer_norm(x.to(work), self.normalized_shape, w, b, self.eps).to(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (guided-diffusion's init for residual outputs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def causal_bias(n: int) -> torch.Tensor:
    """[n, n] additive bias that hides future positions (-inf above the diagonal), on the default
    device (the CPU in place of meta: see `concrete_default_device`)."""
    return torch.full((n, n), float("-inf"), device=concrete_default_device()).triu_(1)


def concrete_default_device() -> torch.device:
    """torch's default device, or the CPU where that is meta: for the few buffers a module builds
    with ops (`triu_`, `eye`) that torch runs on meta tensors through its Python references, whose
    first call imports `torch._dynamo` (seconds of a new process's model load that needs none of
    it). Such a buffer is tiny and is rebuilt or loaded after a meta build."""
    device = torch.get_default_device()
    return torch.device("cpu") if device.type == "meta" else device


def additive_mask(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean keep-mask → additive attention bias (0 where kept, -inf where masked)."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(~keep, float("-inf"))
