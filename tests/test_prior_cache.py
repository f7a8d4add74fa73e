"""The prior's K/V cache: `context_kv` once per prompt + `step` per step equals the full
`forward`, for every padding length, batch and dtype, and through the exported graphs."""

from __future__ import annotations

import copy

import pytest
import torch

from export.build_engines import build
from runtime.engines import load_onnxruntime_engines


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
    "rows,width,features,expected",
    [(6, 2048, 6144, 16), (1, 2048, 2048, 16), (8, 8192, 2048, 16), (6, 64, 48, 16), (9, 2048, 6144, None),
     (24, 2048, 8192, None), (6, 2040, 6144, None), (0, 2048, 2048, None)],
)
def test_the_prior_runs_skinny_linear_up_to_eight_rows(rows, width, features, expected):
    """Up to 8 rows the prior's linears run `skinny_linear` with 16-feature blocks; more rows, or a
    width the kernel cannot split, go to cuBLAS."""
    from models.prior import skinny_block

    assert skinny_block(rows, width, features) == expected
