"""The small maps' convolutions on a kernel of our own (`cpp_ext.kernels.small_map_conv`), an
entry of the fp16 convolutions' race (`models.implicit_conv`).

Where a convolution has a few hundred output pixels (the decoder's 8² and 16² maps at the guided
batch), its product has a dozen output tiles and a long K loop, and its weights take longer to
read than to multiply. The kernel splits the K loop over a cluster of up to 8 blocks, each reading
its share of the weights and its rows' neighbourhoods straight from the map, and the cluster adds
the blocks' float32 parts in shared memory in a fixed order (deterministic), in one launch
(docs/kernels.md). An entry is a block width (output channels per block) and a split count; the
race offers the entries that fit a shape (`entries_for`) beside cuDNN and CUTLASS's tiles and keeps
whichever is fastest, so a shape where this kernel is slower never runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import cpp_ext

CHANNEL_STEP = 64  # input channels per step of the kernel's K loop: they must come in multiples of it
MOST_ROWS = 640  # output pixels (batch · height · width) up to which the race offers the kernel (5 row tiles)


@dataclass(frozen=True)
class SmallMap:
    """One way to run the kernel: `features` output channels per block (64 or 128), the K loop in
    `splits` parts (1 to 8), operands through a ring of `stages` shared-memory stages (3, 4 or 6)."""

    features: int
    splits: int
    stages: int = 4

    @property
    def name(self) -> str:
        return f"small_map_{self.features}x{self.splits}" + ("" if self.stages == 4 else f"_stages{self.stages}")


# the race's entries; `benchmarks/small_map_conv.py` also times the other split and stage counts
ENTRIES = (SmallMap(128, 4), SmallMap(128, 8), SmallMap(64, 4), SmallMap(64, 8))


def built() -> bool:
    """Whether the extension holds the kernel (a build with CUDA; it needs a Hopper GPU to run)."""
    return cpp_ext.kernels is not None and hasattr(cpp_ext.kernels, "small_map_conv")


def rows_of(x_shape: tuple[int, ...], weight_shape: tuple[int, ...], padding: tuple[int, int]) -> int:
    """The output pixels (batch · height · width) of a stride-1 convolution of these shapes."""
    batch, _, height, width = x_shape
    kh, kw = weight_shape[2:]
    return batch * max(0, height + 2 * padding[0] - kh + 1) * max(0, width + 2 * padding[1] - kw + 1)


def entries_for(x_shape: tuple[int, ...], weight_shape: tuple[int, ...], padding: tuple[int, int],
                candidates: tuple[SmallMap, ...] = ENTRIES) -> tuple[SmallMap, ...]:
    """The `candidates` (the race's entries by default) that take a convolution of these shapes
    (stride 1): at most `MOST_ROWS` output pixels, input channels a multiple of `CHANNEL_STEP`,
    output channels of the block width, no more parts than K-loop steps. Empty where the kernel is
    not built."""
    if not built():
        return ()
    channels = x_shape[1]
    features, _, kh, kw = weight_shape
    rows = rows_of(x_shape, weight_shape, padding)
    if not 0 < rows <= MOST_ROWS or channels % CHANNEL_STEP or not (0 <= padding[0] < kh and 0 <= padding[1] < kw):
        return ()
    steps = kh * kw * channels // CHANNEL_STEP
    return tuple(e for e in candidates if features % e.features == 0 and e.splits <= steps)


def of_name(name: str) -> SmallMap | None:
    """The entry called `name` (`SmallMap.name`), None if no entry is (or the kernel is not built)."""
    return next((e for e in ENTRIES if e.name == name), None) if built() else None


def conv2d(entry: SmallMap, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           padding: tuple[int, int]) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=padding)` (stride 1) the `entry` way, for fp16
    channels-last `x` and `weight` (`entries_for` says which shapes); channels-last out."""
    return cpp_ext.kernels.small_map_conv(x, weight, bias, padding[0], padding[1], entry.features, entry.splits,
                                          entry.stages)
