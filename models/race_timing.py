"""How the convolutions' race (`models.implicit_conv`) times its entries.

Two ways, `implicit_conv.RACE_TIMING` picks:

- "eager": a few launches of each entry from the host on the one set of operands the race was
  called with, timed between CUDA events. Simple, but not how the UNets run a convolution: its
  weight stays in the L2 cache from one launch to the next, where the UNets read every weight from
  memory, and where a kernel is short the host's launch time is part of what is measured.
- "graph": each entry captured once in a CUDA graph that launches it on several distinct copies of
  its operands in turn (as many as take at least twice the L2 cache, so each launch reads its
  operands from memory, as in the UNets), the graphs replayed in interleaved rounds (a drift of
  the GPU's clocks during the race then touches every entry alike) and each entry's median taken.
  The launch time stays out of it, as inside the runtime's loop graphs.

The copies and the graphs live only while the race runs; the graphs share one memory pool, since
they run one at a time and their outputs are not kept.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Sequence

import torch

Launch = Callable[..., object]  # launch(entry, *operands): one convolution of the race's kind
Accept = Callable[[Hashable, object], bool]  # accept(entry, output of its first launch): whether it may race


def copies_for(operand_bytes: int, l2_bytes: int, least: int = 2, most: int = 32) -> int:
    """How many distinct sets of operands (`operand_bytes` a set) a graph race cycles through: enough
    to take twice the L2 cache (`l2_bytes`), so that no launch finds its operands left in it by the
    launch before; at least `least` (consecutive launches never share operands), at most `most` (the
    smallest shapes would otherwise need hundreds)."""
    if operand_bytes <= 0 or l2_bytes < 0:
        raise ValueError(f"operand_bytes must be positive and l2_bytes not negative, got {operand_bytes}, {l2_bytes}")
    return max(least, min(most, -(-2 * l2_bytes // operand_bytes)))


def _runs(launch: Launch, entry: Hashable, operands: tuple[torch.Tensor, ...], accept: Accept | None = None
          ) -> bool:
    """Whether `entry` takes these operands: its first launch (untimed: TMA descriptors, cuDNN's
    algorithm search) raises no RuntimeError (which a tile shape that cannot implement the shape
    does) and, where `accept` is given, its output passes `accept(entry, output)`."""
    try:
        out = launch(entry, *operands)
    except RuntimeError:
        return False
    return accept is None or accept(entry, out)


def _elapsed_ms(work: Callable[[], object]) -> float:
    """Milliseconds between CUDA events around `work()` on the current stream (synchronised)."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def eager_times(entries: Sequence[Hashable], launch: Launch, operands: tuple[torch.Tensor, ...],
                launches: int = 5, accept: Accept | None = None) -> dict[Hashable, float]:
    """Milliseconds of `launches` host launches of each entry on `operands` (CUDA events), after one
    untimed launch; an entry that refuses the operands or whose output `accept` refuses (`_runs`)
    is left out."""
    times = {}
    for entry in entries:
        if _runs(launch, entry, operands, accept):
            times[entry] = _elapsed_ms(lambda entry=entry: [launch(entry, *operands) for _ in range(launches)])
    return times


def graph_times(entries: Sequence[Hashable], launch: Launch, operands: tuple[torch.Tensor, ...],
                rounds: int = 3, l2_bytes: int | None = None, accept: Accept | None = None) -> dict[Hashable, float]:
    """Median milliseconds of one launch of each entry, replayed from a CUDA graph over distinct
    copies of `operands` (`copies_for`; `l2_bytes` defaults to the device's L2 cache), `rounds`
    interleaved rounds; an entry that refuses the operands or whose first output `accept` refuses
    (`_runs`), or whose capture raises RuntimeError, is left out. Outside any capture only."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("graph_times captures graphs of its own: call it outside a CUDA-graph capture")
    device = operands[0].device
    if l2_bytes is None:
        l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    count = copies_for(sum(t.numel() * t.element_size() for t in operands), l2_bytes)
    sets = [operands, *(tuple(t.clone() for t in operands) for _ in range(count - 1))]  # clone keeps the layout
    pool = torch.cuda.graph_pool_handle()
    graphs = {}
    for entry in entries:
        if not _runs(launch, entry, operands, accept):  # eager first: no capture may meet a first call's work
            continue
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                for one in sets:
                    launch(entry, *one)  # the output is dropped: the next launch reuses its memory
        except RuntimeError:  # an entry that cannot be captured cannot run in the UNets' graphs either
            continue
        graphs[entry] = graph
    times: dict[Hashable, list[float]] = {entry: [] for entry in graphs}
    for _ in range(rounds):
        for entry, graph in graphs.items():
            times[entry].append(_elapsed_ms(graph.replay) / len(sets))
    return {entry: statistics.median(ms) for entry, ms in times.items()}
