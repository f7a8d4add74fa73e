"""`cpp_ext.kernels` in torch ops, for running the fused path's orchestration on the CPU.

Each function has its kernel's signature and computes what the kernel's binding documents, in
float32, so that the fused path (`models.fused`) with these in place of the kernels must give the
reference modules' outputs: a wrong bias, a lost residual, a skipped norm or statistics attached
to the wrong tensor shows up as a mismatch or an error. The statistics a join hands to the next
norm (`partial`) are the groups' float32 mean and variance here, and `group_norm` checks them
against its input: the real kernels' format is theirs. Counts of each call are kept in `calls`.
"""

from __future__ import annotations

import collections
import math

import torch
import torch.nn.functional as F

calls: collections.Counter[str] = collections.Counter()


def _count(name: str) -> None:
    calls[name] += 1


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`y` in x's memory layout (channels-last in, channels-last out)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y.contiguous()


def _per_channel(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v.float().view(1, -1, *([1] * (dims - 2)))


def _per_sample(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v.float().reshape(v.shape[0], v.shape[1], *([1] * (dims - 2)))


def _group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B·groups, 2]: each group's float32 mean and (biased) variance."""
    g = x.float().reshape(x.shape[0], groups, -1)
    return torch.stack([g.mean(-1), g.var(-1, unbiased=False)], dim=-1).reshape(-1, 2)


def group_norm(x, groups, weight, bias, scale=None, shift=None, add=None, eps=1e-5, silu=False, add_bias=None,
               one_pass_mode=-1, up=False, down=False, partial=None):
    _count("group_norm")
    v = x.float()
    if add is not None:
        v = v + _per_sample(add, x.dim())
    if add_bias is not None:
        v = v + _per_channel(add_bias, x.dim())
    if partial is not None:
        if add is not None or add_bias is not None:
            raise RuntimeError("group_norm: partial statistics with add or add_bias")
        if not torch.allclose(partial, _group_stats(x, groups), rtol=1e-4, atol=1e-5):
            raise RuntimeError("group_norm: the partial statistics are not this input's")
        _count("group_norm_partial")
    y = F.group_norm(v, groups, weight.float(), bias.float(), eps)
    if scale is not None:
        y = y * (1 + _per_sample(scale, x.dim())) + _per_sample(shift, x.dim())
    if silu:
        y = F.silu(y)
    if up:
        y = F.interpolate(y, scale_factor=2, mode="nearest")
    if down:
        y = F.avg_pool2d(y, 2)
    return _like(y.to(x.dtype), x)


def group_norm_takes_three_passes(channels, groups, hw):
    """The emulation's rule: maps of at least 8×8 with two or more channels a group."""
    return channels // groups >= 2 and hw >= 64


def group_norm_phased_serves(product, groups):
    """The emulation's rule: a channels-last folded product whose K channels are a multiple of 8,
    in maps the emulated norm runs in three passes."""
    k = product.shape[1] // 4
    return (product.dim() == 4 and product.shape[1] % 4 == 0 and k % 8 == 0 and k % groups == 0
            and product.is_contiguous(memory_format=torch.channels_last) and not product.is_contiguous()
            and group_norm_takes_three_passes(k, groups, 4 * (product.shape[2] - 1) * (product.shape[3] - 1)))


def group_norm_phased(product, groups, weight, bias, scale=None, shift=None, add=None, eps=1e-5, silu=False,
                      add_bias=None):
    """`group_norm` of the upsampled map the folded product stands for: phase (a, b)'s channels at
    pixel (i + a, j + b) are the map's pixel (2i + a, 2j + b) — gathered here phase by phase."""
    _count("group_norm_phased")
    if not group_norm_phased_serves(product, groups):
        raise RuntimeError("group_norm_phased: a product the kernel does not take")
    b, k4, h1, w1 = product.shape
    k, h, w = k4 // 4, h1 - 1, w1 - 1
    x = product.new_empty((b, k, 2 * h, 2 * w))
    for phase, (ra, cb) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        x[:, :, ra::2, cb::2] = product[:, phase * k:(phase + 1) * k, ra:ra + h, cb:cb + w]
    calls["group_norm"] -= 1  # counted as the phased call only
    return group_norm(x.contiguous(memory_format=torch.channels_last), groups, weight, bias, scale, shift, add,
                      eps, silu, add_bias)


def group_norm_concat(first, second, groups, weight, bias, eps=1e-5, silu=False, first_bias=None, first_bias2=None):
    _count("group_norm_concat")
    h = first.float()
    if first_bias is not None:
        total = first_bias.float() + (first_bias2.float() if first_bias2 is not None else 0.0)
        h = h + _per_channel(total, first.dim())
    cat = torch.cat([h.to(first.dtype), second], dim=1).contiguous(memory_format=torch.channels_last)
    return group_norm(cat, groups, weight, bias, eps=eps, silu=silu), cat


def _joined(h, skip, bias, bias2):
    s = skip.float()
    if s.shape[2] * 2 == h.shape[2]:
        s = F.interpolate(s, scale_factor=2, mode="nearest")
    elif s.shape[2] == h.shape[2] * 2:
        s = F.avg_pool2d(s, 2)
    out = h.float() + s + _per_channel(bias, h.dim())
    if bias2 is not None:
        out = out + _per_channel(bias2, h.dim())
    return out.to(h.dtype)


def bias_residual_(h, skip, bias, bias2=None):
    _count("bias_residual_")
    h.copy_(_joined(h, skip, bias, bias2))
    return h


def bias_residual_stats(h, skip, bias, bias2=None, groups=32):
    _count("bias_residual_stats")
    out = _like(_joined(h, skip, bias, bias2), h)
    return out, _group_stats(out, groups)


def residual_layer_norm(x, pending, weight, beta, eps=1e-5):
    _count("residual_layer_norm")
    if pending is not None:
        x.copy_((x.float() + pending.float()).to(x.dtype))
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), beta.float(), eps).to(x.dtype)


