"""The one-call step update (`runtime.sampling.update`): its torch reference equals guidance followed by
`sampling.denoise_step` for every prediction/variance kind, records the first non-finite step,
and writes the next network input; the CUDA kernel is compared with it in tests/gpu/test_guided_update.py."""

from __future__ import annotations

import pytest
import torch

from models.configs import DiffusionConfig
from runtime.sampling.schedules import classifier_free_guidance, denoise_step, make_step_table
from runtime.sampling.update import COLUMNS, UpdateSpec, guided_update, implementation, packed_coefficients

KINDS = {
    "prior": (DiffusionConfig("sample", "fixed_small_log", 5.0), (3, 32)),
    "decoder": (DiffusionConfig("epsilon", "learned_range", 1.0), (2, 3, 8, 8)),
    "super_res": (DiffusionConfig("epsilon", "fixed_small_log", 1.0), (2, 3, 16, 16)),
}


def _inputs(shape, out_channels, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    out = torch.randn((rows, out_channels, *shape[2:]), generator=g, dtype=torch.float64).to(dtype)
    if out_channels > shape[1]:
        out[:, shape[1]:] = out[:, shape[1]:].tanh()  # v ∈ [−1, 1]
    return x, out, torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ddim", [False, True])
def test_reference_update_equals_guidance_then_denoise_step(kind, guided, dtype, ddim):
    config, shape = KINDS[kind]
    learned = config.variance == "learned_range" and not ddim
    table = make_step_table(config, 25, "ddim", 0.5) if ddim else make_step_table(config, 25)
    coefs = packed_coefficients(table, dtype, "cpu")
    b, c = shape[0], shape[1]
    out_channels = 2 * c if config.variance == "learned_range" else c
    spec = UpdateSpec(config.prediction, config.clip_range, learned, guided)
    scale = torch.full((1,), 3.5, dtype=dtype)
    for i in (0, 7, 24):
        x, out, noise = _inputs(shape, out_channels, spec.copies * b, dtype, seed=i)
        first_bad = torch.full((1,), -1, dtype=torch.int32)
        got, x_in = guided_update(out, x, noise, coefs[i], scale, first_bad, i, spec, torch.float16)
        pred = out[:b, :c]
        if guided:
            pred = classifier_free_guidance(pred, out[b:, :c], 3.5)
        var = out[:b, c:] if learned else None
        want = denoise_step(table, i, x, pred, noise, config.prediction, config.clip_range, var)
        assert got.dtype == dtype and torch.allclose(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                                     atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert x_in.dtype == torch.float16 and x_in.shape == (spec.copies * b, *shape[1:])
        assert all(torch.equal(x_in[k * b:(k + 1) * b], got.half()) for k in range(spec.copies))
        assert int(first_bad) == -1


def test_the_first_non_finite_step_is_recorded_and_kept():
    config, shape = KINDS["super_res"]
    coefs = packed_coefficients(make_step_table(config, 7), torch.float32, "cpu")
    spec = UpdateSpec("epsilon", 1.0, False, False)
    x, out, noise = _inputs(shape, 3, shape[0], torch.float32, seed=0)
    first_bad = torch.full((1,), -1, dtype=torch.int32)
    scale = torch.ones(1)
    guided_update(out, x, noise, coefs[0], scale, first_bad, 0, spec, torch.float32)
    assert int(first_bad) == -1
    out[1, 2, 3, 4] = float("nan")
    guided_update(out, x, noise, coefs[2], scale, first_bad, 2, spec, torch.float32)
    assert int(first_bad) == 2
    out[0, 0, 0, 0] = float("inf")
    guided_update(out, x, noise, coefs[5], scale, first_bad, 5, spec, torch.float32)
    assert int(first_bad) == 2  # the first bad step, not the latest


def test_a_nan_prediction_is_not_hidden_by_the_clamp():
    config, shape = KINDS["prior"]
    coefs = packed_coefficients(make_step_table(config, 5), torch.float32, "cpu")
    x, out, noise = _inputs(shape, shape[1], shape[0], torch.float32, seed=1)
    out[0, 0] = float("nan")
    first_bad = torch.full((1,), -1, dtype=torch.int32)
    guided_update(out, x, noise, coefs[1], torch.ones(1), first_bad, 1, UpdateSpec("sample", 5.0, False, False),
                  torch.float32)
    assert int(first_bad) == 1


def test_packed_columns_and_implementation_on_the_cpu():
    table = make_step_table(KINDS["decoder"][0], 25)
    coefs = packed_coefficients(table, torch.float64, "cpu")
    assert coefs.shape == (25, len(COLUMNS))
    assert torch.equal(coefs[:, COLUMNS.index("x0_from_eps")], table.x0_from_eps)
    assert implementation("cpu") == "torch" and implementation("cuda", torch.float64) == "torch"
    with pytest.raises(ValueError, match="prediction"):
        UpdateSpec("v", None, False, False)


def test_fp16_network_output_is_turned_into_x0_in_float32():
    """At t = 999 x̂0 = (x − √(1−ᾱ)·ε)/√ᾱ multiplies rounding by ~2e4: the update must do it in
    float32 (from the fp16 ε), not in the network's fp16 — which would be wrong by far more."""
    config = DiffusionConfig("epsilon", "fixed_small_log", None)
    table = make_step_table(config, 25)
    coefs = packed_coefficients(table, torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    eps = torch.randn(2, 3, 8, 8, generator=g).half()
    first_bad = torch.full((1,), -1, dtype=torch.int32)
    got, _ = guided_update(eps, x, torch.zeros_like(x), coefs[0], torch.ones(1), first_bad, 0,
                           UpdateSpec("epsilon", None, False, False), torch.float16)
    want = denoise_step(table, 0, x.double(), eps.double(), torch.zeros_like(x).double(), "epsilon", None)
    in_half = denoise_step(table, 0, x.half().float(), eps.float(), torch.zeros_like(x), "epsilon", None)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max() / want.abs().max()) <= 1e-5
    assert float((in_half.double() - want).abs().max() / want.abs().max()) > 1e-4  # what fp16 x_t would cost
