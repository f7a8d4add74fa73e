"""The UNet's forward (`UNet.forward`) on `cpp_ext`'s kernels.

It walks the reference module's blocks with the fused blocks of `unet_blocks`, handing each
block's result on in the form the next one reads fastest: input blocks' results with their norm
statistics (`NormInput`), output blocks' results as the next concatenation (`DeferredBias`,
`SkipConcat`). Around the blocks: the time embedding looked up in a table of every training
timestep's (`time_table`), every ResBlock's time-embedding projection from one GEMM
(`embedding_projections`; or a sampling loop's, every step's at once: `loop_projections`) and the
first convolution's bias inside its GEMM (`input_conv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fused.availability import fused_kernels_available, layout
from models.fused.derived import derived, structural
from models.fused.norms import NormInput, group_norm, plain
from models.fused.options import DEFAULT, FusedOptions
from models.fused.unet_blocks import (
    DeferredBias,
    EmbeddingProjections,
    SkipConcat,
    VarlenContext,
    attention_block,
    res_block,
)
from models.unet import AttentionBlock, ResBlock, TimestepSequential, UNet


def unet_forward(
    unet: UNet, x: torch.Tensor, timesteps: torch.Tensor, emb_add: torch.Tensor | None = None,
    context: torch.Tensor | None = None, context_bias: torch.Tensor | None = None,
    context_kv: torch.Tensor | None = None, options: FusedOptions = DEFAULT,
    projections: EmbeddingProjections | None = None,
) -> torch.Tensor:
    """`unet(x, timesteps, emb_add, context, context_bias, context_kv)`: on the kernels where they
    serve `x` (FP8 layers included: the blocks run their products), else the reference forward.
    `projections`: this forward's ResBlock projections of its time embedding, already made (one
    step of `loop_projections`); the fused path then reads them instead of `timesteps` and `emb_add`."""
    if not fused_kernels_available(x, unet.time_embed[0].weight):
        return unet(x, timesteps, emb_add, context, context_bias, context_kv)
    emb = projections if projections is not None else _projected_embedding(unet, timesteps, emb_add, options)
    bias = VarlenContext(context_bias) if context_bias is not None else None
    hs = []
    first = input_conv(unet, x, options)
    h: torch.Tensor | NormInput | DeferredBias = x
    # every input block's result goes to a block that starts with a norm, the middle block's and
    # the output blocks' (but the last) to a concatenation, the last output block's to the out norm
    for i, block in enumerate(unet.input_blocks):
        if i == 0 and first is not None:
            h = first
        else:
            h = _blocks(block, h, emb, context, bias, context_kv, options, stats=True)
        hs.append(plain(h))
    h = _blocks(unet.middle_block, h, emb, context, bias, context_kv, options)
    last = len(unet.output_blocks) - 1
    for i, block in enumerate(unet.output_blocks):
        skip = hs.pop()
        x_in = h.concat(skip) if isinstance(h, DeferredBias) else SkipConcat(plain(h), skip)
        h = _blocks(block, x_in, emb, context, bias, context_kv, options, defer_bias=i < last, stats=i == last)
    norm, _, conv = unet.out
    return conv(group_norm(norm, h))


def _blocks(seq: TimestepSequential, x, emb, context, context_bias, context_kv, options: FusedOptions,
            defer_bias: bool = False, stats: bool = False):
    """`seq`'s layers in turn. `defer_bias`: the result goes on as the next output block's
    concatenation (`DeferredBias`); `stats`: a group norm reads it next (`NormInput`). Inside, a
    layer followed by a ResBlock or an attention block (both start with a norm) may hand on its
    statistics."""
    last = len(seq) - 1
    for i, layer in enumerate(seq):
        norm_next = stats if i == last else isinstance(seq[i + 1], ResBlock | AttentionBlock)
        if isinstance(x, SkipConcat) and not isinstance(layer, ResBlock):
            x = x.tensor()
        if isinstance(layer, ResBlock):
            # only the last layer's result leaves the block
            x = res_block(layer, x, emb, options, defer_bias and i == last, norm_next)
        elif isinstance(layer, AttentionBlock):
            x = attention_block(layer, x, context, context_bias, context_kv, options, norm_next)
        else:
            x = layer(plain(x))
    return x


def input_conv(unet: UNet, x: torch.Tensor, options: FusedOptions = DEFAULT) -> torch.Tensor | None:
    """The first input block's convolution with its bias inside cuDNN's GEMM: x gets one more input
    channel of ones and the weight one more input channel holding the bias at its centre tap (which
    never reads the zero padding), so the bias joins the float32 accumulation instead of a pass of
    its own (torch adds a convolution's bias separately; in channels-last memory a broadcast that
    costs more than the convolution). The input is widened further, with zero channels, to a
    multiple of 8: cuDNN's kernels for 8 channels beat those for 7 (Karlo's super-res input, 6 + 1).
    For channels-last maps (`options.input_bias_in_conv`); the widened weight is made on first use
    and again whenever the convolution's weight or bias changes, never during a graph capture (None
    then, as in the other cases: the caller runs the block as it is)."""
    conv = unet.input_blocks[0][0]
    if not (options.input_bias_in_conv and isinstance(conv, nn.Conv2d) and conv.bias is not None
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and layout(x) == "nhwc"):
        return None

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        extra = (-(conv.in_channels + 1)) % 8 + 1  # the ones channel, then zeros
        taps = conv.weight.new_zeros(conv.weight.shape[0], extra, 3, 3)
        taps[:, 0, 1, 1] = conv.bias
        weight = torch.cat([conv.weight, taps], dim=1).contiguous(memory_format=torch.channels_last)
        fill = torch.zeros(extra, dtype=x.dtype, device=x.device)
        fill[0] = 1.0
        return weight, fill

    widened_weight = derived(unet, "input_conv").get((conv.weight, conv.bias), (x.dtype,), build)
    if widened_weight is None:
        return None
    weight, fill = widened_weight
    b, c, height, width = x.shape
    widened = torch.empty((b, weight.shape[1], height, width), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    widened[:, :c].copy_(x)
    widened[:, c:].copy_(fill.view(1, -1, 1, 1).expand(b, -1, height, width))
    return F.conv2d(widened, weight, None, padding=1)


def _silu_embedding(unet: UNet, timesteps: torch.Tensor, emb_add: torch.Tensor | None,
                    options: FusedOptions) -> torch.Tensor:
    """SiLU(time embedding + emb_add), the input of every ResBlock's projection (their emb_layers
    start with SiLU: applied once here); the embedding from `time_table` where it serves."""
    table = time_table(unet) if options.unet_time_table and not timesteps.is_floating_point() else None
    if table is None:
        emb = unet.time_embedding(timesteps)
    else:
        emb = table.index_select(0, timesteps.clamp(0, table.shape[0] - 1))
    return F.silu(emb + emb_add if emb_add is not None else emb)


def _projected_embedding(unet: UNet, timesteps: torch.Tensor, emb_add: torch.Tensor | None,
                         options: FusedOptions) -> torch.Tensor | EmbeddingProjections:
    """One forward's ResBlock projections (`embedding_projections`), or its SiLU'd embedding where
    the stacked weights are not at hand (each block then projects its own)."""
    emb = _silu_embedding(unet, timesteps, emb_add, options)
    return embedding_projections(unet, emb) or emb


def loop_projections(unet: UNet, timesteps: torch.Tensor, batch: int, emb_add: torch.Tensor | None = None,
                     options: FusedOptions = DEFAULT) -> list[EmbeddingProjections] | None:
    """Every step's ResBlock projections of a sampling loop from one GEMM: step i's are
    `unet_forward(..., timesteps[i].expand(batch), emb_add, ...)`'s, for `unet_forward(...,
    projections=result[i])`. A forward's projections depend only on its timestep and `emb_add`,
    which a loop knows before it starts, and their stacked weights (the decoder's: 150 MB) are
    read once for the loop instead of once per step. None where the fused path would not serve
    the loop's forwards (or `options.loop_projections` is off, or the timesteps are fractional):
    the steps then make their own.

    :param timesteps: [n] the loop's timesteps (integer), in step order.
    :param batch: rows per forward.
    :param emb_add: [batch, time_embed_dim] added to every step's time embedding (the decoder's
        image conditioning), or None.
    """
    weight = unet.time_embed[0].weight
    if not (options.loop_projections and not timesteps.is_floating_point() and timesteps.dim() == 1
            and fused_kernels_available(weight, weight)):
        return None
    n = timesteps.shape[0]
    emb = _silu_embedding(unet, timesteps.repeat_interleave(batch), None if emb_add is None else emb_add.repeat(n, 1),
                          options)
    stacked = embedding_projections(unet, emb)
    if stacked is None:
        return None
    out = stacked.out.view(n, batch, -1)
    return [EmbeddingProjections(out[i], stacked.spans) for i in range(n)]


def time_table(unet: UNet) -> torch.Tensor | None:
    """[T, time_embed_dim]: `unet.time_embedding(t)` for every training timestep t of the UNet's
    diffusion, so that a step looks its embedding up (two small launches) instead of running the
    sinusoid and the time MLP (about ten). Rows computed together round as the MLP's GEMM rounds at
    that size, not necessarily as a step's few rows would (within fp16 rounding). Built on first use
    and again whenever the time MLP's weights change; None while a CUDA graph is being captured
    without a current table (the caller computes the embedding instead): a graph captured with the
    table keeps reading it, so capture again after changing those weights, as for any captured step."""
    params = tuple(unet.time_embed.parameters())

    def build() -> torch.Tensor:
        t = torch.arange(unet.cfg.diffusion.num_train_timesteps, device=params[0].device)
        return unet.time_embedding(t)

    return derived(unet, "time_table").get(params, tuple((p.dtype, p.device) for p in params), build)


def emb_linears(unet: UNet) -> list[nn.Linear]:
    """Every ResBlock's time-embedding projection, in forward order."""
    return structural(unet, "emb_linears", lambda: [m.emb_layers[1] for m in unet.modules() if isinstance(m, ResBlock)])


def embedding_projections(unet: UNet, emb: torch.Tensor) -> EmbeddingProjections | None:
    """Every ResBlock's `emb_layers[1](emb)` from one GEMM over their weights stacked, instead of one
    small GEMM per block (each bound by reading its weights). The stacked copy (the decoder's: 128 MB
    in fp16) is made on first use and again whenever a block's weights change (new tensors, or
    written in place); never during graph capture (its kernels would not run), where this returns
    None."""
    linears = emb_linears(unet)

    def build() -> tuple[torch.Tensor, torch.Tensor, dict[int, tuple[int, int]]]:
        spans, start = {}, 0
        for lin in linears:
            spans[id(lin)] = (start, start + lin.out_features)
            start += lin.out_features
        weight = torch.cat([lin.weight.detach() for lin in linears]).to(emb.dtype)
        bias = torch.cat([lin.bias.detach() for lin in linears]).to(emb.dtype)
        return weight, bias, spans

    if not linears:
        return None
    tensors = [t for lin in linears for t in (lin.weight, lin.bias)]
    stacked = derived(unet, "embedding_projections").get(tensors, (emb.dtype, emb.device), build)
    if stacked is None:
        return None
    weight, bias, spans = stacked
    return EmbeddingProjections(F.linear(emb, weight, bias), spans)
