"""The prior's K/V cache: `context_kv` once per prompt + `step` per step equals the full
`forward`, for every padding length, batch and dtype, and through the exported graphs."""

from __future__ import annotations

import copy

import pytest
import torch

from export.build_engines import build
from runtime.backends.engines import load_onnxruntime_engines


def _inputs(prior, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cfg = prior.cfg
    lengths = torch.randint(2, cfg.text_ctx + 1, (batch,), generator=gen)
    mask = torch.arange(cfg.text_ctx)[None] < lengths[:, None]
    return (torch.randn(batch, cfg.clip_dim, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
            torch.randn(batch, cfg.clip_dim, generator=gen), torch.randn(batch, cfg.text_ctx, cfg.text_width,
                                                                         generator=gen), mask)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_cached_steps_equal_the_full_forward(ours, batch):
    prior = ours.prior
    x, t, embed, tokens, mask = _inputs(prior, batch, batch)
    with torch.no_grad():
        ref = prior(x, t, embed, tokens, mask)
        cache = prior.context_kv(embed, tokens, mask)
        got = prior.step(x, t, cache, mask)
        # the cache does not depend on the step: a second x_t and t reuse it
        x2, t2 = torch.randn_like(x), (t + 17) % 1000
        got2, ref2 = prior.step(x2, t2, cache, mask), prior(x2, t2, embed, tokens, mask)
    cfg = prior.cfg
    assert cache.shape == (batch, cfg.layers, 2, cfg.heads, cfg.text_ctx + 1, cfg.width // cfg.heads)
    for g, r in ((got, ref), (got2, ref2)):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()


def test_cached_steps_in_float64_match_to_rounding(ours):
    prior = copy.deepcopy(ours.prior).double()
    x, t, embed, tokens, mask = (v.double() if v.is_floating_point() else v for v in _inputs(prior, 2, 0))
    with torch.no_grad():
        ref = prior(x, t, embed, tokens, mask)
        got = prior.step(x, t, prior.context_kv(embed, tokens, mask), mask)
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_the_exported_split_prior_equals_the_torch_forward(ours, tmp_path):
    build(ours, tmp_path, ["onnxruntime"], stages=["prior_context", "prior_step"])
    engines = load_onnxruntime_engines(tmp_path, ours)
    x, t, embed, tokens, mask = _inputs(ours.prior, 4, 5)
    (cache,) = engines["prior_context"](embed, tokens, mask)
    (got,) = engines["prior_step"](x, t, cache, mask)
    with torch.no_grad():
        ref = ours.prior(x, t, embed, tokens, mask)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize(
    "rows,width,features,sms,expected",
    [(6, 2048, 6144, 132, 32), (6, 2048, 8192, 132, 32), (1, 2048, 2048, 132, 8), (8, 8192, 2048, 132, 8),
     (6, 64, 48, 132, 8), (6, 2048, 2048, 100, 16), (6, 2048, 6144, 200, 16), (6, 2048, 6160, 132, 16),
     (12, 2048, 6144, 132, 32), (16, 8192, 2048, 132, 8), (17, 2048, 6144, 132, None), (24, 2048, 8192, 132, None),
     (6, 2040, 6144, 132, None), (0, 2048, 2048, 132, None)],
)
def test_the_prior_runs_skinny_linear_up_to_sixteen_rows(rows, width, features, sms, expected, monkeypatch):
    """Up to 16 rows the prior's linears run `skinny_linear` with the largest blocks (32, 16 or 8
    features) whose grid still gives each of the GPU's SMs one (8 where none does; 32 only for
    features a multiple of 32); more rows, or a width the kernel cannot split, go to cuBLAS."""
    from models.fused import linear_plan

    monkeypatch.setattr(linear_plan, "multiprocessors", lambda: sms)
    assert linear_plan.skinny_block(rows, width, features) == expected


def test_the_runtime_hands_its_fused_options_to_the_prior_step():
    from models.fused import FusedOptions
    from runtime import UnCLIP

    options = FusedOptions(staged_weights=False)
    assert UnCLIP(device="cpu", progress=False, fused=options).engines["prior_step"].module.options is options
    assert UnCLIP(device="cpu", progress=False).engines["prior_step"].module.options == FusedOptions()
    with pytest.raises(TypeError, match="fused must be a models.fused.FusedOptions"):
        UnCLIP(device="cpu", progress=False, fused={"staged_weights": False})


@pytest.mark.parametrize("head,fits", [(8, True), (32, True), (64, True), (256, True), (4, False), (48, False),
                                       (72, False), (512, False)])
def test_the_fused_prior_step_takes_power_of_two_heads(head, fits):
    """The fused step's attention kernel takes heads of 8 to 256 channels, powers of two; other
    priors keep the torch step."""
    from models.fused.prior_step import attention_head_fits

    assert attention_head_fits(head) is fits


def test_the_time_table_holds_every_timesteps_token_and_follows_the_weights(ours):
    """`time_table` (the fused step's time token lookup) holds time_embed(sinusoid(t)) + its
    positional embedding for every training timestep, and is rebuilt when those weights change
    in place or move to new storage."""
    from models.fused.prior_step import time_table
    from models.layers import timestep_embedding

    prior = copy.deepcopy(ours.prior)
    table = time_table(prior)
    steps = prior.cfg.diffusion.num_train_timesteps
    assert table.shape == (steps, prior.cfg.width)
    t = torch.tensor([0, 1, 420, steps - 1])
    with torch.no_grad():
        ref = prior.time_embed(timestep_embedding(t, prior.cfg.width))
        ref = ref + prior.positional_embedding[0, prior.context_len]
    torch.testing.assert_close(table[t], ref, rtol=1e-5, atol=1e-6)
    assert time_table(prior) is table  # cached while nothing changes
    with torch.no_grad():
        prior.time_embed[2].bias.add_(1.0)
    changed = time_table(prior)
    torch.testing.assert_close(changed[t], ref + 1.0, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        prior.positional_embedding.data = prior.positional_embedding.data * 2
    again = time_table(prior)
    assert again is not changed and not torch.equal(again, changed)


@pytest.mark.parametrize(
    "rows,width,features,sms,capable,expected",
    [(6, 2048, 6144, 132, True, (16, 4)), (6, 2048, 8192, 132, True, (32, 2)), (6, 2048, 2048, 132, True, (16, 4)),
     (6, 8192, 2048, 132, True, (16, 4)), (1, 2048, 6144, 100, True, (32, 2)), (16, 512, 48, 132, True, (16, 4)),
     (6, 2048, 6144, 132, False, None), (24, 2048, 6144, 132, True, (16, 4)), (16, 8192, 2048, 132, True, (16, 4)),
     (17, 8192, 2048, 132, True, None), (24, 8192, 2048, 132, True, None), (24, 2048, 8192, 132, True, (32, 2)),
     (25, 2048, 6144, 132, True, None), (6, 2080, 6144, 132, True, None),
     (6, 2048, 8200, 132, True, None), (6, 2048, 16384, 132, True, None), (0, 2048, 2048, 132, True, None)],
)
def test_the_prior_stages_weights_through_shared_memory_on_hopper(rows, width, features, sms, capable, expected,
                                                                   monkeypatch):
    """On Hopper, up to 24 rows and widths of 512s, the prior's linears stream their weights
    through shared memory: 16-feature blocks of 4 stages, or 32 × 2 where 16-feature blocks would
    take more than three per SM; above 16 rows not a layer narrower than its input (cuBLAS);
    otherwise (or with the switch off) `skinny_block`'s rule."""
    from models.fused import FusedOptions, linear_plan

    monkeypatch.setattr(linear_plan, "multiprocessors", lambda: sms)
    monkeypatch.setattr(linear_plan, "staged_capable", lambda: capable)
    assert linear_plan.staged_plan(rows, width, features) == expected
    assert linear_plan.staged_plan(rows, width, features, FusedOptions(staged_weights=False)) is None
