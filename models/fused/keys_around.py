"""A guided pair's attention keys without a pack: each sample's context keys laid out beside its
image keys in the QKV projection's own output buffer, once per sampling loop.

Flash attention's variable-length form reads each sample's keys as one run of rows from offset
`cu_k[b]` to `cu_k[b + 1]`, and its queries from `cu_q[b]` on, in any buffer with any row stride.
For one or two samples the runs can hold the context keys without a copy per step: the buffer is

    rows [0, N)                  sample 0's context keys, the kept ones last
    rows [N, N + HW)             sample 0's image rows (queries, keys, values)
    rows [N + HW, N + 2 HW)      sample 1's image rows
    rows [N + 2 HW, 2 N + 2 HW)  sample 1's context keys, the kept ones first

so sample 0's keys are rows [N − kept₀, N + HW) and sample 1's [N + HW, N + 2 HW + kept₁): two
adjacent runs with no dropped token inside, and the queries one run [N, N + 2 HW). The context
rows hold the loop's cached keys and values (`UNet.context_kv`), the same at every step, so they
are written when the first step of a loop meets its cache (`KeysAround`, kept while that cache
lives), and each step's QKV projection writes its rows straight into the middle of the buffer:
`cpp_ext.kernels.pack_attention_kv`'s copy of every step goes. Keys have no order in attention,
so the result is the pack's (`models.fused.unet_blocks._attend_varlen`), bit for bit where the
kernels reduce in the same order. Three or more samples would need gaps between the query runs;
they keep the pack.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from models.unet import AttentionBlock


class KeptTokens(NamedTuple):
    """What a context mask says of each sample's tokens, the same for every attention block of a
    forward: the kept tokens per sample [B] (int32), and each sample's token order with its kept
    tokens where its layout wants them (sample 0's last, sample 1's first)."""

    kept: torch.Tensor
    orders: tuple[torch.Tensor, ...]


def kept_tokens(context_bias: torch.Tensor | None, batch: int, n: int, device: torch.device) -> KeptTokens:
    """`KeptTokens` of [B, N] `context_bias` (0 for a kept context token, −inf for padding; None:
    all kept)."""
    keep = context_bias == 0 if context_bias is not None else torch.ones(batch, n, dtype=torch.bool, device=device)
    # sample 0's kept tokens last (ascending key: padding 0, kept 1), sample 1's first
    orders = [torch.argsort(keep[0].to(torch.int8), stable=True)]
    if batch == 2:
        orders.append(torch.argsort((~keep[1]).to(torch.int8), stable=True))
    return KeptTokens(keep.sum(1, dtype=torch.int32), tuple(orders))


class _Entry(NamedTuple):
    """The layouts made for one context cache: the cache (weakly), its and its bias's versions when
    made, the bias (weakly), its `KeptTokens`, and each attention block's `KeysAround` by the
    block's id."""

    cache: weakref.ref
    version: tuple[int, int]
    bias: weakref.ref | None
    tokens: KeptTokens
    layouts: dict[int, KeysAround]


# by the context cache's id: a tensor's == is elementwise, so it cannot key a weak dictionary; an
# entry leaves with its cache (weakref.finalize), and one whose cache is gone is never read
_LAYOUTS: dict[int, _Entry] = {}


