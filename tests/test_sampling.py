"""runtime/sampling/schedules.py: schedule, respacing and the reverse step against diffusers'
`UnCLIPScheduler`, against Karlo's respacing rule, and DDIM's defining properties."""

from __future__ import annotations

import pytest
import torch
from diffusers import UnCLIPScheduler
from diffusers.schedulers import scheduling_unclip

from models.configs import DiffusionConfig
from runtime.sampling.schedules import alphas_cumprod, denoise_step, make_step_table, respaced_timesteps
from tests.diffusers_reference import max_rel_err

PRIOR = DiffusionConfig("sample", "fixed_small_log", 5.0)
DECODER = DiffusionConfig("epsilon", "learned_range", 1.0)
SUPER_RES = DiffusionConfig("epsilon", "fixed_small_log", 1.0)


def karlo_space_timesteps(num_timesteps: int, section_counts: int) -> list[int]:
    """guided-diffusion's `space_timesteps(T, "N")` (one section), written out for the test."""
    frac_stride = (num_timesteps - 1) / (section_counts - 1)
    return sorted({round(i * frac_stride) for i in range(section_counts)}, reverse=True)


@pytest.mark.parametrize("steps", [7, 25, 50])
def test_timesteps_equal_diffusers_and_karlo(steps):
    ours = respaced_timesteps(steps).tolist()
    scheduler = UnCLIPScheduler()
    scheduler.set_timesteps(steps)
    assert ours == scheduler.timesteps.tolist()
    assert ours == karlo_space_timesteps(1000, steps)
    assert ours[0] == 999 and ours[-1] == 0 and len(set(ours)) == steps


def test_schedule_matches_diffusers_cosine():
    ours = alphas_cumprod("squaredcos_cap_v2", 1000)
    ref = UnCLIPScheduler().alphas_cumprod.double()
    assert torch.allclose(ours, ref, rtol=2e-4, atol=0)  # diffusers' is a float32 cumprod
    assert abs(ours[999].sqrt().item() - 4.9e-5) < 1e-6


def _diffusers_step(config: DiffusionConfig, steps: int, i: int, model_out, x, noise):
    scheduler = UnCLIPScheduler(
        variance_type=config.variance, prediction_type=config.prediction,
        clip_sample=config.clip_range is not None, clip_sample_range=config.clip_range or 1.0,
    )
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps
    prev = None if i == steps - 1 else ts[i + 1]
    original = scheduling_unclip.randn_tensor
    scheduling_unclip.randn_tensor = lambda *a, **k: noise
    try:
        return scheduler.step(model_out, ts[i], x, prev_timestep=prev).prev_sample
    finally:
        scheduling_unclip.randn_tensor = original


@pytest.mark.parametrize(("config", "shape"), [(PRIOR, (2, 32)), (DECODER, (2, 3, 8, 8)), (SUPER_RES, (2, 3, 8, 8))])
@pytest.mark.parametrize("i", [0, 1, 10, 23, 24])
def test_one_step_matches_unclip_scheduler(config, shape, i):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g) * (3 if config.prediction == "sample" else 1)
    noise = torch.randn(shape, generator=g)
    learned = config.variance == "learned_range"
    var = torch.rand(shape, generator=g) * 2 - 1 if learned else None
    model_out = torch.cat([out, var], dim=1) if learned else out
    ref = _diffusers_step(config, 25, i, model_out, x, noise)
    ours = denoise_step(make_step_table(config, 25), i, x, out, noise, config.prediction, config.clip_range, var)
    # diffusers computes its coefficients from a float32 schedule: agreement to its rounding, which
    # peaks at the ends: at t = 999 (ᾱ from a 1000-term float32 cumprod, ~1.5e-4 relative) and at
    # the last step, where its x0 coefficient β₀/(1 − ᾱ₀) is 0.9995 instead of exactly 1.
    tol = 1e-3 if i in (0, 24) else 1e-4
    assert max_rel_err(ours, ref) <= tol
    if i == 24 and config.prediction == "sample":
        assert torch.allclose(ours, out.clamp(-config.clip_range, config.clip_range), atol=1e-6)
    if i < 24:
        assert not torch.allclose(ours, denoise_step(make_step_table(config, 25), i, x, out, 0 * noise,
                                                     config.prediction, config.clip_range, var))


def test_ddim_with_eta_one_is_the_ancestral_step():
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    anc, ddim = make_step_table(SUPER_RES, 25), make_step_table(SUPER_RES, 25, "ddim", eta=1.0)
    for i in (0, 12, 24):
        a = denoise_step(anc, i, x, eps, z, "epsilon", 1.0)
        b = denoise_step(ddim, i, x, eps, z, "epsilon", 1.0)
        assert torch.allclose(a, b, atol=1e-5)


def test_ddim_eta_zero_is_deterministic_and_exact_for_consistent_eps():
    # If the network's ε is the true noise of x_t = √ᾱ x0 + √(1−ᾱ) ε, DDIM lands exactly on x_{t_prev}.
    table = make_step_table(SUPER_RES, 10, "ddim", eta=0.0)
    ac = alphas_cumprod("squaredcos_cap_v2", 1000)
    g = torch.Generator().manual_seed(1)
    # float64: at t = 999 recovering x0 divides by √ᾱ = 4.9e-5, which float32 inputs cannot survive.
    x0 = (torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8).double()
    eps = torch.randn(2, 3, 8, 8, generator=g).double()
    for i in range(9):
        t, t_prev = table.timesteps[i], table.timesteps[i + 1]
        x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
        want = ac[t_prev].sqrt() * x0 + (1 - ac[t_prev]).sqrt() * eps
        got = denoise_step(table, i, x_t, eps, torch.randn_like(eps) * 100, "epsilon", 1.0)
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, atol=1e-9)


def test_last_step_adds_no_noise_and_clamps():
    table = make_step_table(SUPER_RES, 7)
    x, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    a = denoise_step(table, 6, x, eps, torch.zeros_like(x), "epsilon", 1.0)
    b = denoise_step(table, 6, x, eps, torch.randn_like(x) * 10, "epsilon", 1.0)
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0 + 1e-6


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        respaced_timesteps(0)
    with pytest.raises(ValueError):
        make_step_table(SUPER_RES, 5, "plms")
    with pytest.raises(ValueError):
        make_step_table(SUPER_RES, 5, "ddim", eta=float("nan"))
    with pytest.raises(ValueError):
        alphas_cumprod("scaled_linear", 1000)  # neither of the two schedules
