"""CPU matrix products whose every row is the same whatever else shares the call.

On the CPU, MKL's GEMM sums a row's products in an order that depends on how many rows the call
has: fewer than four rows, the tail of a block, and on some CPUs any call beyond a dozen rows
take other kernels. So one image's numbers would depend on the images batched beside it. Within
one call of a given row count, though, a row's result does not depend on its position or on the
other rows. Under `row_invariant_matmuls()` the runtime's linear layers and 2-D products
therefore run as calls of exactly `ROW_CHUNK` rows each (the last one padded with zeros): every
row goes through the same kernel at any batch, so on the CPU a seed's image is the same alone or
batched with other requests (which a server that batches requests needs). Convolutions, norms
and attention are row-invariant already. GPU tensors pass through untouched.
(`tests/test_batch_invariance.py` checks it on the machine that runs the tests; docs/serving.md
has what was measured.)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROW_CHUNK = 16  # rows per product call: fewer calls for long inputs, little padding for short ones


def _cpu_float(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point() for t in tensors)


def padded_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D `a`, as products of `ROW_CHUNK` rows of `a` at a time (the last chunk
    padded with zero rows)."""
    rows = a.shape[0]
    pad = (-rows) % ROW_CHUNK
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
    if a.shape[0] == ROW_CHUNK:
        return torch.mm(a, b)[:rows]
    return torch.cat([torch.mm(chunk, b) for chunk in a.split(ROW_CHUNK)])[:rows]


def _flat_product(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`x @ b` for `x` of shape [..., K] and 2-D `b`, through `padded_mm` on the flattened rows."""
    out = padded_mm(x.reshape(-1, x.shape[-1]), b)
    return out.reshape(*x.shape[:-1], b.shape[1])


class RowInvariantMatmuls(TorchFunctionMode):
    """Routes CPU `F.linear`, 2-D `matmul`/`mm` and `addmm` through `padded_mm`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _cpu_float(x, weight) and weight.dim() == 2 and x.dim() >= 1:
                out = _flat_product(x if x.dim() > 1 else x[None], weight.t())
                out = out if x.dim() > 1 else out[0]
                return out + bias if bias is not None else out
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm):
            a, b = args[0], args[1]
            if not kwargs and _cpu_float(a, b) and a.dim() >= 2 and b.dim() == 2:
                return _flat_product(a, b)
        elif func in (torch.addmm, torch.Tensor.addmm, torch.Tensor.addmm_):
            base, a, b = args[0], args[1], args[2]
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            if len(args) == 3 and _cpu_float(base, a, b) and a.dim() == 2 and b.dim() == 2:
                product = padded_mm(a, b)
                if alpha != 1:
                    product = product * alpha
                if func is torch.Tensor.addmm_:
                    return base.mul_(beta).add_(product) if beta != 1 else base.add_(product)
                return (base * beta if beta != 1 else base) + product
        return func(*args, **kwargs)


_active = threading.local()  # whether this thread is inside the mode already (public calls nest)


@contextlib.contextmanager
def row_invariant_matmuls(device: torch.device) -> Iterator[None]:
    """Within the block, CPU products are row-invariant (a no-op context on other devices, and
    inside an enclosing block, whose mode already routes every product)."""
    if device.type != "cpu" or getattr(_active, "on", False):
        yield
        return
    _active.on = True
    try:
        with RowInvariantMatmuls():
            yield
    finally:
        _active.on = False


def row_invariant(method: Callable) -> Callable:
    """Decorator for a method of an object with a `device`: its products are row-invariant."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with row_invariant_matmuls(self.device):
            return method(self, *args, **kwargs)

    return wrapper
