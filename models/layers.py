"""Small building blocks shared by the prior and the UNets.

Norms compute their statistics in float32 whatever the input dtype (as Karlo's `GroupNorm32`/
`LayerNorm` do), so fp16 inference keeps float32 statistics (float64 inputs stay float64, for
reference runs); on CUDA, torch's half-precision norms compute in float32 already.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def tracing() -> bool:
    """Whether torch is tracing, exporting to ONNX or compiling: a fast path must not run then."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


NORM_GROUPS = 32  # GroupNorm32's


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups with float32 statistics, optionally followed by SiLU."""

    def __init__(self, channels: int, silu: bool) -> None:
        super().__init__(NORM_GROUPS, channels, eps=1e-5)
        self.silu = silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_film(x, None, None, self.silu)

    def forward_film(
        self, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None, silu: bool,
        add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`act(norm(x + add) * (1 + scale) + shift)` with per-sample [B, C] `add`, `scale` and
        `shift` (each None: left out): the ResBlock's time conditioning (added, or FiLM)."""
        broadcast = (*x.shape[:2], *([1] * (x.dim() - 2)))  # [B, C] → [B, C, 1, ...]
        if add is not None:
            x = x + add.reshape(broadcast).to(x.dtype)
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


def pointwise_rows(conv: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """A 1-wide 1-D convolution applied to token rows `[..., C]` (channels last) as the linear
    map it is; a layer standing in for `nn.Conv1d` (e.g. `models.fp8.Fp8Conv`) supplies `rows`."""
    if isinstance(conv, nn.Conv1d):
        return F.linear(rows, conv.weight[:, :, 0], conv.bias)
    return conv.rows(rows)


def resample(x: torch.Tensor, up: bool = False, down: bool = False) -> torch.Tensor:
    """Nearest 2x upsampling (`up`) or 2x2 average pooling (`down`), the UNets' two resamplings."""
    if up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.avg_pool2d(x, kernel_size=2, stride=2) if down else x


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in (at least) float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and self.weight is not None
                and self.weight.dtype == x.dtype and not tracing()):
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


def causal_bias(n: int, device: torch.device | None = None) -> torch.Tensor:
    """[n, n] additive bias that hides future positions (-inf above the diagonal), on `device`
    or the default device (the CPU in place of meta: see `concrete_default_device`)."""
    return torch.full((n, n), float("-inf"), device=device or concrete_default_device()).triu_(1)


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
