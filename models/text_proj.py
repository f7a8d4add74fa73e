"""Decoder conditioning from CLIP: extra context tokens and the time-embedding addition.

Karlo keeps these layers inside its decoder UNet (`PLMImUNet`); diffusers splits them out as
`UnCLIPTextProjModel`. We keep them as their own module so the conditioning is computed once
per call rather than every denoising step. Parameter names follow Karlo's checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import TextProjConfig
from models.layers import LayerNorm32, additive_mask


class TextProjection(nn.Module):
    """Maps (CLIP image embedding, CLIP text embedding, text tokens) to decoder conditioning."""

    def __init__(self, cfg: TextProjConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip_emb = nn.Linear(cfg.clip_dim, cfg.time_embed_dim)
        self.text_feat_proj = nn.Linear(cfg.clip_dim, cfg.time_embed_dim)
        self.clip_tok_proj = nn.Linear(cfg.clip_dim, cfg.context_width * cfg.clip_tokens)
        self.text_seq_proj = nn.Sequential(
            nn.Linear(cfg.text_width, cfg.context_width), LayerNorm32(cfg.context_width)
        )
        # Learned image embedding of the unconditional branch of classifier-free guidance.
        self.cf_param = nn.Parameter(torch.zeros(cfg.clip_dim))

    def unconditional_image_embed(self, batch: int) -> torch.Tensor:
        """[batch, clip_dim] learned embedding used in place of the image embedding for CFG."""
        return self.cf_param[None].expand(batch, -1)

    def forward(
        self,
        image_embed: torch.Tensor,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the decoder's conditioning.

        :return: (context [B, clip_tokens + text_ctx, context_width],
                  context_bias [B, clip_tokens + text_ctx] additive 0/-inf (float32),
                  emb_add [B, time_embed_dim]).
        """
        b = image_embed.shape[0]
        cfg = self.cfg
        emb_add = self.clip_emb(image_embed) + self.text_feat_proj(text_embed)
        # Karlo reshapes the projection channel-major: token k, channel c = out[c * tokens + k].
        clip_tokens = self.clip_tok_proj(image_embed).view(b, cfg.context_width, cfg.clip_tokens)
        context = torch.cat([clip_tokens.transpose(1, 2), self.text_seq_proj(text_tokens)], dim=1)
        keep = F.pad(text_mask.bool(), (cfg.clip_tokens, 0), value=True)
        return context, additive_mask(keep), emb_add
