"""Read foreground colour, background colour and shape back from pixels (no model involved).

Images are read at 64×64 (larger ones area-downsampled first). Background: the palette colour
nearest the median of the border pixels. Foreground: the largest 8-connected region of pixels far
from that median border colour (so specks and halo fragments elsewhere don't count), its median,
nearest palette colour. Shape: from that region's fill ratio A / (π·r_max²), with r_max the largest
centroid-to-pixel distance — rotation invariant: 1 for a circle, 2/π ≈ 0.64 for a square,
3√3/(4π) ≈ 0.41 for an equilateral triangle. True renders read back 100% (tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.data import COLOURS, PALETTE, SHAPES

_PALETTE = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32)
READ_SIZE = 64
CIRCLE_MIN, SQUARE_MIN = (1 + 2 / math.pi) / 2, (2 / math.pi + 3 * math.sqrt(3) / (4 * math.pi)) / 2


@dataclass(frozen=True)
class Reading:
    fg: str | None
    shape: str | None
    bg: str

    @property
    def combo(self) -> tuple[str | None, str | None, str]:
        return (self.fg, self.shape, self.bg)


def _nearest(rgb: torch.Tensor) -> str:
    return COLOURS[int(((_PALETTE - rgb) ** 2).sum(-1).argmin())]


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected region of a [H, W] bool mask (label propagation by max-pooling)."""
    h, w = mask.shape
    keep = mask.view(1, 1, h, w).float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * keep
    for _ in range(h * w):
        spread = F.max_pool2d(labels, 3, stride=1, padding=1) * keep
        if torch.equal(spread, labels):
            break
        labels = spread
    labels = labels.view(h, w)
    values, counts = labels[mask].unique(return_counts=True)
    return labels == values[counts.argmax()]


def read_image(image: torch.Tensor, size: int = READ_SIZE) -> Reading:
    """Attributes of one [3, H, W] image in [−1, 1]."""
    image = image.detach().float().cpu()
    if image.shape[-1] > size:
        image = F.interpolate(image[None], size=(size, size), mode="area")[0]
    rgb = ((image.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)  # [H, W, 3]
    h, w, _ = rgb.shape
    border = torch.cat([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_rgb = border.median(dim=0).values
    bg = _nearest(bg_rgb)
    dist = ((rgb - bg_rgb) ** 2).sum(-1).sqrt()
    mask = dist > 60
    if mask.sum() < 0.005 * h * w:
        return Reading(None, None, bg)
    mask = largest_component(mask)
    fg = _nearest(rgb[mask].median(dim=0).values)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    r_max = ((ys.float() - cy) ** 2 + (xs.float() - cx) ** 2).sqrt().max() + 0.5
    fill = float(mask.sum()) / (math.pi * float(r_max) ** 2)
    shape = SHAPES[0] if fill >= CIRCLE_MIN else SHAPES[1] if fill >= SQUARE_MIN else SHAPES[2]
    return Reading(fg, shape, bg)


def read_batch(images: torch.Tensor) -> list[Reading]:
    """Attributes of each image of [B, 3, H, W] in [−1, 1]."""
    return [read_image(im) for im in images]
