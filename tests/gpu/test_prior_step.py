"""The fused prior step (`models.fused.prior_step`) on the GPU against the reference step in fp16
and fp32, under each linear-layer plan; its time table and graph capture; the step attention
(`cpp_ext/prior_step.cu`) and layer norm (`cpp_ext/layer_norm.cu`) kernels against float64 and
torch. Skipped without a CUDA GPU and a built `cpp_ext`."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models import fused
from models.fused import FusedOptions, linear_plan
from models.fused.derived import derived
from models.fused.prior_step import time_table
from tests.gpu.common import needs_kernel, rel

pytestmark = pytest.mark.gpu


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize(
    "batch,variant", [(1, "all"), (2, "all"), (2, "narrow"), (2, "wide_blocks"), (8, "wide_blocks"), (22, "all"),
                      (2, "no_table"), (8, "all"), (2, "sixteen"), (4, "all"), (2, "register"), (4, "register")]
)
def test_fused_prior_step_matches_the_torch_step(ours, batch, variant, monkeypatch):
    """The fused step with cpp_ext's attention over the cache (masks built in) gives what the
    reference `Prior.step`'s torch ops give, in fp16 against the fp32 step, with captions of
    different lengths; batch 22 (66 rows) runs cuBLAS's GEMMs, the others `skinny_linear` —
    "narrow" only for the layers of the model's width (the MLP's output projection on cuBLAS),
    "wide_blocks" at 6 and 24 rows with 32-feature blocks wherever the layer's features allow (the
    rest on cuBLAS), "sixteen" with 16-feature blocks where the model's rule picks 8 (every layer
    of the tiny model). The time token comes from the time table ("no_table": computed per step).
    On Hopper the layers `linear_plan.staged_plan` picks stream their weights through shared
    memory ("register": `skinny_linear` only)."""
    options = FusedOptions(time_table=variant != "no_table", staged_weights=variant != "register")
    real = linear_plan.skinny_block
    if variant == "narrow":
        width = ours.cfg.prior.width
        monkeypatch.setattr(linear_plan, "skinny_block", lambda rows, w, f: real(rows, w, f) if w <= width else None)
    if variant == "sixteen":
        monkeypatch.setattr(linear_plan, "skinny_block", lambda rows, w, f: None if real(rows, w, f) is None else 16)
    if variant == "wide_blocks":
        monkeypatch.setattr(linear_plan, "skinny_block", lambda rows, w, f: 32 if (f % 32, w % 32) == (0, 0) else None)

    model = copy.deepcopy(ours.prior).cuda()
    half = copy.deepcopy(model).half()
    cfg = ours.cfg
    g = torch.Generator().manual_seed(batch)
    embed = torch.randn(batch, cfg.prior.clip_dim, generator=g).cuda()
    tokens = torch.randn(batch, cfg.clip.context_length, cfg.clip.text_width, generator=g).cuda()
    mask = torch.zeros(batch, cfg.clip.context_length, dtype=torch.bool)
    for i in range(batch):
        mask[i, : 4 + (9 * i) % 70] = True  # different caption lengths: the padding mask matters
    mask = mask.cuda()
    x_t = torch.randn(batch, cfg.prior.clip_dim, generator=g).cuda()
    t = torch.tensor([999, 400, 20][:batch] + [500] * (batch - 3)).cuda()
    ref = model.step(x_t, t, model.context_kv(embed, tokens, mask), mask)
    assert torch.allclose(ref, model(x_t, t, embed, tokens, mask), atol=1e-4)
    kv = half.context_kv(embed.half(), tokens.half(), mask)
    fast = fused.prior_step(half, x_t.half(), t, kv, mask, options).float()
    plain = half.step(x_t.half(), t, kv, mask).float()
    errors = {"fused": rel(fast, ref), "plain": rel(plain, ref), "fused_vs_plain": rel(fast, plain)}
    print("prior step fp16:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= 1e-2 for e in errors.values()), errors


@needs_kernel
@torch.no_grad()
def test_the_prior_time_table_is_not_built_inside_a_graph_capture(ours):
    """A capture that finds no current time table computes the time token in the graph instead
    of building the table there; the replayed step equals the eager step with the table."""
    half = copy.deepcopy(ours.prior).cuda().half()
    cfg = ours.cfg
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(2, cfg.prior.clip_dim, generator=g).cuda().half()
    tokens = torch.randn(2, cfg.clip.context_length, cfg.clip.text_width, generator=g).cuda().half()
    mask = torch.ones(2, cfg.clip.context_length, dtype=torch.bool).cuda()
    x_t = torch.randn(2, cfg.prior.clip_dim, generator=g).cuda().half()
    t = torch.tensor([999, 40]).cuda()
    kv = half.context_kv(embed, tokens, mask)
    half.step_tokens(x_t, t)  # cuBLAS's handle for the time MLP, outside the capture; no table
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert time_table(half) is None
        captured = fused.prior_step(half, x_t, t, kv, mask)
    assert derived(half, "time_table").value is None
    graph.replay()
    eager = fused.prior_step(half, x_t, t, kv, mask)  # builds the table
    assert time_table(half) is not None
    assert rel(captured, eager) <= 2e-3, rel(captured, eager)


def _step_attention_float64(qkv, past, keep, heads):
    """The prior's cached-step attention in float64: each sample's T step tokens attend to the P
    cached keys (padding masked by `keep`) and, causally, to the step tokens."""
    batch, p_len, ch = past.shape[0], past.shape[3], past.shape[4]
    tokens = qkv.shape[0] // batch
    q, k, v = qkv.double().view(batch, tokens, heads, 3, ch).unbind(3)  # [B, T, H, ch] each
    keys = torch.cat([past[:, 0].double(), k.transpose(1, 2)], dim=2)  # [B, H, P + T, ch]
    values = torch.cat([past[:, 1].double(), v.transpose(1, 2)], dim=2)
    visible = torch.ones(batch, tokens, p_len + tokens, dtype=torch.bool, device=qkv.device)
    visible[:, :, : keep.shape[1]] = keep[:, None, :]
    visible[:, :, p_len:] = torch.ones(tokens, tokens, dtype=torch.bool, device=qkv.device).tril()
    scores = q.transpose(1, 2) @ keys.transpose(-1, -2) / ch**0.5  # [B, H, T, P + T]
    weights = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return (weights @ values).transpose(1, 2).reshape(batch * tokens, heads * ch)


@needs_kernel
@pytest.mark.parametrize(
    "batch,tokens,heads,ch,past_len,mask_len",
    [(2, 3, 32, 64, 78, 77), (1, 3, 4, 64, 78, 77), (2, 4, 8, 128, 20, 10), (3, 1, 4, 32, 9, 9), (1, 2, 2, 8, 40, 40),
     (2, 3, 2, 16, 33, 0), (1, 3, 2, 256, 30, 30), (1, 4, 2, 128, 300, 200)],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prior_step_attention_matches_float64(batch, tokens, heads, ch, past_len, mask_len, dtype):
    """The cached-step attention kernel against float64 at every head size it takes (8 to 256),
    1 to 4 step tokens, with caption padding (some samples' keys mostly masked), a strided view
    of the cache as the prior passes it, and a cache long enough to need more than 48 KB of shared
    memory (300 keys of 128); the same bits on a second run."""
    g = torch.Generator(device="cuda").manual_seed(ch + past_len)
    qkv = torch.randn(batch * tokens, heads * 3 * ch, device="cuda", generator=g).to(dtype)
    layers = torch.randn(batch, 3, 2, heads, past_len, ch, device="cuda", generator=g).to(dtype)
    past = layers[:, 1]  # [B, 2, heads, P, ch], strided like the prior's context_kv[:, i]
    keep = torch.rand(batch, mask_len, device="cuda", generator=g) > 0.4
    if mask_len:
        keep[0, 1:] = False  # one sample sees a single cached key
    out = cpp_ext.kernels.prior_step_attention(qkv, past, keep, heads)
    ref = _step_attention_float64(qkv, past, keep, heads)
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    assert out.shape == ref.shape and out.dtype == dtype
    assert float((out.double() - ref).abs().max()) <= tol * float(ref.abs().max())
    assert torch.equal(out, cpp_ext.kernels.prior_step_attention(qkv, past, keep, heads))


@needs_kernel
def test_prior_step_attention_refuses_what_it_cannot_run():
    """Head sizes that are not a power of two from 8 to 256, more than 4 step tokens, or a cache
    longer than one block's shared memory get a clear error."""
    def run(tokens, ch, past_len, heads=2):
        qkv = torch.randn(tokens, heads * 3 * ch, device="cuda").half()
        past = torch.randn(1, 2, heads, past_len, ch, device="cuda").half()
        keep = torch.ones(1, past_len, dtype=torch.bool, device="cuda")
        return cpp_ext.kernels.prior_step_attention(qkv, past, keep, heads)

    with pytest.raises(RuntimeError, match="power of two"):
        run(3, 72, 10)
    with pytest.raises(RuntimeError, match="power of two"):
        run(3, 512, 10)
    with pytest.raises(RuntimeError, match="step tokens"):
        run(5, 64, 10)
    with pytest.raises(RuntimeError, match="shared memory"):
        run(3, 256, 4000)


@needs_kernel
@pytest.mark.parametrize("width", [8, 96, 2048, 2056, 8192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_pending", [False, True])
def test_residual_layer_norm_matches_torch(width, dtype, with_pending):
    """The prior's layer norm with the pending bias folded in: x += bias in place (as torch's
    add rounds it), then the float32 layer norm — against torch in float32."""
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(6, width, generator=g) * 3 + 1).to(dtype).cuda()
    weight, beta, pending = (torch.randn(width, generator=g).to(dtype).cuda() for _ in range(3))
    expected_x = x + pending if with_pending else x.clone()
    ref = F.layer_norm(expected_x.float(), (width,), weight.float(), beta.float(), 1e-5)
    y = cpp_ext.kernels.residual_layer_norm(x, pending if with_pending else None, weight, beta, 1e-5)
    assert torch.equal(x, expected_x)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert rel(y, ref) <= tol, rel(y, ref)
    assert torch.equal(y, cpp_ext.kernels.residual_layer_norm(x.clone(), None, weight, beta, 1e-5))
