"""`models.fused.keys_around` on the CPU, with flash attention's variable-length op emulated by
per-run SDPA (`tests/test_fused_path.py`'s reference): for any one or two samples, image size,
context length and mask (none kept, all kept, any in between), each sample's queries attend over
exactly its image keys and its kept context keys, and the runs' offsets stay inside the buffer."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.fused import keys_around
from tests.test_fused_path import _varlen_reference


@st.composite
def layouts(draw):
    batch = draw(st.sampled_from([1, 2]))
    hw = draw(st.integers(1, 12))
    n = draw(st.integers(1, 10))
    keep = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=batch,
                                      max_size=batch)))
    heads = draw(st.integers(1, 3))
    return batch, hw, n, keep, heads, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_each_sample_attends_over_its_image_keys_and_its_kept_context(layout):
    batch, hw, n, keep, heads, seed = layout
    ch = 8
    g = torch.Generator().manual_seed(seed)
    # one head more than the block's: the layout takes the block's own (`kv_heads`)
    context_kv = torch.randn(batch, 2, heads + 1, n, ch, generator=g, dtype=torch.float64)
    block = SimpleNamespace(heads=heads, kv_heads=slice(1, heads + 1))
    bias = torch.where(keep, 0.0, float("-inf"))
    around = keys_around.KeysAround(block, context_kv, keys_around.kept_tokens(bias, batch, n, bias.device), hw,
                                    torch.float64)
    rows = torch.randn(batch * hw, heads, 3, ch, generator=g, dtype=torch.float64)
    around.image_rows().copy_(rows.flatten(1))
    cu_k = around.cu_k.tolist()
    assert 0 <= cu_k[0] and cu_k[-1] <= around.buffer.shape[0] and cu_k == sorted(cu_k)
    got = around.attend(_varlen_reference)
    for b in range(batch):
        mine = rows[b * hw:(b + 1) * hw]
        kept = context_kv[b, :, 1:, keep[b]]  # [2, heads, kept, ch]
        k = torch.cat([mine[:, :, 1].transpose(0, 1), kept[0]], dim=1)
        v = torch.cat([mine[:, :, 2].transpose(0, 1), kept[1]], dim=1)
        want = F.scaled_dot_product_attention(mine[:, :, 0].transpose(0, 1), k, v).transpose(0, 1)
        assert torch.allclose(got[b * hw:(b + 1) * hw], want, rtol=1e-10, atol=1e-12)
