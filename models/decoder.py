"""The 64×64 decoder stage: the conditional UNet plus its text projection.

Output has 2·3 channels: ε in the first three, the learned-range variance value v ∈ [−1, 1]
in the last three (Karlo's `learn_sigma`).
"""

from __future__ import annotations

import torch
from torch import nn

from models.configs import TextProjConfig, UNetConfig
from models.text_proj import TextProjection
from models.unet import UNet


class Decoder(nn.Module):
    """`text_proj` computes the conditioning once; `unet` denoises with it every step.

    A sampling loop calls `context` once (text projection and every attention block's context
    keys/values) and `step` per step; `forward` is both in one (the reference they are checked against)."""

    def __init__(self, unet_cfg: UNetConfig, text_proj_cfg: TextProjConfig) -> None:
        super().__init__()
        self.unet = UNet(unet_cfg)
        self.text_proj = TextProjection(text_proj_cfg)

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        image_embed: torch.Tensor,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One network evaluation: [B, 3, H, W] noisy image → [B, 6, H, W] (ε, v)."""
        context, context_bias, emb_add = self.text_proj(image_embed, text_embed, text_tokens, text_mask)
        return self.unet(x_t, timesteps, emb_add, context, context_bias)

    def context(
        self, image_embed: torch.Tensor, text_embed: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What does not change between steps, once per call: (emb_add [B, time_embed_dim],
        packed context keys/values [B, 2, heads, N, head_channels], context bias [B, N])."""
        context, context_bias, emb_add = self.text_proj(image_embed, text_embed, text_tokens, text_mask)
        return emb_add, self.unet.context_kv(context), context_bias

    def step(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, emb_add: torch.Tensor, context_kv: torch.Tensor,
        context_bias: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` given `context(...)`: [B, 3, H, W] noisy image → [B, 6, H, W] (ε, v)."""
        return self.unet(x_t, timesteps, emb_add, None, context_bias, context_kv)
