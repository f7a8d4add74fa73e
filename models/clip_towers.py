"""CLIP's two towers in OpenAI's layout, with open_clip's parameter names, so that OpenAI, open_clip
and converted Hugging Face checkpoints load unchanged (`model.transformer.resblocks.0.attn.in_proj_weight`, …).

Why not open_clip's `CLIP` class: importing open_clip costs seconds of every cold start (see
`models.bpe`) for two plain pre-LN transformers; a test checks these towers against open_clip's
on the same weights (text and image, fp32, to 1e-6). Initialisation follows open_clip's (text
tower: normal with its standard deviations; vision tower: the class token, positions and
projection at width^-0.5 scale, the rest PyTorch's defaults).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from models.configs import ClipConfig
from models.layers import causal_bias


class QuickGELU(nn.Module):
    """x·σ(1.702x), the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x)); batch-first tokens."""

    def __init__(self, width: int, heads: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """Patchify (conv, no bias) → [class token, patches] + positions → ln_pre → blocks → ln_post
    of the class token → projection."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        width = cfg.vision_width
        scale = width**-0.5
        grid = cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(nn.init.normal_(torch.empty(width), std=scale))
        self.positional_embedding = nn.Parameter(nn.init.normal_(torch.empty(grid * grid + 1, width), std=scale))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, width // cfg.vision_head_width, cfg.quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(nn.init.normal_(torch.empty(width, cfg.embed_dim), std=scale))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B, grid², width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0] @ self.proj


class OpenAIClip(nn.Module):
    """The text tower's parts as CLIP's top-level attributes, and `visual` (or None)."""

    def __init__(self, cfg: ClipConfig, with_vision: bool = True) -> None:
        super().__init__()
        width = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, width))
        self.transformer = Transformer(width, cfg.text_layers, cfg.text_heads, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, cfg.embed_dim))
        self.register_buffer("attn_mask", causal_bias(cfg.context_length), persistent=False)
        self.visual = VisionTransformer(cfg) if with_vision else None
        self._init_text()

    def _init_text(self) -> None:
        t = self.transformer
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = t.width**-0.5 * (2 * t.layers) ** -0.5, t.width**-0.5, (2 * t.width) ** -0.5
        for block in t.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width**-0.5)
