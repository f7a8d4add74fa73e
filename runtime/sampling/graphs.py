"""CUDA graphs of whole sampling loops: captured once per (stage, settings, input shapes), then
replayed with new inputs copied into the captured static buffers.

A loop (`runtime.sampling.loops`) is a function of tensors with no host sync, so the whole thing — the
stage's context engine, every step's network call, the fused update and the non-finite check —
becomes one graph: one launch per stage per call instead of thousands of kernel launches, and no
Python between steps. Every graph of a cache shares one memory pool (loops never run concurrently;
`UnCLIP` serialises calls), so memory is that of the largest loop, not their sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Loop = Callable[..., tuple[torch.Tensor, ...]]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class GraphCache:
    """Captured loops of one device, keyed by a tag (stage, update settings) and the inputs' shapes and dtypes."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.pool = torch.cuda.graph_pool_handle()
        self.entries: dict[tuple, _Captured] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def run(self, tag: tuple, loop: Loop, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`loop(*args)`, replayed from its graph (captured on first use); returns copies of the outputs."""
        key = (tag, tuple((tuple(a.shape), a.dtype) for a in args))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._capture(loop, args)
        for static, value in zip(entry.inputs, args, strict=True):
            static.copy_(value)
        entry.graph.replay()
        return tuple(out.clone() for out in entry.outputs)

    def _capture(self, loop: Loop, args: tuple[torch.Tensor, ...]) -> _Captured:
        inputs = tuple(a.to(self.device).clone() for a in args)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # cuDNN times its algorithms for each convolution shape in the warm-up and the capture
        # records the fastest: a graph is replayed thousands of times, so the choice is worth
        # the one-off cost. The process-wide flag is restored afterwards.
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            with torch.cuda.stream(side):
                loop(*inputs)  # warm-up: library handles, cuDNN plans and the allocator settle outside capture
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = loop(*inputs)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        return _Captured(graph, inputs, tuple(outputs))
