"""The UNet's blocks on `cpp_ext`'s kernels, and the protocol by which a block hands work on.

A ResBlock's convolutions run without their biases (torch adds a convolution's bias in a pass of
its own): the first one's joins the second norm's kernel, the last one's (and the skip
convolution's) the residual join; an up (down) block's norm writes its output resized and its
join reads x resized the same way (with `FusedOptions.fold_upsampling`, an up block's first
convolution runs on the norm's output before upsampling instead: `models.fused.upsampled_conv`).
Between blocks:

- `SkipConcat`: an output block's input, the running activations and the skip, concatenated by
  the block's first norm (`cpp_ext.group_norm_concat`: its statistics pass writes the
  concatenation) instead of `torch.cat`;
- `DeferredBias`: an output block's result without its last two biases, which the next output
  block's concatenation adds as it copies (no join pass);
- `NormInput` (`models.fused.norms`): a join's output with the next norm's statistics done;
- `EmbeddingProjections`: every ResBlock's time-embedding projection from one GEMM.

A block may hold FP8 layers (`models.fp8`) in place of its convolutions and projections: they
run their own e4m3 products, bias-free where the protocol adds the bias later (`_conv`, `_rows`);
with `FusedOptions.norm_writes_e4m3` a norm whose output only such a 3×3 convolution reads writes
it in e4m3 at the convolution's calibrated scale (`_norm_conv`). With
`FusedOptions.residual_in_conv` a block with an identity skip adds it, and its last bias, in its
last convolution's epilogue (CUTLASS) instead of the join pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import cpp_ext
from models import implicit_conv
from models.fp8.layers import Fp8Conv
from models.fused import keys_around, upsampled_conv
from models.fused.availability import layout
from models.fused.norms import (
    NormInput,
    bias_residual,
    group_norm,
    group_norm_concat_e4m3,
    group_norm_e4m3,
    plain,
)
from models.fused.options import DEFAULT, FusedOptions
from models.layers import resample
from models.unet import AttentionBlock, ContextBias, ResBlock


class SkipConcat(NamedTuple):
    """An output block's input: the running activations and the input blocks' skip, concatenated
    along channels — by the block's first norm where `cpp_ext.group_norm_concat` serves it, else
    by `torch.cat`. `h_bias` and `h_bias2`, where given, are per-channel biases still to be added
    to `h` (see `DeferredBias`)."""

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


Activations = torch.Tensor | SkipConcat | NormInput


def _emb_out(block: ResBlock, emb: torch.Tensor | EmbeddingProjections) -> torch.Tensor:
    """The block's time-embedding projection [B, C or 2C]."""
    if isinstance(emb, EmbeddingProjections):
        return emb.of(block.emb_layers[1])
    return block.emb_layers[1](emb)


def _concat_in_norm(block: ResBlock, x: SkipConcat) -> bool:
    """Whether the first norm concatenates `x` itself (`cpp_ext.group_norm_concat`: both parts
    channels-last, one dtype, channel counts multiples of 8, no resampling)."""
    return (x.skip.dtype == x.h.dtype and layout(x.h) == layout(x.skip) == "nhwc"
            and x.h.shape[1] % 8 == 0 and x.skip.shape[1] % 8 == 0 and not (block.up or block.down))


def _conv(conv: nn.Conv2d | Fp8Conv, x: torch.Tensor, options: FusedOptions) -> torch.Tensor:
    """A residual block's convolution (3×3 padded by 1, or the 1×1 skip) without its bias: an FP8
    layer's own product; a 3×3 on CUTLASS's Hopper implicit GEMM where `options.cutlass_convs`
    asks for it and it serves, else cuDNN's."""
    if isinstance(conv, Fp8Conv):
        return conv(x, with_bias=False)
    if options.cutlass_convs and conv.kernel_size == (3, 3):
        return implicit_conv.conv2d(x, conv.weight, None, conv.padding)
    return F.conv2d(x, conv.weight, None, padding=conv.padding)


