"""Timing of one call on the device it runs on: CUDA events around a call, around one call
replayed from a CUDA graph (launch overhead excluded, as inside the runtime's loop graphs), or
the host clock on a CPU. Used where the runtime decides by measurement (`runtime.backends.measured`)
and by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def event_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` between CUDA events on the current stream, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], replays: int = 20) -> float:
    """Median milliseconds of one `fn()` replayed from a CUDA graph (launch overhead excluded)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return event_ms(graph.replay, replays, warmup=1)


def host_ms(fn: Callable[[], object], runs: int = 5, warmup: int = 1, budget_ms: float = 1000.0) -> float:
    """Median wall-clock milliseconds of `fn()` on the host (CPU work), after `warmup` calls: up to
    `runs` timed calls, fewer once they have taken `budget_ms` (a slow call varies less)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < runs and sum(times) < budget_ms:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
