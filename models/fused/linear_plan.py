"""Which kernel runs each linear layer of the prior's cached step, whose inputs are a few rows
(three tokens per sample): `cpp_ext`'s skinny kernels, which stream the weights through the tensor
cores, or cuBLAS. The rules size each kernel's blocks so that a layer's grid fits one wave on the
current GPU: in the step's chain of overlapped kernels (cpp_ext/pdl.cuh) a kernel starts only once
every block of the one before it is resident. docs/kernels.md has the measurements behind them."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

import cpp_ext
from models.fused.options import FusedOptions

SKINNY_GELU = 1  # cpp_ext.skinny_linear's activation code for exact GELU

# The SMs the rules spread a layer's blocks over without CUDA (an H100's), so that they are still
# defined, e.g. for tests on the CPU.
H100_SMS = 132
# Weight rows of 512 columns a staged block holds (its ring: block features × stages, ~70 KB), so
# that three blocks — of one kernel or of consecutive ones — fit in an SM's shared memory.
STAGED_ROWS = 64
SKINNY_MAX_ROWS = 16  # two tiles of the tensor-core step; above that cuBLAS is faster
STAGED_MAX_ROWS = 24  # three 8-row tiles of the mma: four images' step (batch 8 × 3 tokens)

_device_properties = functools.cache(torch.cuda.get_device_properties)  # per device index


def multiprocessors() -> int:
    """The current CUDA device's streaming multiprocessors (`H100_SMS` without CUDA)."""
    if not torch.cuda.is_available():
        return H100_SMS
    return _device_properties(torch.cuda.current_device()).multi_processor_count


def staged_capable() -> bool:
    """Whether the current CUDA device runs `skinny_linear_staged` (Hopper, sm_90, or newer)."""
    if not torch.cuda.is_available():
        return False
    return _device_properties(torch.cuda.current_device()).major >= 9


def skinny_block(rows: int, width: int, features: int) -> int | None:
    """The output features per block with which a linear layer (`rows` input rows of `width`,
    `features` outputs) runs `cpp_ext.skinny_linear` where `staged_plan` does not take it, or None
    for cuBLAS: up to `SKINNY_MAX_ROWS` rows. The blocks: the largest of 32 and 16 features whose
    grid still gives every SM a block, else 8, so that the layer needs no second wave of blocks that
    would hold back the kernels after it."""
    if rows < 1 or rows > SKINNY_MAX_ROWS or width % 32:
        return None
    sms = multiprocessors()
    for block in (32, 16):
        if features % block == 0 and features // block >= sms:
            return block
    return 8


def staged_plan(rows: int, width: int, features: int, options: FusedOptions | None = None) -> tuple[int, int] | None:
    """(output features per block, ring stages) with which a linear layer runs
    `cpp_ext.skinny_linear_staged`, or None (then `skinny_block`'s rule, or cuBLAS). Up to 24 rows,
    a width of 512s, on Hopper: 16-feature blocks of 4 stages (a 2048-wide layer's whole tile
    requested before the block waits for its input), or 32-feature blocks of 2 where 16-feature
    ones would need more than one wave at three blocks per SM. Above 16 rows a layer narrower than
    its input (the MLP's output projection, whose blocks then read more input than weights) goes to
    cuBLAS, which is faster there."""
    if options is not None and not options.staged_weights:
        return None
    if rows < 1 or rows > STAGED_MAX_ROWS or width % 512 or not staged_capable():
        return None
    if rows > 16 and width > features:
        return None
    for block in (16, 32):
        if features % block == 0 and features // block <= 3 * multiprocessors():
            return block, STAGED_ROWS // block
    return None


# A few-row linear layer: run(x, linear, activation, out) → act(x·Wᵀ + b), or out += it.
FewRowsLinear = Callable[[torch.Tensor, nn.Linear, int, torch.Tensor | None], torch.Tensor]


def few_rows_linear(rows: int, width: int, features: int, options: FusedOptions | None = None) -> FewRowsLinear | None:
    """How a linear layer of `rows` input rows of `width` and `features` outputs runs:
    `skinny_linear_staged` with `staged_plan`'s blocks, else `skinny_linear` with `skinny_block`'s,
    else None (cuBLAS). Chosen once per step for each kind of layer."""
    plan = staged_plan(rows, width, features, options)
    if plan is not None:
        def staged(x, linear, activation, out):
            return cpp_ext.kernels.skinny_linear_staged(x, linear.weight, linear.bias, activation, out, *plan)
        return staged
    block = skinny_block(rows, width, features)
    if block is None:
        return None

    def skinny(x, linear, activation, out):
        return cpp_ext.kernels.skinny_linear(x, linear.weight, linear.bias, activation, out, block_features=block)
    return skinny


def skinny_fits(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether `skinny_linear` takes `linear` (with a bias) of the rows `x`: `skinny_block`'s rows
    and width, contiguous 16-byte-aligned rows, features of 16s."""
    return (x.dim() == 2 and skinny_block(x.shape[0], linear.in_features, linear.out_features) is not None
            and x.is_contiguous() and x.data_ptr() % 16 == 0
            and linear.out_features % 16 == 0 and linear.bias is not None)
