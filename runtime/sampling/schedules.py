"""Noise schedules and the denoising update shared by every stage (float32 reference).

Schedule math is done once in float64 and stored as per-step coefficient tables, so a step is
pure tensor arithmetic with no host sync. Every update has the form

    x_prev = a·x_t + b·x̂0 + c·ε̂ + σ·z

where x̂0 is the (guided, clamped) prediction of x0 and ε̂ the guided ε. The ancestral
(DDPM-posterior) step of diffusers' `UnCLIPScheduler` / Karlo's `p_sample` and the DDIM step
with eta both reduce to that form; only the coefficients differ. σ is a per-step scalar for
`fixed_small_log`, and per element for `learned_range` (log σ² = f·log β'_t + (1−f)·log β̃_t,
f = (v+1)/2 from the model's variance channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from models.configs import DiffusionConfig

StepKind = Literal["ancestral", "ddim"]


def alphas_cumprod(schedule: str, num_train_timesteps: int) -> torch.Tensor:
    """ᾱ_t for t = 0..T-1 in float64.

    `squaredcos_cap_v2` is the cosine schedule of Nichol & Dhariwal (β capped at 0.999); `linear`
    is DDPM's (β from 1e-4 to 0.02 over 1000 steps, scaled to keep those ends for other T, as
    guided-diffusion does), which the paper gives its 256 → 1024 upsampler.
    """
    n = num_train_timesteps
    if schedule == "linear":
        scale = 1000 / n
        betas = torch.linspace(scale * 1e-4, scale * 0.02, n, dtype=torch.float64)
        return torch.cumprod(1 - betas, dim=0)
    if schedule != "squaredcos_cap_v2":
        raise ValueError(f"unsupported noise schedule {schedule!r} ('squaredcos_cap_v2' or 'linear')")

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
    )
    return torch.cumprod(1 - betas, dim=0)


def respaced_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Descending timesteps `round(i·(T−1)/(n−1))`, as diffusers' `UnCLIPScheduler`.

    For 7, 25 and 50 steps these equal Karlo's `space_timesteps` as well.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([num_train_timesteps - 1], dtype=torch.long)
    ratio = (num_train_timesteps - 1) / (num_steps - 1)
    return (torch.arange(num_steps, dtype=torch.float64) * ratio).round().long().flip(0)


@dataclass(frozen=True)
class StepTable:
    """Per-step coefficients of one sampling run (index i = i-th step, timestep `timesteps[i]`).

    All tensors are 1-D of length `num_steps`, float64 (timesteps int64); a 0-d float64 factor
    times a float32 tensor stays float32, so one table serves float32 and float64 sampling.
    """

    timesteps: torch.Tensor
    x0_from_xt: torch.Tensor  # x̂0 = x0_from_xt·x_t − x0_from_eps·ε̂   (ε-prediction)
    x0_from_eps: torch.Tensor
    eps_from_xt: torch.Tensor  # ε̂ = eps_from_xt·x_t − eps_from_x0·x̂0   (x0-prediction)
    eps_from_x0: torch.Tensor
    coef_xt: torch.Tensor  # a
    coef_x0: torch.Tensor  # b
    coef_eps: torch.Tensor  # c
    sigma: torch.Tensor  # σ for fixed variance (0 where no noise is added)
    log_var_min: torch.Tensor  # log β̃_t (learned range lower end)
    log_var_max: torch.Tensor  # log β'_t (learned range upper end)
    noise_scale: torch.Tensor  # 1 where noise is added, 0 at the last step

    def to(self, device: torch.device | str) -> StepTable:
        return StepTable(**{k: v.to(device) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return int(self.timesteps.numel())


def make_step_table(
    diffusion: DiffusionConfig,
    num_steps: int,
    kind: StepKind = "ancestral",
    eta: float = 0.0,
) -> StepTable:
    """Coefficients for `num_steps` respaced steps of `kind` ("ancestral" or "ddim" with `eta`)."""
    if kind not in ("ancestral", "ddim"):
        raise ValueError(f"step kind must be 'ancestral' or 'ddim', got {kind!r}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be finite and >= 0, got {eta}")
    ac = alphas_cumprod(diffusion.schedule, diffusion.num_train_timesteps)
    ts = respaced_timesteps(num_steps, diffusion.num_train_timesteps)
    a_t = ac[ts]
    a_prev = torch.cat([ac[ts[1:]], torch.ones(1, dtype=torch.float64)])
    beta = 1 - a_t / a_prev  # β'_t of the respaced chain
    post_var = (1 - a_prev) / (1 - a_t) * beta  # β̃_t
    last = torch.zeros(num_steps, dtype=torch.float64)
    last[-1] = 1.0
    noise_scale = 1 - last

    x0_from_xt = 1 / a_t.sqrt()
    x0_from_eps = (1 - a_t).sqrt() / a_t.sqrt()
    eps_from_xt = 1 / (1 - a_t).sqrt()
    eps_from_x0 = a_t.sqrt() / (1 - a_t).sqrt()
    zeros = torch.zeros(num_steps, dtype=torch.float64)

    if kind == "ancestral":
        coef_x0 = a_prev.sqrt() * beta / (1 - a_t)
        coef_xt = (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
        coef_eps = zeros
        sigma = post_var.clamp(min=1e-20).sqrt() * noise_scale
    else:
        # DDIM (Song et al. eq. 12); ε̂ is re-derived from the clamped x̂0 and folded into a, b.
        sigma = eta * post_var.clamp(min=0).sqrt() * noise_scale
        c_dir = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        coef_xt = c_dir * eps_from_xt
        coef_x0 = a_prev.sqrt() - c_dir * eps_from_x0
        coef_eps = zeros

    coefs = {
        "x0_from_xt": x0_from_xt, "x0_from_eps": x0_from_eps, "eps_from_xt": eps_from_xt,
        "eps_from_x0": eps_from_x0, "coef_xt": coef_xt, "coef_x0": coef_x0, "coef_eps": coef_eps,
        "sigma": sigma, "log_var_min": post_var.clamp(min=1e-20).log(), "log_var_max": beta.log(),
        "noise_scale": noise_scale,
    }
    return StepTable(timesteps=ts, **coefs)


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """`uncond + scale·(cond − uncond)`."""
    return uncond + scale * (cond - uncond)


def denoise_step(
    table: StepTable,
    i: int | torch.Tensor,
    x_t: torch.Tensor,
    model_out: torch.Tensor,
    noise: torch.Tensor,
    prediction: str,
    clip_range: float | None,
    var_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reverse step `x_t → x_prev` (reference implementation, in float32, or float64 for float64 input).

    :param table: coefficients from `make_step_table`.
    :param i: step index into `table`.
    :param x_t: current sample.
    :param model_out: the (already guided) network prediction: ε or x0 per `prediction`.
    :param noise: standard normal noise shaped like `x_t` (ignored at the last step).
    :param prediction: "epsilon" or "sample".
    :param clip_range: clamp x̂0 to ±clip_range (None: no clamp).
    :param var_values: v ∈ [−1, 1] for a learned-range variance; None for fixed variance.
    :return: x_prev (float32, or float64 if `x_t` is float64).
    """
    return update_step(lambda name: getattr(table, name)[i], x_t, model_out, noise, prediction, clip_range,
                       var_values)


