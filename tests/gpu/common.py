"""What the GPU tests share: their skip marks and the relative error they state tolerances in."""

from __future__ import annotations

import pytest
import torch

import cpp_ext

needs_kernel = pytest.mark.skipif(cpp_ext.kernels is None, reason=f"cpp_ext not built: {cpp_ext.IMPORT_ERROR}")
needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                  reason="skinny_linear_staged needs a Hopper (sm_90) GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in float64."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())
