"""Work queued on a side CUDA stream beside the current one, and joined back.

A residual block's 1×1 skip convolution reads only the block's input, so it can run while the
block's norms and 3×3 convolutions run; at the decoder's small maps those kernels leave most of
the GPU's SMs idle, which the skip convolution can take. `Forked` queues a function on the
device's side stream after everything queued so far on the current stream, and `join` makes the
current stream wait for it. Inside a CUDA-graph capture the fork and the join become the graph's
edges (the side stream joins the capture through the wait), so a replay runs the two branches
side by side.

Memory: the inputs are held until the join is queued, so the caching allocator cannot hand their
blocks to work on the current stream that could run beside the side stream's reads; the output,
allocated on the side stream, goes back to that stream's blocks when freed, and the next fork
waits for everything queued before it, its reads included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream of `device`, made on first use (the runtime's loops run once eagerly before
    their capture, so it is not made inside one)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _STREAMS.get(index)
    if stream is None:
        stream = _STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


class Forked:
    """`fn(*args)` queued on the side stream of `args[0]`'s device; `join()` returns its result,
    with the current stream then waiting for it. Join every `Forked`: a capture with a side branch
    not joined back fails."""

    def __init__(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> None:
        device = args[0].device
        self._main = torch.cuda.current_stream(device)
        self._side = side_stream(device)
        self._side.wait_stream(self._main)
        with torch.cuda.stream(self._side):
            self._out = fn(*args)
        self._args: tuple[torch.Tensor, ...] | None = args

    def join(self) -> torch.Tensor:
        self._main.wait_stream(self._side)
        self._args = None  # freed after the wait: ordered behind the side stream's reads
        return self._out
