"""A convolution as an implicit GEMM in Triton: channels-last input, 1×1 or 3×3 (padding 1,
stride 1) kernels, e4m3 or fp16 operands, fp32 accumulation.

Rows are output pixels, columns output channels, and the reduction runs over the kernel's taps
and the input channels (tap-major, the weight laid out [N, taps·C] to match, the reduction
contiguous as Hopper's FP8 MMA wants its operands): one loop covers the whole reduction, each
step loading the input elements its indices name straight from the NHWC tensor (a fixed offset
from each output pixel, masked at the borders: the zero padding), so no gathered copy of the
input is ever written; an input in fp16 or fp32 with an e4m3 weight is quantised as it is
loaded, so no quantised copy either. e4m3 products are promoted to fp32 once per tile. The
epilogue applies the scales (e4m3: the input's per-tensor scale times the weight's
per-output-channel scale) and the bias, and stores NHWC in the output dtype.

`models.fp8.layers.Fp8Conv` runs e4m3 convolutions through it where `CONV_PATH` says
"implicit"; `benchmarks/fp8_convs.py` times it, in both operand types, against cuDNN's fp16
convolution. Under `TRITON_INTERPRET=1` it runs on the CPU (how CI checks it).

`conv2d_nhwc_split_k` runs the same kernel with the reduction split into slices, one program
column per slice writing float32 partial sums, and a second kernel adding the slices in order
with the bias (deterministic): for fp16 convolutions with few output tiles and a long reduction
(the decoder's 16² and 8² maps at its guided batch), whose one-pass implicit GEMMs leave most SMs
idle (`benchmarks/conv_split_k.py` times it against cuDNN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]


@triton.jit
def _conv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, M, H, W, C, N, K_SPLIT,
                 KS: tl.constexpr, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, QUANTIZE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # program column s sums the reduction indices [s·K_SPLIT, (s + 1)·K_SPLIT) into its own [M, N]
    # slice of out (K_SPLIT ≥ the whole reduction and one column: the plain convolution)
    # grouped launch order: neighbouring programs share weight columns in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y = (offs_m % (H * W)) // W
    x = offs_m % W
    pixel = offs_m.to(tl.int64) * C  # where each output pixel's own input pixel starts
    taps_c = KS * KS * C
    split = tl.program_id(1)
    k_begin = split * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, taps_c)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALED:  # (QUANTIZE comes with SCALED) both scales at once: each tile's sum is scaled as it is added
        a_scale = tl.load(a_scale_ptr)
        ab_scale = a_scale * tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    # one loop over the whole reduction (taps × channels), so the load pipeline runs across taps;
    # each reduction index k is a tap (dy, dx) and a channel, and its input element sits at a
    # fixed offset from the output pixel's own: ((dy·W + dx)·C + channel)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tap = offs_k // C
        dy = tap // KS - KS // 2
        dx = tap % KS - KS // 2
        shift = (dy * W + dx) * C + offs_k % C
        yy = y[:, None] + dy[None, :]
        xx = x[:, None] + dx[None, :]
        inside = (offs_m[:, None] < M) & (offs_k[None, :] < k_end) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        a = tl.load(x_ptr + pixel[:, None] + shift[None, :], mask=inside, other=0.0)
        if QUANTIZE:  # the input's own dtype in memory, e4m3 in registers: no quantised copy
            # divided, not multiplied by the reciprocal: quantize's own rounding, so the same bytes
            a = tl.clamp(a.to(tl.float32) / a_scale, -448.0, 448.0)
            a = a.to(w_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # as torch's cast rounds
        # the weight is [N, taps·C]: a K-contiguous tile, the operand order Hopper's FP8 MMA takes
        b = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * taps_c + offs_k[:, None],
                    mask=(offs_k[:, None] < k_end) & (offs_n[None, :] < N), other=0.0)
        if SCALED:
            # e4m3 products: Hopper's FP8 MMA keeps its running sum in fewer bits than fp32, so
            # each tile's products are summed on their own and added to the fp32 total outside
            # the MMA (scaled first, which also keeps the compiler from folding the add into it)
            acc += tl.dot(a, b) * ab_scale[None, :]
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_tuned = triton.autotune(_CONFIGS, key=["C", "N", "KS", "SCALED", "QUANTIZE"])(_conv_kernel)

# split-K tiles: the output has few rows (one or a few 64-row tiles), so narrower tiles and more of them
_SPLIT_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_tuned_split = triton.autotune(_SPLIT_CONFIGS, key=["M", "C", "N", "KS", "K_SPLIT"])(_conv_kernel)


@triton.jit
def _sum_slices(part_ptr, bias_ptr, out_ptr, MN, N, SLICES: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr):
    # out = Σ_s part[s] (+ bias per column), the slices added in order: the same bits on every call
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SLICES):
        acc += tl.load(part_ptr + s * MN + offs, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight [N, C, k, k] laid out [N, k·k·C] (each output channel's taps in order, the
    input channels contiguous within a tap): the reduction dimension contiguous."""
    raw = weight.view(torch.uint8) if weight.element_size() == 1 else weight
    laid = raw.permute(0, 2, 3, 1).contiguous()  # [N, k, k, C]
    return (laid.view(weight.dtype) if weight.element_size() == 1 else laid).reshape(weight.shape[0], -1)


