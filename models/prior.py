"""The diffusion prior: a causal transformer that predicts a CLIP image embedding from text.

Architecture of Karlo's `karlo/modules/xf.py: PriorTransformer` (itself after DALL-E 2 §2.2):
the sequence is [77 projected text tokens, text embedding, time embedding, x_t, learned `prd`],
81 tokens with a learned positional embedding, a causal mask plus the text padding mask, 20
pre-LN blocks, a final LayerNorm, and the `prd` position's output projected to a CLIP embedding.
It predicts x0 in *standardised* CLIP space; `clip_mean`/`clip_std` (persistent buffers here,
Karlo's `ViT-L-14_stats.th`) map it back to a raw CLIP image embedding.
Parameter names follow Karlo's checkpoint (without its `model.` prefix).

The first 78 tokens (text tokens and text embedding) see only each other under the causal
mask, so they are the same at every denoising step: `context_kv` runs them once per prompt and
keeps every layer's keys and values, and `step` then runs only the 3 step-dependent tokens (time,
x_t, `prd`) against that cache — the same result as `forward`, with 3/81 of the token work.
The same step on `cpp_ext`'s fused kernels: `models.fused.prior_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import PriorConfig
from models.layers import LayerNorm32, additive_mask, causal_bias, timestep_embedding, work_dtype


class PriorAttention(nn.Module):
    """Multi-head self-attention with Karlo's per-head interleaved [q|k|v] projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N, W] → q, k, v, each [B, H, N, ch]."""
        b, n, _ = x.shape
        qkv = self.c_qkv(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, 3*ch]
        return qkv.chunk(3, dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Queries [B, H, Nq, ch] over keys/values [B, H, Nk, ch] → projected output [B, Nq, W]."""
        b, _, n, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.c_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.project(x), bias)


class PriorMLP(nn.Module):
    """Width → 4·width → width with exact GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class PriorBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm32(width)
        self.attn = PriorAttention(width, heads)
        self.ln_2 = LayerNorm32(width)
        self.mlp = PriorMLP(width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.forward_with_kv(x, bias)[0]

    def forward_with_kv(
        self, x: torch.Tensor, bias: torch.Tensor, past: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block on tokens `x` that also attend to cached keys/values `past` ([B, 2, H, Np, ch],
        placed before them); returns (output, this call's own keys, its own values [B, H, N, ch])."""
        q, k, v = self.attn.project(self.ln_1(x))
        keys, values = k, v
        if past is not None:
            keys, values = torch.cat([past[:, 0], k], dim=2), torch.cat([past[:, 1], v], dim=2)
        x = x + self.attn.attend(q, keys, values, bias)
        return x + self.mlp(self.ln_2(x)), k, v


class PriorTransformerStack(nn.Module):
    """The block stack (own module so checkpoint keys read `transformer.resblocks.{i}`)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(PriorBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, bias)
        return x

    def keys_values(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Every layer's keys and values of tokens `x` [B, N, W] (a prefix that later tokens attend
        to): [B, layers, 2, heads, N, head_dim], k at index 0 and v at 1."""
        cache = []
        for block in self.resblocks:
            x, k, v = block.forward_with_kv(x, bias)
            cache.append(torch.stack([k, v], dim=1))
        return torch.stack(cache, dim=1)


class Prior(nn.Module):
    """Diffusion prior network; `forward` predicts standardised x0 from standardised x_t."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.text_enc_proj = nn.Linear(cfg.text_width, w)
        self.text_emb_proj = nn.Linear(cfg.clip_dim, w)
        self.clip_img_proj = nn.Linear(cfg.clip_dim, w)
        self.out_proj = nn.Linear(w, cfg.clip_dim)
        self.transformer = PriorTransformerStack(w, cfg.layers, cfg.heads)
        self.final_ln = LayerNorm32(w) if cfg.final_ln else None
        self.positional_embedding = nn.Parameter(nn.init.normal_(torch.empty(1, cfg.seq_len, w), std=0.01))
        self.prd_emb = nn.Parameter(nn.init.normal_(torch.empty(1, 1, w), std=0.01))
        self.register_buffer("clip_mean", torch.zeros(1, cfg.clip_dim))
        self.register_buffer("clip_std", torch.ones(1, cfg.clip_dim))
        self.register_buffer("causal_bias", causal_bias(cfg.seq_len), persistent=False)

    def attention_bias(self, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, N, N] additive bias: text padding keys and future positions masked."""
        keep = F.pad(text_mask.bool(), (0, 4), value=True)
        return additive_mask(keep)[:, None, None, :] + self.causal_bias

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Predict x0.

        :param x_t: [B, clip_dim] noisy standardised image embedding.
        :param timesteps: [B] original-schedule timesteps (0..T-1).
        :param text_embed: [B, clip_dim] CLIP text embedding.
        :param text_tokens: [B, text_ctx, text_width] CLIP text tokens after `ln_final`.
        :param text_mask: [B, text_ctx] bool, True for real tokens (SOT..EOT).
        :return: [B, clip_dim] predicted standardised x0.
        """
        seq = torch.cat([self.context_tokens(text_embed, text_tokens), self.step_tokens(x_t, timesteps)], dim=1)
        h = self.transformer(seq + self.positional_embedding, self.attention_bias(text_mask))
        return self.predict(h)

    def context_tokens(self, text_embed: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """The step-independent tokens [B, 78, W]: projected text tokens, then the text embedding."""
        return torch.cat([self.text_enc_proj(text_tokens), self.text_emb_proj(text_embed)[:, None]], dim=1)

    def step_tokens(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The step-dependent tokens [B, 3, W]: time embedding, x_t, the learned `prd` query."""
        dtype = self.positional_embedding.dtype
        t_emb = self.time_embed(timestep_embedding(timesteps, self.cfg.width, dtype=work_dtype(dtype)).to(dtype))
        return torch.cat([t_emb[:, None], self.clip_img_proj(x_t)[:, None], self.prd_emb.expand(x_t.shape[0], -1, -1)],
                         dim=1)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """The `prd` position's output → standardised x0."""
        if self.final_ln is not None:
            h = self.final_ln(h)
        return self.out_proj(h[:, -1])

    @property
    def context_len(self) -> int:
        """Tokens that do not depend on the step: the text tokens and the text embedding."""
        return self.cfg.text_ctx + 1

    def context_kv(self, text_embed: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Keys and values of the step-independent tokens at every layer.

        :return: [B, layers, 2, heads, context_len, head_dim] (k at index 0, v at 1).
        """
        n = self.context_len
        x = self.context_tokens(text_embed, text_tokens) + self.positional_embedding[:, :n]
        return self.transformer.keys_values(x, self.attention_bias(text_mask)[:, :, :n, :n])

    def step(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, context_kv: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """`forward` given the cache of `context_kv`: predict standardised x0 [B, clip_dim]."""
        n = self.context_len
        x = self.step_tokens(x_t, timesteps) + self.positional_embedding[:, n:]
        bias = self.attention_bias(text_mask)[:, :, n:, :]
        for i, block in enumerate(self.transformer.resblocks):
            x, _, _ = block.forward_with_kv(x, bias, context_kv[:, i])
        return self.predict(x)

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised embedding → raw CLIP image embedding (`z·std + mean`), in ≥ float32."""
        work = work_dtype(z.dtype)
        return z.to(work) * self.clip_std.to(work) + self.clip_mean.to(work)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image embedding → standardised (`(z − mean)/std`), in ≥ float32."""
        work = work_dtype(z.dtype)
        return (z.to(work) - self.clip_mean.to(work)) / self.clip_std.to(work)
