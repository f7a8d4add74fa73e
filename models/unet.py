"""The guided-diffusion UNet used by the decoder (64×64, with text/CLIP cross-attention) and
by the super-resolution stages (no attention, no scale-shift).

After Karlo's `karlo/modules/unet.py` (itself from openai/guided-diffusion). Changes: attention
runs through `F.scaled_dot_product_attention` on the same per-head interleaved [q|k|v] layout,
the context K/V projection works on token-major context [B, N, C], and the decoder's
conditioning (`emb_add`, context, context bias) comes from outside (`models.text_proj`).
On CUDA in half precision with `cpp_ext` built, an attention block with context runs flash
attention's variable-length form instead (`AttentionBlock._attend_varlen`): the same function.
Parameter names and shapes follow Karlo's checkpoints (1-D convs stay [out, in, 1]).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import cpp_ext
from models.configs import UNetConfig
from models.layers import (
    DerivedTensors,
    GroupNorm32,
    NormInput,
    _layout,
    bias_residual,
    fused_kernels_available,
    plain,
    resample,
    timestep_embedding,
    work_dtype,
    zero_init,
)


class SkipConcat(NamedTuple):
    """An output block's input: the running activations and the input blocks' skip, concatenated
    along channels — by the block's first norm where `cpp_ext.group_norm_concat` serves it (its
    statistics pass writes the concatenation), else by `torch.cat`. `h_bias` and `h_bias2`, where
    given, are per-channel biases still to be added to `h` (see `DeferredBias`)."""

    h: torch.Tensor
    skip: torch.Tensor
    h_bias: torch.Tensor | None = None
    h_bias2: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        h = self.h
        if self.h_bias is not None:
            total = self.h_bias.float() + (self.h_bias2.float() if self.h_bias2 is not None else 0.0)
            h = (h.float() + total.view(1, -1, *([1] * (h.dim() - 2)))).to(h.dtype)
        return torch.cat([h, self.skip], dim=1)


class DeferredBias(NamedTuple):
    """An output block's result without its last two biases: `h + bias + bias2` is the block's
    output. The block's residual join accumulated the skip convolution straight into its last
    convolution's output (one GEMM, beta = 1) instead of a join pass adding both and the biases;
    the next output block's concatenation adds the biases as it copies `h` (`SkipConcat`)."""

    h: torch.Tensor
    bias: torch.Tensor
    bias2: torch.Tensor

    def concat(self, skip: torch.Tensor) -> SkipConcat:
        return SkipConcat(self.h, skip, self.bias, self.bias2)


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

    def _emb_out(self, emb: torch.Tensor | EmbeddingProjections) -> torch.Tensor:
        """This block's time-embedding projection [B, C or 2C]."""
        if isinstance(emb, EmbeddingProjections):
            return emb.of(self.emb_layers[1])
        return self.emb_layers[1](emb)

    def forward(self, x: torch.Tensor | SkipConcat | NormInput, emb: torch.Tensor | EmbeddingProjections,
                defer_bias: bool = False, stats: bool = False) -> torch.Tensor | DeferredBias | NormInput:
        """`emb`: the time embedding after SiLU (the UNet applies `emb_layers[0]` once for all
        blocks), or every block's projection of it (`UNet._embedding_projections`).

        :param defer_bias: the caller passes the result on as the next output block's `SkipConcat`;
            an output block on the fused path then returns a `DeferredBias`.
        :param stats: a group norm reads the result next: on the fused path the residual join may
            compute its statistics and return a `NormInput` (`bias_residual`)."""
        if isinstance(x, SkipConcat):
            if self._concat_in_norm(x):
                return self._forward_fused(x, emb, defer_bias, stats)
            x = x.tensor()
        if fused_kernels_available(plain(x), self.in_layers[0].weight):
            return self._forward_fused(x, emb, stats=stats)
        x = plain(x)
        h = self.in_layers[2](self._resample(self.in_layers[0](x)))
        x = self._resample(x)
        emb_out = self._emb_out(emb)[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[3](self.out_layers[0].forward_film(h, scale, shift, silu=True))
        else:
            h = self.out_layers[3](self.out_layers[0].forward_film(h, None, None, self.out_layers[0].silu, add=emb_out))
        return self.skip_connection(x) + h

    def _concat_in_norm(self, x: SkipConcat) -> bool:
        """Whether the first norm concatenates `x` itself (`cpp_ext.group_norm_concat`: both parts
        channels-last half precision with channel counts multiples of 8, no resampling)."""
        return (fused_kernels_available(x.h, self.in_layers[0].weight) and x.skip.dtype == x.h.dtype
                and _layout(x.h) == _layout(x.skip) == "nhwc" and x.h.shape[1] % 8 == 0 and x.skip.shape[1] % 8 == 0
                and not (self.up or self.down))

    def _forward_fused(self, x: torch.Tensor | SkipConcat | NormInput, emb: torch.Tensor,
                       defer_bias: bool = False, stats: bool = False) -> torch.Tensor | DeferredBias | NormInput:
        """`forward` with `cpp_ext`'s kernels (CUDA, half precision): the convolutions run without
        their biases (torch adds a convolution's bias in a pass of its own); the first one's is
        added inside the second norm, the last one's (and the skip convolution's) in the residual
        join; an up (down) block's norm writes its output upsampled (pooled) and its residual join
        reads x resized the same way (no resized copies). The same function, three to five passes over the
        activations fewer per block. With `defer_bias` (an output block whose result goes on to the
        next one's concatenation) the skip convolution accumulates into the last convolution's
        output as one GEMM and the biases are left to that concatenation: no join pass. A
        `NormInput` x's statistics serve the first norm; with `stats` the join may return one."""
        conv_in, norm_out, conv_out = self.in_layers[2], self.out_layers[0], self.out_layers[3]
        identity_skip = not isinstance(self.skip_connection, nn.Conv2d)
        if isinstance(x, SkipConcat):  # the norm's statistics pass writes the concatenation x
            norm_in = self.in_layers[0]
            normed, x = cpp_ext.kernels.group_norm_concat(x.h, x.skip, norm_in.num_groups, norm_in.weight,
                                                          norm_in.bias, norm_in.eps, norm_in.silu, x.h_bias, x.h_bias2)
            h = F.conv2d(normed, conv_in.weight, None, padding=1)
        elif (self.up or self.down) and identity_skip:
            # the norm writes its output resized and the residual join reads x resized: neither
            # resized copy is made
            h = F.conv2d(self.in_layers[0](x, up=self.up, down=self.down), conv_in.weight, None, padding=1)
            x = plain(x)
        else:
            h = F.conv2d(self._resample(self.in_layers[0](x)), conv_in.weight, None, padding=1)
            x = self._resample(plain(x))
        emb_out = self._emb_out(emb)
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm_out.forward_film(h, scale, shift, silu=True, add_bias=conv_in.bias)
        else:
            h = norm_out.forward_film(h, None, None, norm_out.silu, add=emb_out, add_bias=conv_in.bias)
        h = F.conv2d(h, conv_out.weight, None, padding=1)
        if identity_skip:
            return bias_residual(h, x, conv_out.bias, stats=stats)
        if defer_bias and _layout(h) == _layout(x) == "nhwc" and h.shape[2:] == x.shape[2:]:
            # channels-last maps are [pixels, channels] matrices: h += x · W_skipᵀ
            rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            rows.addmm_(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), self.skip_connection.weight.flatten(1).t())
            return DeferredBias(h, conv_out.bias, self.skip_connection.bias)
        skip = F.conv2d(x, self.skip_connection.weight, None)
        return bias_residual(h, skip, conv_out.bias, self.skip_connection.bias, stats=stats)


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
        kv = F.linear(context, self.encoder_kv.weight[:, :, 0], self.encoder_kv.bias)
        kv = kv.view(b, n, self.heads, -1).transpose(1, 2)
        return kv.chunk(2, dim=-1)

    def forward(
        self,
        x: torch.Tensor | NormInput,
        context: torch.Tensor | None = None,
        context_bias: torch.Tensor | ContextBias | None = None,
        context_kv: torch.Tensor | None = None,
        stats: bool = False,
    ) -> torch.Tensor | NormInput:
        """Attend over the image positions and the context tokens (a `NormInput` x's statistics
        serve the norm; with `stats` the fused residual join may return one, as `ResBlock`'s).

        :param context_bias: the context keys' additive bias [B, N], 0 (keep) or -inf (padding)
            (or a `ContextBias` of it, which pads it once per resolution for every block of a forward).
        :param context_kv: the UNet's packed context keys/values (`UNet.context_kv`), used instead
            of projecting `context` again (this block reads its own heads, `kv_heads`).
        """
        h = self.norm(x)
        x = plain(x)
        b, c, hgt, wid = x.shape
        h = h.view(b, c, -1)
        qkv = F.linear(h.transpose(1, 2), self.qkv.weight[:, :, 0], self.qkv.bias)  # [B, HW, 3C]
        if isinstance(context_bias, torch.Tensor):
            context_bias = ContextBias(context_bias)
        packed = None  # this block's cached context keys/values [B, 2, heads, N, ch]
        ek = ev = None  # or its context's keys and values, each [B, heads, N, ch]
        if context_kv is not None and self.encoder_kv is not None:
            packed = context_kv[:, :, self.kv_heads].to(qkv.dtype)
            ek, ev = packed[:, 0], packed[:, 1]
        elif context is not None and self.encoder_kv is not None:
            ek, ev = self.context_kv(context)
        fused = fused_kernels_available(x, self.norm.weight)
        if fused and ek is not None and _flash_varlen_serves(qkv, c // self.heads):
            packed = torch.stack([ek, ev], dim=1) if packed is None else packed
            return self._project_join(self._attend_varlen(qkv, packed, context_bias), x, stats)
        qkv = qkv.view(b, hgt * wid, self.heads, -1).transpose(1, 2)  # [B, heads, HW, 3ch]
        q, k, v = qkv.chunk(3, dim=-1)
        bias = None
        if ek is not None:
            k = torch.cat([ek, k], dim=2)
            v = torch.cat([ev, v], dim=2)
            if context_bias is not None:
                bias = context_bias.padded(hgt * wid, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, HW, ch]
        if fused:  # SDPA's output is token-major already
            return self._project_join(out.transpose(1, 2).reshape(b, hgt * wid, c), x, stats)
        out = out.transpose(2, 3).reshape(b, c, -1)
        out = F.conv1d(out, self.proj_out.weight, self.proj_out.bias)
        return x + out.view(b, c, hgt, wid)

    def _project_join(self, out: torch.Tensor, x: torch.Tensor, stats: bool = False) -> torch.Tensor | NormInput:
        """Token-major attention output [B, HW, C] → x + proj_out(out): the projection without
        bias, then the bias and the residual in one pass (`cpp_ext`; with `stats`, maybe also the
        next norm's statistics); the result has x's layout."""
        b, c, hgt, wid = x.shape
        proj = F.linear(out, self.proj_out.weight[:, :, 0]).view(b, hgt, wid, c).permute(0, 3, 1, 2)
        return bias_residual(proj, x, self.proj_out.bias, stats=stats)

    def _attend_varlen(self, qkv: torch.Tensor, packed: torch.Tensor, context_bias: ContextBias | None) -> torch.Tensor:
        """Attention over [image keys | context keys] by flash attention's variable-length form:
        `cpp_ext` packs each sample's image keys/values and its context's with the kept tokens
        first, and `seqused_k` (image positions + kept tokens) leaves the padding out, so no
        additive mask is read. Same function as the SDPA path (keys are unordered).

        :param qkv: [B, HW, 3C] projection output (per head [q|k|v]).
        :param packed: [B, 2, heads, N, ch] context keys (index 0) and values (1).
        :return: [B, HW, C] token-major.
        """
        b, hw, c3 = qkv.shape
        n, ch = packed.shape[3], packed.shape[4]
        if context_bias is None:
            keep = torch.ones(b, n, dtype=torch.bool, device=qkv.device)
            cu_q, cu_k = _offsets(b, hw, n, qkv.device)
        else:
            keep, (cu_q, cu_k) = context_bias.keep(), context_bias.offsets(hw)
        rows = qkv.reshape(b * hw, c3)
        kv, used = cpp_ext.kernels.pack_attention_kv(rows, packed, keep)  # [B, HW + N, heads, 2, ch]
        q = rows.view(b * hw, self.heads, 3, ch)[:, :, 0]
        out = torch.ops.aten._flash_attention_forward(
            q, kv[:, :, :, 0].flatten(0, 1), kv[:, :, :, 1].flatten(0, 1), cu_q, cu_k, hw, hw + n, 0.0, False, False,
            seqused_k=used)[0]  # [B·HW, heads, ch]
        return out.view(b, hw, c3 // 3)


def _has_flash_varlen() -> bool:
    """Whether this torch has flash attention's variable-length form with per-sample key counts."""
    try:
        return "seqused_k" in str(torch.ops.aten._flash_attention_forward.default._schema)
    except (AttributeError, RuntimeError):
        return False


_FLASH_VARLEN = _has_flash_varlen()


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    """Flash attention runs on compute capability 8.0 and newer."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _flash_varlen_serves(qkv: torch.Tensor, head_channels: int) -> bool:
    """Whether `_attend_varlen` can run these inputs (CUDA fp16/bf16 on sm80+, head size a
    multiple of 8 up to 256, cpp_ext built — the caller checks the last)."""
    return (_FLASH_VARLEN and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)
            and head_channels % 8 == 0 and head_channels <= 256 and _flash_capable(qkv.device))


def _offsets(batch: int, queries: int, keys: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention's cumulative query and key offsets of `batch` equal-length samples (int32)."""
    steps = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return steps * queries, steps * keys


class ContextBias:
    """The context keys' additive bias [B, N] (0 keep, -inf padding) of one UNet forward, with
    what its attention blocks derive from it made once per forward (per resolution where it
    depends on one) instead of once per block: SDPA's padded, cast mask; the varlen path's kept
    tokens and offsets."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias
        self._padded: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._offsets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._keep: torch.Tensor | None = None

    def padded(self, image_keys: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, 1, N + image_keys] in `dtype` (SDPA's additive mask)."""
        key = (image_keys, dtype)
        if key not in self._padded:
            self._padded[key] = F.pad(self.bias, (0, image_keys), value=0.0)[:, None, None, :].to(dtype)
        return self._padded[key]

    def keep(self) -> torch.Tensor:
        """[B, N] bool: the tokens the bias keeps (its zeros)."""
        if self._keep is None:
            self._keep = (self.bias == 0).contiguous()
        return self._keep

    def offsets(self, image_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flash attention's cumulative query and key offsets at `image_keys` image positions."""
        if image_keys not in self._offsets:
            b, n = self.bias.shape
            self._offsets[image_keys] = _offsets(b, image_keys, image_keys + n, self.bias.device)
        return self._offsets[image_keys]


# Whether the fused path runs the first convolution's bias inside cuDNN's GEMM (`UNet._input_conv`);
# a switch for tests and benchmarks.
INPUT_BIAS_IN_CONV = True


class TimestepSequential(nn.Sequential):
    """Runs its layers, giving each the inputs it takes (keys read `blocks.N.M`)."""

    def forward(self, x, emb, context=None, context_bias=None, context_kv=None, defer_bias=False, stats=False):
        """`defer_bias`: the result goes on as the next output block's concatenation (`DeferredBias`);
        `stats`: a group norm reads it next (`NormInput`). Inside, a layer followed by a ResBlock
        or an attention block (both start with a norm) may hand on its statistics."""
        last = len(self) - 1
        for i, layer in enumerate(self):
            norm_next = stats if i == last else isinstance(self[i + 1], ResBlock | AttentionBlock)
            if isinstance(x, SkipConcat) and not isinstance(layer, ResBlock):
                x = x.tensor()
            if isinstance(layer, ResBlock):
                x = layer(x, emb, defer_bias and i == last, norm_next)  # only the last layer's result leaves the block
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context, context_bias, context_kv, norm_next)
            else:
                x = layer(plain(x))
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
        # every ResBlock's time-embedding projection, in forward order (a plain list: they are
        # registered in their blocks); `_embedding_projections` caches their stacked weights
        self._emb_linears: list[nn.Linear] = [m.emb_layers[1] for m in self.modules() if isinstance(m, ResBlock)]
        self._emb_stack = DerivedTensors()  # `_embedding_projections`: stacked weight, bias, spans
        self._input_weight = DerivedTensors()  # `_input_conv`: widened weight, input fill

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
        if fused_kernels_available(x, self.time_embed[0].weight):
            emb = self._embedding_projections(emb) or emb
        if isinstance(context_bias, torch.Tensor):
            context_bias = ContextBias(context_bias)
        hs = []
        h = x
        biased = self._input_conv(x)
        # every input block's result goes to a block that starts with a ResBlock (its norm), the
        # middle block's and the output blocks' (but the last) to a concatenation, the last output
        # block's to the out norm
        for i, block in enumerate(self.input_blocks):
            if i == 0 and biased is not None:
                h = biased
            else:
                h = block(h, emb, context, context_bias, context_kv, stats=True)
            hs.append(plain(h))
        h = self.middle_block(h, emb, context, context_bias, context_kv)
        last = len(self.output_blocks) - 1
        for i, block in enumerate(self.output_blocks):
            skip = hs.pop()
            x_in = h.concat(skip) if isinstance(h, DeferredBias) else SkipConcat(h, skip)
            h = block(x_in, emb, context, context_bias, context_kv, defer_bias=i < last, stats=i == last)
        norm, identity, conv = self.out
        return conv(identity(norm(h)))

    def _input_conv(self, x: torch.Tensor) -> torch.Tensor | None:
        """The first input block's convolution with its bias inside cuDNN's GEMM: x gets one more
        input channel of ones and the weight one more input channel holding the bias at its centre
        tap (which never reads the zero padding), so the bias joins the float32 accumulation
        instead of a pass of its own: torch adds a convolution's bias separately, in channels-last
        memory a broadcast that cost more than the convolution. The input is widened further, with
        zero channels, to a multiple of 8: cuDNN's kernels for 8 channels beat those for 7 (Karlo's
        super-res input, 6 + 1; docs/speed.md has the figures). For channels-last half-precision
        maps on the fused path (`INPUT_BIAS_IN_CONV`); the widened weight is made on first use and
        again whenever the convolution's weight or bias changes, never during a graph capture
        (None then, as in the other cases: the caller runs the block as it is)."""
        conv = self.input_blocks[0][0]
        if not (INPUT_BIAS_IN_CONV and isinstance(conv, nn.Conv2d) and conv.bias is not None
                and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
                and conv.groups == 1 and fused_kernels_available(x, conv.weight) and _layout(x) == "nhwc"):
            return None

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            extra = (-(conv.in_channels + 1)) % 8 + 1  # the ones channel, then zeros
            taps = conv.weight.new_zeros(conv.weight.shape[0], extra, 3, 3)
            taps[:, 0, 1, 1] = conv.bias
            weight = torch.cat([conv.weight, taps], dim=1).contiguous(memory_format=torch.channels_last)
            fill = torch.zeros(extra, dtype=x.dtype, device=x.device)
            fill[0] = 1.0
            return weight, fill

        derived = self._input_weight.get((conv.weight, conv.bias), (x.dtype,), build)
        if derived is None:
            return None
        weight, fill = derived
        b, c, height, width = x.shape
        widened = torch.empty((b, weight.shape[1], height, width), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last)
        widened[:, :c].copy_(x)
        widened[:, c:].copy_(fill.view(1, -1, 1, 1).expand(b, -1, height, width))
        return F.conv2d(widened, weight, None, padding=1)

    def _embedding_projections(self, emb: torch.Tensor) -> EmbeddingProjections | None:
        """Every ResBlock's `emb_layers[1](emb)` from one GEMM over their weights stacked, instead
        of one small GEMM per block (30 launches per decoder forward, each bound by reading its
        weights). The stacked copy (the decoder's: 128 MB in fp16) is made on
        first use and again whenever a block's weights change (new tensors, or written in place);
        never during graph capture (its kernels would not run), where this returns None."""
        def build() -> tuple[torch.Tensor, torch.Tensor, dict[int, tuple[int, int]]]:
            spans, start = {}, 0
            for lin in self._emb_linears:
                spans[id(lin)] = (start, start + lin.out_features)
                start += lin.out_features
            weight = torch.cat([lin.weight.detach() for lin in self._emb_linears]).to(emb.dtype)
            bias = torch.cat([lin.bias.detach() for lin in self._emb_linears]).to(emb.dtype)
            return weight, bias, spans

        if not self._emb_linears:
            return None
        tensors = [t for lin in self._emb_linears for t in (lin.weight, lin.bias)]
        derived = self._emb_stack.get(tensors, (emb.dtype, emb.device), build)
        if derived is None:
            return None
        weight, bias, spans = derived
        return EmbeddingProjections(F.linear(emb, weight, bias), spans)


class EmbeddingProjections:
    """The ResBlocks' time-embedding projections of one UNet forward, as column spans of one
    [B, sum of their widths] GEMM output; a block reads its own span (strided rows, no copy)."""

    def __init__(self, out: torch.Tensor, spans: dict[int, tuple[int, int]]) -> None:
        self.out = out
        self.spans = spans

    def of(self, linear: nn.Linear) -> torch.Tensor:
        """`linear(emb)` of the block whose projection is `linear`."""
        start, end = self.spans[id(linear)]
        return self.out[:, start:end]


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
