"""What the public calls return: `UnCLIPOutput`, and images in the asked-for output type."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class UnCLIPOutput:
    """Generated images (PIL list, numpy [B, H, W, 3] or torch [B, 3, H, W], in [0, 1])."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    image_embeds: torch.Tensor | None = None
    decoder_images: list[Image.Image] | np.ndarray | torch.Tensor | None = None  # the 64² stage, when asked


def _to_host(images: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `images` in host memory. From a GPU it lands in page-locked memory from
    torch's caching host allocator, reused once the caller drops the result (a numpy view keeps its
    tensor alive): a copy into fresh pageable memory pays the allocation, its page faults and a
    staged copy, most of a GPU-bound call's last stretch."""
    images = images.contiguous()
    if not images.is_cuda:
        return images.cpu()
    host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
    host.copy_(images, non_blocking=True)
    torch.cuda.current_stream(images.device).synchronize()
    return host


def to_output(images: torch.Tensor, output_type: str):
    """[B, 3, H, W] in [−1, 1] → the requested output type, in [0, 1]; PIL images are quantised to
    8 bits on the images' device (a quarter of the bytes to copy; the same rounding as numpy's)."""
    images = (images * 0.5 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return _to_host(images)
    if output_type == "np":
        return _to_host(images.permute(0, 2, 3, 1)).numpy()
    quantised = (images.float() * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in _to_host(quantised.permute(0, 2, 3, 1)).numpy()]
