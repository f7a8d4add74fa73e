"""The guided-diffusion UNet used by the decoder (64×64, with text/CLIP cross-attention) and
by the super-resolution stages (no attention, no scale-shift).

After Karlo's `karlo/modules/unet.py` (itself from openai/guided-diffusion). Changes: attention
runs through `F.scaled_dot_product_attention` on the same per-head interleaved [q|k|v] layout,
the context K/V projection works on token-major context [B, N, C], and the decoder's
conditioning (`emb_add`, context, context bias) comes from outside (`models.text_proj`).
Parameter names and shapes follow Karlo's checkpoints (1-D convs stay [out, in, 1]).
The same forward on `cpp_ext`'s fused kernels: `models.fused.unet_forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import UNetConfig
from models.layers import GroupNorm32, pointwise_rows, resample, timestep_embedding, work_dtype, zero_init


class ResBlock(nn.Module):
    """Residual block with time conditioning, optional channel change and up/down sampling."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        scale_shift: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.scale_shift = scale_shift
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, silu=True), nn.Identity(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels, silu=not scale_shift),
            nn.SiLU() if scale_shift else nn.Identity(),
            nn.Dropout(0.0),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        return resample(x, self.up, self.down)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """`emb`: the time embedding after SiLU (the UNet applies `emb_layers[0]` once for all blocks)."""
        h = self.in_layers[2](self._resample(self.in_layers[0](x)))
        x = self._resample(x)
        emb_out = self.emb_layers[1](emb)[:, :, None, None].to(h.dtype)
        norm = self.out_layers[0]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[3](norm.forward_film(h, scale, shift, silu=True))
        else:
            h = self.out_layers[3](norm.forward_film(h, None, None, norm.silu, add=emb_out))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention whose keys/values also include projected context tokens."""

    def __init__(self, channels: int, head_channels: int, context_width: int | None) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"channels {channels} not divisible by head size {head_channels}")
        self.heads = channels // head_channels
        self.norm = GroupNorm32(channels, silu=False)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.encoder_kv = nn.Conv1d(context_width, 2 * channels, 1) if context_width else None
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))
        self.kv_heads = slice(0, self.heads)  # this block's heads in the UNet's packed context K/V

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project context [B, N, W] to per-head keys and values, each [B, heads, N, ch]."""
        b, n, _ = context.shape
        kv = pointwise_rows(self.encoder_kv, context)
        kv = kv.view(b, n, self.heads, -1).transpose(1, 2)
        return kv.chunk(2, dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_bias: torch.Tensor | ContextBias | None = None,
        context_kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over the image positions and the context tokens.

        :param context_bias: the context keys' additive bias [B, N], 0 (keep) or -inf (padding)
            (or a `ContextBias` of it, which pads it once per resolution for every block of a forward).
        :param context_kv: the UNet's packed context keys/values (`UNet.context_kv`), used instead
            of projecting `context` again (this block reads its own heads, `kv_heads`).
        """
        b, c, hgt, wid = x.shape
        h = self.norm(x).view(b, c, -1)
        qkv = pointwise_rows(self.qkv, h.transpose(1, 2))  # [B, HW, 3C]
        qkv = qkv.view(b, hgt * wid, self.heads, -1).transpose(1, 2)  # [B, heads, HW, 3ch]
        q, k, v = qkv.chunk(3, dim=-1)
        ek, ev = self.context_keys_values(context, context_kv, q.dtype)
        bias = None
        if ek is not None:
            k = torch.cat([ek, k], dim=2)
            v = torch.cat([ev, v], dim=2)
            if context_bias is not None:
                context_bias = ContextBias(context_bias) if isinstance(context_bias, torch.Tensor) else context_bias
                bias = context_bias.padded(hgt * wid, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, HW, ch]
        out = out.transpose(2, 3).reshape(b, c, -1)
        out = self.proj_out(out)
        return x + out.view(b, c, hgt, wid)

    def context_keys_values(self, context: torch.Tensor | None, context_kv: torch.Tensor | None,
                            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """This block's context keys and values, each [B, heads, N, ch]: its heads of the packed
        `context_kv` where given, else projected from `context`; (None, None) without either or
        without context attention."""
        if self.encoder_kv is None:
            return None, None
        if context_kv is not None:
            packed = context_kv[:, :, self.kv_heads].to(dtype)
            return packed[:, 0], packed[:, 1]
        if context is not None:
            return self.context_kv(context)
        return None, None


class ContextBias:
    """The context keys' additive bias [B, N] (0 keep, -inf padding) of one UNet forward, with
    SDPA's padded, cast mask made once per resolution instead of once per attention block."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias
        self._padded: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def padded(self, image_keys: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, N + image_keys] in `dtype` (SDPA's additive mask)."""
        key = (image_keys, dtype)
        if key not in self._padded:
            self._padded[key] = F.pad(self.bias, (0, image_keys), value=0.0)[:, None, None, :].to(dtype)
        return self._padded[key]


class TimestepSequential(nn.Sequential):
    """Runs its layers, giving each the inputs it takes (keys read `blocks.N.M`)."""

    def forward(self, x, emb, context=None, context_bias=None, context_kv=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context, context_bias, context_kv)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Guided-diffusion UNet; `forward(x, t, emb_add, context, context_bias)` → model output."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc, temb = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, temb), nn.SiLU(), nn.Linear(temb, temb))

        def res(ch_in: int, ch_out: int | None = None, **kw) -> ResBlock:
            return ResBlock(ch_in, temb, ch_out, scale_shift=cfg.use_scale_shift_norm, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_head_channels, cfg.context_width)

        ch = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(res(ch, ch, down=True)))
                skip_chans.append(ch)
                ds *= 2

        middle = [res(ch)] + ([attn(ch)] if cfg.middle_attention else []) + [res(ch)]
        self.middle_block = TimestepSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch, silu=True), nn.Identity(), zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )
        heads = 0
        for block in self.context_blocks():
            block.kv_heads = slice(heads, heads + block.heads)
            heads += block.heads
        if heads != context_heads(cfg):
            raise AssertionError(f"context_heads({cfg}) = {context_heads(cfg)}, the UNet has {heads}")

    def context_blocks(self) -> list[AttentionBlock]:
        """The attention blocks that attend to context tokens, in the order of the packed K/V."""
        return [m for m in self.modules() if isinstance(m, AttentionBlock) and m.encoder_kv is not None]

    def context_kv(self, context: torch.Tensor) -> torch.Tensor:
        """Every attention block's context keys and values, packed: [B, 2, context_heads, N, head_channels].

        They depend on the conditioning only, so a sampling loop computes them once per call
        instead of once per step (`forward(..., context_kv=...)`)."""
        parts = [torch.stack(block.context_kv(context), dim=1) for block in self.context_blocks()]
        return torch.cat(parts, dim=2)

    def time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """[B] timesteps → [B, time_embed_dim] embedding."""
        dtype = self.time_embed[0].weight.dtype
        sinusoid = timestep_embedding(timesteps, self.cfg.model_channels, dtype=work_dtype(dtype))
        return self.time_embed(sinusoid.to(dtype))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        emb_add: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_bias: torch.Tensor | None = None,
        context_kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the UNet.

        :param x: [B, in_channels, H, W] input.
        :param timesteps: [B] original-schedule timesteps.
        :param emb_add: optional [B, time_embed_dim] added to the time embedding.
        :param context: optional [B, N, context_width] cross-attention tokens.
        :param context_bias: optional [B, N] additive bias for the context keys (0 / -inf).
        :param context_kv: optional `context_kv(context)`, computed once, used instead of `context`.
        :return: [B, out_channels, H, W].
        """
        emb = self.time_embedding(timesteps)
        if emb_add is not None:
            emb = emb + emb_add
        emb = F.silu(emb)  # every ResBlock's emb_layers starts with SiLU: applied once here
        bias = ContextBias(context_bias) if context_bias is not None else None
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, bias, context_kv)
            hs.append(h)
        h = self.middle_block(h, emb, context, bias, context_kv)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, bias, context_kv)
        return self.out(h)


def context_heads(cfg: UNetConfig) -> int:
    """Attention heads that read context tokens, over the whole UNet (the packed K/V's head axis)."""
    if not cfg.context_width:
        return 0
    heads, ds = 0, 1
    for level, mult in enumerate(cfg.channel_mult):
        if ds in cfg.attention_ds:
            heads += (2 * cfg.num_res_blocks + 1) * (cfg.model_channels * mult // cfg.num_head_channels)
        if level != len(cfg.channel_mult) - 1:
            ds *= 2
    if cfg.middle_attention:
        heads += cfg.model_channels * cfg.channel_mult[-1] // cfg.num_head_channels
    return heads
