"""A super-resolution stage (Karlo's 64→256, or any stage of a model's chain): one or two UNets
of identical shape.

`first_steps` denoises all steps but the last; `last_step` (Karlo's GAN/perceptual-fine-tuned
copy), where the stage has one, runs only the final t = 0 step (else `first_steps` runs it too).
Each takes [x_t, the previous stage's image upsampled] (6 channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import SuperResConfig
from models.unet import UNet


def upsample_low_res(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling of a [-1, 1] image to `size`×`size`, as Karlo and diffusers do."""
    return F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


class SuperRes(nn.Module):
    """Holds the first-steps UNet and, where the stage has one, the last-step UNet."""

    def __init__(self, cfg: SuperResConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.first_steps = UNet(cfg.unet)
        self.last_step = UNet(cfg.unet) if cfg.last_step_model else None

    def unet(self, last: bool) -> UNet:
        """The UNet that runs the final step (`last`) or the others."""
        return self.last_step if last and self.last_step is not None else self.first_steps

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, low_res_up: torch.Tensor, last: bool) -> torch.Tensor:
        """The model output for [B, 3, S, S] x_t given the upsampled low-res image [B, 3, S, S]."""
        return self.unet(last)(torch.cat([x_t, low_res_up], dim=1), timesteps)