class KeysAround:
    """One attention block's buffer [2N + 2HW (one sample: N + HW), heads, 3, ch] around its image
    rows, with the context rows written and the offsets of its runs.

    :param context_kv: the UNet's cached context keys/values [B, 2, all heads, N, ch].
    :param tokens: the context mask's `KeptTokens` (`kept_tokens`).
    """

    def __init__(self, block: AttentionBlock, context_kv: torch.Tensor, tokens: KeptTokens, hw: int,
                 dtype: torch.dtype) -> None:
        b, _, _, n, ch = context_kv.shape
        self.samples, self.n, self.hw = b, n, hw
        kv = context_kv[:, :, block.kv_heads].to(dtype)  # [B, 2, heads, N, ch]
        rows = b * (n + hw)
        self.buffer = torch.empty(rows, block.heads, 3, ch, dtype=dtype, device=context_kv.device)
        kept = tokens.kept
        self.buffer[:n, :, 1:] = kv[0][:, :, tokens.orders[0]].permute(2, 1, 0, 3)
        ends = [n - kept[0], torch.full_like(kept[0], n + hw)]
        if b == 2:
            self.buffer[n + 2 * hw:, :, 1:] = kv[1][:, :, tokens.orders[1]].permute(2, 1, 0, 3)
            ends.append(n + 2 * hw + kept[1])
        self.cu_k = torch.stack(ends).to(torch.int32)
        self.cu_q = torch.arange(b + 1, dtype=torch.int32, device=context_kv.device) * hw

    def image_rows(self) -> torch.Tensor:
        """The samples' image rows [B·HW, 3C], where the QKV projection writes (a view)."""
        flat = self.buffer.view(self.buffer.shape[0], -1)
        return flat[self.n:self.n + self.samples * self.hw]

    def attend(self, op: VarlenOp | None = None) -> torch.Tensor:
        """Flash attention's variable-length op (or `op`, called the same way) over the runs, once
        the image rows hold this step's projection: [B·HW, heads, ch], token-major."""
        q = self.image_rows().view(self.samples * self.hw, *self.buffer.shape[1:])[:, :, 0]
        k, v = self.buffer[:, :, 1], self.buffer[:, :, 2]
        return (op or varlen_attention)(q, k, v, self.cu_q, self.cu_k, self.hw, self.hw + self.n)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int) -> torch.Tensor:
    """Flash attention's variable-length op: sample b's queries q[cu_q[b]:cu_q[b + 1]] attend over
    k, v[cu_k[b]:cu_k[b + 1]] (rows of any stride); [total queries, heads, ch]."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False)[0]


# (q, k, v, cu_q, cu_k, max_q, max_k) → [total queries, heads, ch]: `varlen_attention`'s signature
VarlenOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def serves(block: AttentionBlock, batch: int, context_kv: torch.Tensor | None) -> bool:
    """Whether the layout takes this block's attention: one or two samples, the block's context
    keys cached, its QKV projection a plain (not FP8) 1-wide convolution."""
    return (context_kv is not None and batch in (1, 2) and block.encoder_kv is not None
            and isinstance(block.qkv, nn.Conv1d) and context_kv.shape[0] == batch)


def keys_around(block: AttentionBlock, context_kv: torch.Tensor, context_bias: torch.Tensor | None, hw: int,
                dtype: torch.dtype) -> KeysAround:
    """The block's `KeysAround` for this context cache [B, 2, all heads, N, ch] and its bias (as
    `kept_tokens` takes it): made when the first forward of a loop meets the cache (again where the
    cache has changed in place since, or comes with another bias), then kept while the cache
    lives; the steps after the first launch nothing for it, and the mask is read once for all
    blocks."""
    entry = _LAYOUTS.get(id(context_kv))
    bias_version = context_bias._version if context_bias is not None else 0
    if (entry is None or entry.cache() is not context_kv or entry.version != (context_kv._version, bias_version)
            or (entry.bias() if entry.bias is not None else None) is not context_bias):
        if entry is None or entry.cache() is not context_kv:
            weakref.finalize(context_kv, _LAYOUTS.pop, id(context_kv), None)
        b, _, _, n, _ = context_kv.shape
        entry = _Entry(weakref.ref(context_kv), (context_kv._version, bias_version),
                       weakref.ref(context_bias) if context_bias is not None else None,
                       kept_tokens(context_bias, b, n, context_kv.device), {})
        _LAYOUTS[id(context_kv)] = entry
    layouts = entry.layouts
    layout = layouts.get(id(block))
    if layout is None or layout.hw != hw or layout.buffer.dtype != dtype:
        layout = layouts[id(block)] = KeysAround(block, context_kv, entry.tokens, hw, dtype)
    return layout