def _activate(y, activation):
    return F.gelu(y) if activation == 1 else F.silu(y) if activation == 2 else y


def skinny_linear(x, weight, bias=None, activation=0, out=None, warps=8, block_features=16):
    _count("skinny_linear")
    y = _activate(F.linear(x.float(), weight.float(), None if bias is None else bias.float()), activation)
    if out is not None:
        out.copy_((out.float() + y).to(out.dtype))
        return out
    return y.to(x.dtype)


def skinny_linear_staged(x, weight, bias=None, activation=0, out=None, block_features=16, stages=4):
    _count("skinny_linear_staged")
    return skinny_linear(x, weight, bias, activation, out)


def prior_step_attention(qkv, past, keep, heads):
    """Step tokens [B·T, heads·3·ch] (per head [q|k|v]) over [cached keys P | their own T keys],
    causal among themselves; cached key j is masked where j < keep's length and keep[b, j] is False."""
    _count("prior_step_attention")
    b, p, ch = past.shape[0], past.shape[3], past.shape[4]
    t = qkv.shape[0] // b
    q, k, v = qkv.float().view(b, t, heads, 3, ch).permute(3, 0, 2, 1, 4)  # each [B, heads, T, ch]
    keys = torch.cat([past[:, 0].float(), k], dim=2)
    values = torch.cat([past[:, 1].float(), v], dim=2)
    bias = torch.zeros(b, t, p + t)
    cached_keep = torch.ones(b, p, dtype=torch.bool)
    cached_keep[:, :keep.shape[1]] = keep
    bias[:, :, :p] = torch.where(cached_keep, 0.0, -math.inf)[:, None, :]
    bias[:, :, p:] = torch.full((t, t), -math.inf).triu(1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(ch) + bias[:, None]
    out = scores.softmax(-1) @ values  # [B, heads, T, ch]
    return out.permute(0, 2, 1, 3).reshape(b * t, heads * ch).to(qkv.dtype)


def pack_attention_kv(rows, packed, keep):
    """Per sample [image keys/values (from the projection rows [B·HW, heads·3·ch]) | the kept
    context tokens, in order | the dropped ones] as [B, HW + N, heads, 2, ch], and the used-key
    counts HW + kept (int32)."""
    _count("pack_attention_kv")
    b, heads, ch = packed.shape[0], packed.shape[2], packed.shape[4]
    hw = rows.shape[0] // b
    image = rows.view(b, hw, heads, 3, ch)[:, :, :, 1:]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept first, in order
    context = packed.permute(0, 3, 2, 1, 4)  # [B, N, heads, 2, ch]
    context = torch.gather(context, 1, order[:, :, None, None, None].expand(-1, -1, heads, 2, ch))
    return torch.cat([image, context], dim=1).contiguous(), (hw + keep.sum(1)).to(torch.int32)
