"""The decoder's context K/V cache: `Decoder.context` once + `Decoder.step` per step equals the
whole `Decoder.forward`, through the torch engines and the exported ONNX graphs."""

from __future__ import annotations

import copy

import torch

from models.fused.unet_forward import emb_linears, embedding_projections
from models.unet import context_heads
from runtime.backends.engines import TorchEngine
from runtime.backends.signatures import signatures
from tests.diffusers_reference import max_rel_err


def _conditioning(cfg, b, dtype, g):
    embed = torch.randn(b, cfg.clip.embed_dim, generator=g, dtype=dtype)
    text_embed = torch.randn(b, cfg.clip.embed_dim, generator=g, dtype=dtype)
    tokens = torch.randn(b, cfg.clip.context_length, cfg.clip.text_width, generator=g, dtype=dtype)
    mask = torch.arange(cfg.clip.context_length)[None] < torch.tensor([5, 77, 2])[:b, None]
    return embed, text_embed, tokens, mask


@torch.no_grad()
def test_context_once_then_steps_equals_the_whole_decoder(ours):
    model = copy.deepcopy(ours).double()
    g = torch.Generator().manual_seed(0)
    cfg = model.cfg
    cond = _conditioning(cfg, 3, torch.float64, g)
    emb_add, kv, bias = model.decoder.context(*cond)
    assert kv.shape == (3, 2, context_heads(cfg.decoder), cfg.text_proj.clip_tokens + 77,
                        cfg.decoder.num_head_channels)
    for t in (999, 500, 3):
        x = torch.randn(3, 3, cfg.decoder.image_size, cfg.decoder.image_size, generator=g, dtype=torch.float64)
        ts = torch.full((3,), t)
        whole = model.decoder(x, ts, *cond)
        split = model.decoder.step(x, ts, emb_add, kv, bias)
        assert max_rel_err(split, whole) <= 1e-12


def test_decoder_stage_engines_chain_like_the_whole_stage(ours):
    g = torch.Generator().manual_seed(1)
    sigs = signatures(ours.cfg)
    whole, context, step = (TorchEngine(ours, n) for n in ("decoder", "decoder_context", "decoder_step"))
    inputs = sigs["decoder"].sample_inputs(2, generator=g)
    emb_add, kv, bias = context(inputs["image_embed"], inputs["text_embed"], inputs["text_tokens"], inputs["text_mask"])
    (got,) = step(inputs["x_t"], inputs["timesteps"], emb_add, kv, bias)
    (want,) = whole(*inputs.values())
    assert max_rel_err(got, want) <= 1e-5
    for spec, tensor in zip(sigs["decoder_context"].outputs, (emb_add, kv, bias), strict=True):
        assert tuple(tensor.shape) == spec.concrete(2)


@torch.no_grad()
def test_stacked_embedding_projections_equal_each_blocks_own(ours):
    """`embedding_projections` (one GEMM over every ResBlock's stacked time-embedding
    weights, the fast path's) gives each block what its own projection gives, and notices weights
    written in place or replaced."""
    unet = copy.deepcopy(ours.decoder.unet).double()
    emb = torch.randn(3, unet.cfg.time_embed_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    linears = emb_linears(unet)

    def check() -> None:
        projections = embedding_projections(unet, emb)
        assert projections is not None
        for lin in linears:
            assert max_rel_err(projections.of(lin), lin(emb)) <= 1e-12

    assert len(linears) >= 4
    check()
    linears[1].weight.add_(1.0)  # in place: the stack is rebuilt
    check()
    linears[-1].bias = torch.nn.Parameter(torch.randn_like(linears[-1].bias))  # replaced
    check()
