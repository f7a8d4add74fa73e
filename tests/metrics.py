"""Image comparison shared by the tests."""

from __future__ import annotations

import math

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf for identical images)."""
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)
