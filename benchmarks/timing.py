"""GPU timing helpers for the benchmarks: wall time of whole calls, CUDA-event time of a call
and of one forward replayed from a CUDA graph (`runtime.timing`'s, which the runtime's measured
backend choice uses too), per-module forward times through hooks, FLOP counts and the measured
dense fp16 matmul peak."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from runtime.timing import event_ms, graph_ms

__all__ = ["ForwardTimer", "event_ms", "forward_flops", "fp8_matmul_peak_tflops", "graph_ms", "matmul_peak_tflops",
           "wall_ms"]


def wall_ms(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Wall-clock milliseconds of `runs` calls of `fn` (synchronised), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


class ForwardTimer:
    """CUDA-event times of every forward of some modules (pre/post hooks; no host sync inside a run)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in modules}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str):
        def hook(module, args):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events[name].append((start, None))
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            start, _ = self.events[name][-1]
            self.events[name][-1] = (start, end)
        return hook

    def reset(self) -> None:
        for name in self.events:
            self.events[name] = []

    def median_ms(self) -> dict[str, float]:
        torch.cuda.synchronize()
        return {name: statistics.median(s.elapsed_time(e) for s, e in pairs)
                for name, pairs in self.events.items() if pairs}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def forward_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (torch.utils.flop_counter: matmuls, convolutions and attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_tflops(n: int = 8192, replays: int = 20) -> float:
    """Measured dense fp16 matmul throughput (n³ GEMM, TFLOP/s): the 'peak' shares are taken of."""
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    out = torch.empty(n, n, device="cuda", dtype=torch.float16)
    ms = graph_ms(lambda: torch.matmul(a, b, out=out), replays)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def fp8_matmul_peak_tflops(n: int = 8192, replays: int = 20) -> float:
    """Measured dense FP8 (e4m3, fp32 accumulation, fp16 out) GEMM throughput through
    `torch._scaled_mm` with per-row and per-column scales, as `models.fp8.Fp8Linear` calls it."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    scale_a = torch.ones(n, 1, device="cuda")
    scale_b = torch.ones(1, n, device="cuda")
    ms = graph_ms(lambda: torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float16), replays)
    return 2 * n**3 / (ms * 1e-3) / 1e12
