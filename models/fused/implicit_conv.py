"""fp16 convolutions through CUTLASS's Hopper implicit GEMM (`cpp_ext._cutlass_conv`): the
activation read by TMA in im2col mode (no gathered copy), wgmma with fp32 accumulation, the bias
in the epilogue, channels-last in and out.

The kernel comes in a few tile configurations; which is fastest depends on the shape, so the
first call of each shape times every configuration (CUDA events, outside any CUDA-graph capture)
and keeps the fastest. `conv2d` falls back to torch's (cuDNN's) convolution wherever the kernel
does not serve: not built, not CUDA fp16 channels-last, stride or dilation other than 1, groups,
channel counts not multiples of 8. It is built only on request (UNCLIP_RT_CUTLASS=1 at
`setup.py build_ext`, with the `nvidia-cutlass` wheel); `benchmarks/fp8_convs.py` times it against
cuDNN, and the UNets take it only once it is measured faster there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import cpp_ext

_best: dict[tuple, int] = {}  # (shape of x, shape of weight, padding) → fastest configuration


def serves(x: torch.Tensor, weight: torch.Tensor, stride=1, dilation=1, groups: int = 1) -> bool:
    """Whether the CUTLASS kernel runs this convolution."""
    return (cpp_ext.cutlass_conv is not None and x.is_cuda and x.dtype == torch.float16
            and weight.dtype == torch.float16 and x.dim() == 4 and weight.dim() == 4 and groups == 1
            and stride in (1, (1, 1)) and dilation in (1, (1, 1))
            and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and weight.is_contiguous(memory_format=torch.channels_last))


def _time_configs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]) -> int:
    """The fastest configuration for this shape, each timed over a few launches."""
    kernel = cpp_ext.cutlass_conv
    times = []
    for config in range(len(kernel.configs())):
        try:
            kernel.conv2d(x, weight, bias, *padding, config)  # first launch: TMA descriptors, caches
        except RuntimeError:
            times.append(float("inf"))  # this tile shape cannot implement the shape
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            kernel.conv2d(x, weight, bias, *padding, config)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    best = min(range(len(times)), key=times.__getitem__)
    if times[best] == float("inf"):
        raise RuntimeError(f"no CUTLASS configuration implements x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return best


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=padding)` (stride 1), on the CUTLASS kernel where it serves."""
    if not serves(x, weight):
        return F.conv2d(x, weight, bias, padding=padding)
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    bias = None if bias is None else bias.to(torch.float16).contiguous()
    key = (tuple(x.shape), tuple(weight.shape), pad)
    config = _best.get(key)
    if config is None:
        if torch.cuda.is_current_stream_capturing():
            config = 0  # no timing inside a capture: the first configuration, not remembered
        else:
            config = _best[key] = _time_configs(x, weight, bias, pad)
    return cpp_ext.cutlass_conv.conv2d(x, weight, bias, *pad, config)