def _e4m3_scale(conv: nn.Conv2d | Fp8Conv, x: torch.Tensor, options: FusedOptions) -> torch.Tensor | None:
    """The scale at which the norm before `conv` writes e4m3 for it (`options.norm_writes_e4m3`
    and an FP8 convolution that takes its input so, `Fp8Conv.quantized_input_scale`), else None."""
    if options.norm_writes_e4m3 and isinstance(conv, Fp8Conv):
        return conv.quantized_input_scale(x)
    return None


def _norm_conv(conv: nn.Conv2d | Fp8Conv, x: torch.Tensor | upsampled_conv.Phased, options: FusedOptions,
               normed: Callable[[], torch.Tensor], quantized: Callable[[torch.Tensor], torch.Tensor | None],
               residual: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """`_conv(conv, normed())` for a norm's output `normed()` of the map `x`: where the norm can
    write e4m3 for `conv` (`_e4m3_scale`), `quantized(scale)` (None where it does not serve) and
    the convolution of that. With `residual`: where the convolution's epilogue can add it, the
    result holds the bias and the residual; returns (result, whether it does)."""
    scale = _e4m3_scale(conv, x, options)
    q = quantized(scale) if scale is not None else None
    if q is not None:
        if residual is not None and implicit_conv.residual_fits(residual, q, conv.weight_q, conv.padding):
            return conv.product_of_quantized(q, residual=residual), True
        return conv.product_of_quantized(q, with_bias=False), False
    h = normed()
    if residual is not None:
        if isinstance(conv, Fp8Conv):
            joined = conv.cutlass_residual(h, residual)
        elif options.cutlass_convs and conv.kernel_size == (3, 3):
            joined = implicit_conv.conv2d_residual(h, conv.weight, conv.bias, conv.padding, residual)
        else:
            joined = None
        if joined is not None:
            return joined, True
    return _conv(conv, h, options), False


def _folded_weights(block: ResBlock, x: Activations, options: FusedOptions) -> torch.Tensor | None:
    """An up block's first convolution's folded weights (`upsampled_conv.folded_weights`) where
    `options.fold_upsampling` asks for them and the fold serves the block (an fp16 3×3 convolution
    of a channels-last map) — with `options.fold_race`, where it is also the faster way for the
    shape (`upsampled_conv.fold_pays`); else None."""
    if not (options.fold_upsampling and block.up and not isinstance(x, SkipConcat)):
        return None
    conv, x = block.in_layers[2], plain(x)
    if not (upsampled_conv.serves(conv, x) and layout(x) == "nhwc"):
        return None
    folded = upsampled_conv.folded_weights(conv, x.dtype)
    if folded is not None and options.fold_race and x.is_cuda:
        return folded if upsampled_conv.fold_pays(x, conv.weight.detach(), folded, options) else None
    return folded


def _rows(conv: nn.Conv1d | Fp8Conv, rows: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """A 1-wide 1-D convolution (an attention block's projection) applied to token rows [..., C]."""
    if isinstance(conv, Fp8Conv):
        return conv.rows(rows, with_bias)
    return F.linear(rows, conv.weight[:, :, 0], conv.bias if with_bias else None)


def res_block(block: ResBlock, x: Activations, emb: torch.Tensor | EmbeddingProjections,
              options: FusedOptions = DEFAULT, defer_bias: bool = False,
              stats: bool = False) -> torch.Tensor | DeferredBias | NormInput:
    """`block(x, emb)` on the kernels (the module docstring's passes).

    :param defer_bias: the caller passes the result on as the next output block's `SkipConcat`:
        a block with a skip convolution accumulates it into its last convolution's output and
        returns a `DeferredBias`.
    :param stats: a group norm reads the result next: the join may compute its statistics and
        return a `NormInput`."""
    if isinstance(x, SkipConcat) and not _concat_in_norm(block, x):
        x = x.tensor()
    norm_in, conv_in = block.in_layers[0], block.in_layers[2]
    norm_out, conv_out = block.out_layers[0], block.out_layers[3]
    skip_conv = block.skip_connection
    identity_skip = isinstance(skip_conv, nn.Identity)
    if isinstance(x, SkipConcat):  # the norm's statistics pass writes the concatenation x
        e4m3_scale = _e4m3_scale(conv_in, x.h, options)
        done = None if e4m3_scale is None else group_norm_concat_e4m3(norm_in, x.h, x.skip, e4m3_scale,
                                                                      x.h_bias, x.h_bias2)
        if done is not None:
            q, x = done
            h = conv_in.product_of_quantized(q, with_bias=False)
        else:
            normed, x = cpp_ext.kernels.group_norm_concat(x.h, x.skip, norm_in.num_groups, norm_in.weight,
                                                          norm_in.bias, norm_in.eps, norm_in.silu, x.h_bias, x.h_bias2)
            h = _conv(conv_in, normed, options)
    elif (folded := _folded_weights(block, x, options)) is not None:
        # an up block's first convolution on the norm's output before upsampling (`upsampled_conv`);
        # its product's interleave left to the second norm, which reads it in place where it can
        normed = group_norm(norm_in, x)
        if options.interleave_in_norm and not isinstance(conv_out, Fp8Conv):
            h = upsampled_conv.folded_product(normed, folded, options)
        else:
            h = upsampled_conv.conv_of_upsampled(normed, folded, options)
        x = plain(x) if identity_skip else resample(plain(x), up=True)
    elif (block.up or block.down) and not identity_skip:
        h = _conv(conv_in, resample(group_norm(norm_in, x), block.up, block.down), options)
        x = resample(plain(x), block.up, block.down)
    else:
        # an up or down block's norm writes its output resized and the join reads x resized: neither
        # resized copy is made
        resize = {"up": block.up, "down": block.down}
        h, _ = _norm_conv(conv_in, plain(x), options, lambda: group_norm(norm_in, x, **resize),
                          lambda s: group_norm_e4m3(norm_in, x, s, **resize))
        x = plain(x)
    emb_out = _emb_out(block, emb)
    if block.scale_shift:
        scale, shift = emb_out.chunk(2, dim=1)
        norm_args = {"scale": scale, "shift": shift, "silu": True, "add_bias": conv_in.bias}
    else:
        norm_args = {"add": emb_out, "add_bias": conv_in.bias}
    mid = h  # the first convolution's output, without its bias (the norm adds it)
    # an identity skip of the output's size may join in the last convolution's epilogue
    residual = x if options.residual_in_conv and identity_skip and not (block.up or block.down) else None
    h, joined = _norm_conv(conv_out, mid, options, lambda: group_norm(norm_out, mid, **norm_args),
                           lambda s: group_norm_e4m3(norm_out, mid, s, **norm_args), residual)
    if joined:
        return h
    if identity_skip:
        return bias_residual(h, x, conv_out.bias, stats=stats, options=options)
    if (defer_bias and options.defer_bias and isinstance(skip_conv, nn.Conv2d)
            and layout(h) == layout(x) == "nhwc" and h.shape[2:] == x.shape[2:]):
        # channels-last maps are [pixels, channels] matrices: h += x · W_skipᵀ
        rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        rows.addmm_(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), skip_conv.weight.flatten(1).t())
        return DeferredBias(h, conv_out.bias, skip_conv.bias)
    return bias_residual(h, _conv(skip_conv, x, options), conv_out.bias, skip_conv.bias, stats=stats, options=options)


class VarlenContext(ContextBias):
    """`ContextBias` with what flash attention's variable-length form derives from it, made once
    per forward: the kept tokens, and the offsets per resolution."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__(bias)
        self._offsets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._keep: torch.Tensor | None = None

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


def attention_block(block: AttentionBlock, x: torch.Tensor | NormInput, context: torch.Tensor | None = None,
                    context_bias: VarlenContext | None = None, context_kv: torch.Tensor | None = None,
                    options: FusedOptions = DEFAULT, stats: bool = False) -> torch.Tensor | NormInput:
    """`block(x, context, context_bias, context_kv)` on the kernels: the norm's kernel (a
    `NormInput`'s statistics serve it), token-major attention — flash attention's variable-length
    form where it runs (`_attend_varlen`), else SDPA — and the output projection without its bias,
    then the bias and the residual in one join (with `stats`, maybe also the next norm's statistics)."""
    h = group_norm(block.norm, x)
    x = plain(x)
    b, c, hgt, wid = x.shape
    h = h.view(b, c, -1)
    if (options.keys_around_images and keys_around.serves(block, b, context_kv)
            and _flash_varlen_serves(h, c // block.heads)):
        # the context keys sit around the image rows in the projection's buffer: no pack
        around = keys_around.keys_around(block, context_kv, context_bias.bias if context_bias is not None else None,
                                         hgt * wid, h.dtype)
        torch.addmm(block.qkv.bias, h.transpose(1, 2).reshape(b * hgt * wid, c), block.qkv.weight[:, :, 0].t(),
                    out=around.image_rows())
        attended = around.attend().view(b, hgt * wid, c)
        return _project_join(block, attended, x, stats, options)
    qkv = _rows(block.qkv, h.transpose(1, 2))  # [B, HW, 3C]
    packed = None  # this block's cached context keys/values [B, 2, heads, N, ch], read in place
    if context_kv is not None and block.encoder_kv is not None:
        packed = context_kv[:, :, block.kv_heads].to(qkv.dtype)
        ek, ev = packed[:, 0], packed[:, 1]
    else:
        ek, ev = block.context_keys_values(context, None, qkv.dtype)
    if ek is not None and _flash_varlen_serves(qkv, c // block.heads):
        packed = torch.stack([ek, ev], dim=1) if packed is None else packed
        attended = _attend_varlen(block, qkv, packed, context_bias, options.cudnn_attention)
        return _project_join(block, attended, x, stats, options)
    qkv = qkv.view(b, hgt * wid, block.heads, -1).transpose(1, 2)  # [B, heads, HW, 3ch]
    q, k, v = qkv.chunk(3, dim=-1)
    bias = None
    if ek is not None:
        k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
        if context_bias is not None:
            bias = context_bias.padded(hgt * wid, q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, HW, ch]
    return _project_join(block, out.transpose(1, 2).reshape(b, hgt * wid, c), x, stats, options)


def _project_join(block: AttentionBlock, out: torch.Tensor, x: torch.Tensor, stats: bool,
                  options: FusedOptions) -> torch.Tensor | NormInput:
    """Token-major attention output [B, HW, C] → x + proj_out(out): the projection without bias,
    then the bias and the residual in one pass; the result has x's layout."""
    b, c, hgt, wid = x.shape
    proj = _rows(block.proj_out, out, with_bias=False).view(b, hgt, wid, c).permute(0, 3, 1, 2)
    return bias_residual(proj, x, block.proj_out.bias, stats=stats, options=options)


def _attend_varlen(block: AttentionBlock, qkv: torch.Tensor, packed: torch.Tensor,
                   context_bias: VarlenContext | None, cudnn: bool = False) -> torch.Tensor:
    """Attention over [image keys | context keys] by flash attention's variable-length form:
    `cpp_ext` packs each sample's image keys/values and its context's with the kept tokens first,
    and `seqused_k` (image positions + kept tokens) leaves the padding out, so no additive mask is
    read. The same function as SDPA with the mask (keys are unordered). With `cudnn`, cuDNN's
    attention runs over the same pack where this torch's op takes per-sample key counts
    (`_attend_cudnn`), else flash's.

    :param qkv: [B, HW, 3C] projection output (per head [q|k|v]).
    :param packed: [B, 2, heads, N, ch] context keys (index 0) and values (1).
    :return: [B, HW, C] token-major.
    """
    b, hw, c3 = qkv.shape
    n = packed.shape[3]
    if context_bias is None:
        keep = torch.ones(b, n, dtype=torch.bool, device=qkv.device)
        cu_q, cu_k = _offsets(b, hw, hw + n, qkv.device)
    else:
        keep, (cu_q, cu_k) = context_bias.keep(), context_bias.offsets(hw)
    rows = qkv.reshape(b * hw, c3)
    kv, used = cpp_ext.kernels.pack_attention_kv(rows, packed, keep)  # [B, HW + N, heads, 2, ch]
    attend = _attend_cudnn if cudnn and CUDNN_VARLEN else _attend_flash
    return attend(block, rows, kv, used, (cu_q, cu_k)).view(b, hw, c3 // 3)


def _pack_operands(block: AttentionBlock, rows: torch.Tensor,
                   kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """The variable-length ops' operands from the projection rows [B·HW, heads·3·ch] and the pack
    [B, HW + N, heads, 2, ch]: queries [B·HW, heads, ch], keys and values [B·(HW + N), heads, ch]
    (views), and the longest query and key runs HW and HW + N."""
    b, n = kv.shape[0], kv.shape[1]
    hw, ch = rows.shape[0] // b, kv.shape[-1]
    q = rows.view(b * hw, block.heads, 3, ch)[:, :, 0]
    return q, kv[:, :, :, 0].flatten(0, 1), kv[:, :, :, 1].flatten(0, 1), hw, n


def _attend_flash(block: AttentionBlock, rows: torch.Tensor, kv: torch.Tensor, used: torch.Tensor,
                  offsets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`_attend_varlen`'s attention over the pack: flash attention's variable-length op with the
    offsets and the per-sample key counts `used`. Token-major: [B·HW, heads, ch]."""
    q, k, v, hw, n = _pack_operands(block, rows, kv)
    return torch.ops.aten._flash_attention_forward(q, k, v, *offsets, hw, n, 0.0, False, False, seqused_k=used)[0]


def _attend_cudnn(block: AttentionBlock, rows: torch.Tensor, kv: torch.Tensor, used: torch.Tensor,
                  offsets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`_attend_flash` on cuDNN's kernel: its op with the same offsets and per-sample key counts
    (`CUDNN_VARLEN`: only a torch whose op takes `seqused_k`). Token-major: [B·HW, heads, ch]."""
    q, k, v, hw, n = _pack_operands(block, rows, kv)
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, *offsets, hw, n, False, seqused_k=used)[0]


def _takes_key_counts(op: str) -> bool:
    """Whether this torch's attention op `torch.ops.aten.<op>` takes per-sample key counts
    (`seqused_k`): its variable-length form leaves each sample's padding out."""
    try:
        return "seqused_k" in str(getattr(torch.ops.aten, op).default._schema)
    except (AttributeError, RuntimeError):
        return False


FLASH_VARLEN = _takes_key_counts("_flash_attention_forward")
CUDNN_VARLEN = _takes_key_counts("_cudnn_attention_forward")


@functools.cache
def _flash_capable(device: torch.device) -> bool:
    """Flash attention runs on compute capability 8.0 and newer."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _flash_varlen_serves(qkv: torch.Tensor, head_channels: int) -> bool:
    """Whether `_attend_varlen` runs these inputs: CUDA fp16/bf16 on sm80+, a head size of a
    multiple of 8 up to 256."""
    return (FLASH_VARLEN and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16)
            and head_channels % 8 == 0 and head_channels <= 256 and _flash_capable(qkv.device))


def _offsets(batch: int, queries: int, keys: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention's cumulative query and key offsets of `batch` equal-length samples (int32)."""
    steps = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return steps * queries, steps * keys
