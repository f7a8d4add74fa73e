"""The decoder attention's ways over the packed keys (`models.fused.unet_blocks._attend_varlen`):
flash attention's variable-length form and cuDNN's op with the same key counts, against SDPA over
the unpacked keys with the additive mask — with and without a context mask. The pack is
`tests.kernel_emulation`'s stand-in for the kernel (which test_fused_unet.py checks against the
same layout), so the test runs on a CUDA GPU without the built extension."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models.fused import unet_blocks
from models.fused.unet_blocks import VarlenContext, _attend_varlen
from tests import kernel_emulation
from tests.gpu.common import rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("way", ["flash", "cudnn"])
def test_every_way_over_the_pack_is_sdpa_over_the_keys(way, masked, monkeypatch):
    """Each way in fp16 on the GPU, within 5e-3 of float32 SDPA over [context | image] keys with
    the additive mask: batch 3 at 8×8 with 4 heads of 64 and 81 context tokens, with a mask that is
    not a prefix and samples keeping every token and none — or without a mask, where the key
    offsets must still step by HW + N a sample."""
    if not unet_blocks.FLASH_VARLEN:
        pytest.skip("this torch has no flash attention varlen form with seqused_k")
    if way == "cudnn" and not unet_blocks.CUDNN_VARLEN:
        pytest.skip("this torch's cuDNN attention op takes no per-sample key counts")
    monkeypatch.setattr(cpp_ext, "kernels", kernel_emulation)
    b, hw, heads, ch, n = 3, 64, 4, 64, 81
    g = torch.Generator(device="cuda").manual_seed(7)
    qkv = torch.randn(b, hw, heads * 3 * ch, generator=g, device="cuda").half()
    packed = torch.randn(b, 2, heads, n, ch, generator=g, device="cuda").half()
    keep = torch.rand(b, n, generator=g, device="cuda") < 0.5
    keep[0], keep[2] = True, False
    if not masked:
        keep[:] = True
    bias = torch.zeros(b, n, device="cuda").masked_fill(~keep, float("-inf"))
    got = _attend_varlen(SimpleNamespace(heads=heads), qkv, packed, VarlenContext(bias) if masked else None,
                         cudnn=way != "flash")

    per_head = qkv.view(b, hw, heads, 3, ch).permute(0, 2, 1, 3, 4).float()  # [B, heads, HW, 3, ch]
    keys = torch.cat([packed[:, 0].float(), per_head[..., 1, :]], dim=2)
    values = torch.cat([packed[:, 1].float(), per_head[..., 2, :]], dim=2)
    mask = F.pad(bias, (0, hw))[:, None, None, :] if masked else None
    want = F.scaled_dot_product_attention(per_head[..., 0, :], keys, values, attn_mask=mask)
    want = want.transpose(1, 2).reshape(b, hw, heads * ch)
    assert got.shape == want.shape and got.dtype == torch.float16
    assert rel(got.float(), want) <= 5e-3, rel(got.float(), want)
