"""The 64→256 super-resolution stage: two UNets of identical shape.

`first_steps` denoises all steps but the last; `last_step` (Karlo's GAN/perceptual-fine-tuned
copy) runs only the final t = 0 step. Each takes [x_t, upsampled low-res image] (6 channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import UNetConfig
from models.unet import UNet


def upsample_low_res(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling of a [-1, 1] image to `size`×`size`, as Karlo and diffusers do."""
    return F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


class SuperRes(nn.Module):
    """Holds the first-steps and last-step UNets."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.first_steps = UNet(cfg)
        self.last_step = UNet(cfg)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, low_res_up: torch.Tensor, last: bool) -> torch.Tensor:
        """ε prediction for [B, 3, S, S] x_t given the upsampled low-res image [B, 3, S, S]."""
        unet = self.last_step if last else self.first_steps
        return unet(torch.cat([x_t, low_res_up], dim=1), timesteps)