def update_step(
    coef: Callable[[str], torch.Tensor],
    x_t: torch.Tensor,
    model_out: torch.Tensor,
    noise: torch.Tensor,
    prediction: str,
    clip_range: float | None,
    var_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """`denoise_step` given the step's coefficients by name (`coef("x0_from_eps")` → a 0-d tensor, one of
    the `StepTable` fields): the one place the update's math is written, shared by `denoise_step`
    and `runtime.sampling.update.reference_update` (which reads a packed row)."""
    work = torch.promote_types(x_t.dtype, torch.float32)
    x_t = x_t.to(work)
    out = model_out.to(work)
    if prediction == "epsilon":
        x0 = coef("x0_from_xt") * x_t - coef("x0_from_eps") * out
    elif prediction == "sample":
        x0 = out
    else:
        raise ValueError(f"prediction must be 'epsilon' or 'sample', got {prediction!r}")
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    eps = out if prediction == "epsilon" else coef("eps_from_xt") * x_t - coef("eps_from_x0") * x0
    x_prev = coef("coef_xt") * x_t + coef("coef_x0") * x0 + coef("coef_eps") * eps
    if var_values is None:
        sigma = coef("sigma")
    else:
        frac = (var_values.to(work) + 1) / 2
        log_var = frac * coef("log_var_max") + (1 - frac) * coef("log_var_min")
        sigma = torch.exp(0.5 * log_var) * coef("noise_scale")
    return x_prev + sigma * noise.to(work)