def _operands(x: torch.Tensor, weight_nk: torch.Tensor,
              kernel: int) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    """Both wrappers' checks and input: x as a contiguous [B, H, W, C] (a view of channels-last x),
    x's shape and the output channels; ValueError for a kernel the kernel does not take or a weight
    that is not [N, kernel²·C]."""
    if kernel not in (1, 3):
        raise ValueError(f"kernel must be 1 or 3, got {kernel}")
    c = x.shape[1]
    if weight_nk.shape[1] != kernel * kernel * c:
        raise ValueError(f"weight columns {weight_nk.shape[1]} ≠ kernel² · channels {kernel * kernel * c}")
    nhwc = x.permute(0, 2, 3, 1)
    return (nhwc if nhwc.is_contiguous() else nhwc.contiguous()), tuple(x.shape), weight_nk.shape[0]


def conv2d_nhwc(x: torch.Tensor, weight_nk: torch.Tensor, kernel: int, bias: torch.Tensor | None = None,
                a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float16, tuned: bool = True,
                block: tuple[int, int, int] = (32, 32, 32)) -> torch.Tensor:
    """The stride-1 convolution of `x` [B, C, H, W] (channels-last memory; e4m3 or fp16) with the
    tap-major weight `weight_nk` [N, kernel²·C] (`tap_major`), padding kernel // 2: out [B, N, H, W]
    in `out_dtype`, channels-last. With `a_scale` (a 0-d fp32 tensor) and `b_scale` ([N] fp32) the
    products are scaled by both, as e4m3 operands need; an e4m3 weight with an `x` of another
    dtype quantises `x` as it loads it (x / a_scale, saturated to ±448, rounded to e4m3), so no
    quantised copy of the input is written. `tuned` picks the tile by autotuning on
    first use per shape (on a GPU); else `block` (BLOCK_M, BLOCK_N, BLOCK_K), as the CPU checks use."""
    nhwc, (b, c, h, w), n = _operands(x, weight_nk, kernel)
    if (a_scale is None) != (b_scale is None):
        raise ValueError("a_scale and b_scale go together")
    m = b * h * w
    out = torch.empty((m, n), device=x.device, dtype=out_dtype)
    dummy = out  # unused pointer arguments (their branch is compiled out)
    args = (nhwc, weight_nk.contiguous(), out, bias if bias is not None else dummy,
            a_scale if a_scale is not None else dummy, b_scale if b_scale is not None else dummy, m, h, w, c, n,
            kernel * kernel * c)
    quantize = a_scale is not None and x.dtype != weight_nk.dtype
    flags = {"KS": kernel, "HAS_BIAS": bias is not None, "SCALED": a_scale is not None, "QUANTIZE": quantize}
    if tuned:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _tuned[grid](*args, **flags)
    else:
        bm, bn, bk = block
        _conv_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn,
                                                                BLOCK_K=bk, GROUP_M=4)
    return out.view(b, h, w, n).permute(0, 3, 1, 2)


def conv2d_nhwc_split_k(x: torch.Tensor, weight_nk: torch.Tensor, kernel: int, bias: torch.Tensor | None,
                        splits: int, tuned: bool = True, block: tuple[int, int, int] = (32, 32, 32)) -> torch.Tensor:
    """`conv2d_nhwc` for fp16 (or fp32) operands with its reduction (taps × channels) split into
    `splits` slices of whole 128-index steps, each slice's products summed over the SMs of its own
    program column into a float32 partial map [splits, B·H·W, N], then the slices added in order
    with the bias (`_sum_slices`): out [B, N, H, W] in x's dtype, channels-last. The partials cost
    4·splits bytes per output element of memory traffic, small where this pays (few output rows)."""
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    nhwc, (b, c, h, w), n = _operands(x, weight_nk, kernel)
    taps_c = kernel * kernel * c
    step = 128 if tuned else block[2]  # every tile's BLOCK_K divides it, so no step straddles two slices
    k_split = -(-taps_c // splits)
    k_split = -(-k_split // step) * step
    slices = -(-taps_c // k_split)
    m = b * h * w
    part = torch.empty((slices, m, n), device=x.device, dtype=torch.float32)
    args = (nhwc, weight_nk.contiguous(), part, part, part, part, m, h, w, c, n, k_split)
    flags = {"KS": kernel, "HAS_BIAS": False, "SCALED": False, "QUANTIZE": False}
    if tuned:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), slices)

        _tuned_split[grid](*args, **flags)
    else:
        bm, bn, bk = block
        _conv_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), slices)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn,
                                                                        BLOCK_K=bk, GROUP_M=4)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    reduce_block = 1024
    _sum_slices[(triton.cdiv(m * n, reduce_block),)](part, bias if bias is not None else part, out, m * n, n,
                                                     SLICES=slices, HAS_BIAS=bias is not None, BLOCK=reduce_block)
    return out.view(b, h, w, n).permute(0, 3, 1, 2)
