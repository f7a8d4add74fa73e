"""The math of the paper's image manipulations (§3): spherical interpolation, text-diff
directions, and DDIM inversion of the decoder.

An image is the bipartite latent (z_i, x_T): its CLIP image embedding and the decoder noise that
reconstructs it. `ddim_invert` finds x_T by running DDIM (eta = 0) backwards; `slerp` moves
between embeddings or between latents; `text_diff_direction` gives z_d, the normalised difference
of two captions' CLIP text embeddings.
"""

from __future__ import annotations

import torch

from models.configs import DiffusionConfig
from models.layers import work_dtype
from runtime.backends.engines import Engine
from runtime.constants import ModelConstants
from runtime.sampling.inputs import TextConditioning
from runtime.sampling.loops import decoder_conditioning, progress_bar, timesteps_at
from runtime.sampling.schedules import StepTable, classifier_free_guidance

_EPS = 1e-7


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation between vectors `a` and `b` ([..., D]) at fractions `t`.

    Directions move along the great circle between â and b̂; norms interpolate linearly, so
    equal-norm inputs keep their norm, and t = 0 / t = 1 return `a` / `b` exactly. Parallel inputs
    reduce to a linear blend of the directions; antiparallel ones (no unique great circle) turn
    through a fixed direction orthogonal to â. `t` may be a tensor [N]: the result is [N, ..., D].
    Computed in float64, returned in a's dtype.
    """
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device)
    batched = t.ndim == 1
    tt = t.reshape(-1, *([1] * a.ndim)) if batched else t
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(dim=-1, keepdim=True), b64.norm(dim=-1, keepdim=True)
    if (na < _EPS).any() or (nb < _EPS).any():
        raise ValueError("slerp needs non-zero vectors")
    ua, ub = a64 / na, b64 / nb
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    # Antiparallel: any great circle through â works; take the one through a fixed orthogonal axis.
    anti = theta > torch.pi - 1e-6
    if anti.any():
        axis = torch.zeros_like(ua)
        axis[..., 0] = 1.0
        axis = axis - (axis * ua).sum(-1, keepdim=True) * ua
        weak = axis.norm(dim=-1, keepdim=True) < 1e-3  # â is itself along the first axis
        alt = torch.zeros_like(ua)
        alt[..., 1] = 1.0
        alt = alt - (alt * ua).sum(-1, keepdim=True) * ua
        axis = torch.where(weak, alt, axis)
        axis = axis / axis.norm(dim=-1, keepdim=True)
        # Rotate â by θ·t within the plane (â, axis): at t = 1 this lands on −â = b̂.
        direction = torch.cos(torch.pi * tt) * ua + torch.sin(torch.pi * tt) * axis
    else:
        direction = None
    sin = torch.sin(theta)
    small = sin < 1e-6
    w_a = torch.where(small, 1 - tt, torch.sin((1 - tt) * theta) / torch.where(small, 1.0, sin))
    w_b = torch.where(small, tt, torch.sin(tt * theta) / torch.where(small, 1.0, sin))
    u = w_a * ua + w_b * ub
    u = u / u.norm(dim=-1, keepdim=True).clamp(min=_EPS)
    if direction is not None:
        u = torch.where(anti, direction, u)
    out = u * ((1 - tt) * na + tt * nb)
    out = torch.where(tt == 0, a64.expand_as(out), torch.where(tt == 1, b64.expand_as(out), out))
    return out.to(a.dtype)


def text_diff_direction(from_embed: torch.Tensor, to_embed: torch.Tensor) -> torch.Tensor:
    """z_d = normalise(z_t(to) − z_t(from)) on unit-normalised text embeddings ([..., D])."""
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp(min=_EPS)

    diff = unit(to_embed.double()) - unit(from_embed.double())
    if (diff.norm(dim=-1) < 1e-6).any():
        raise ValueError("the two captions have the same CLIP text embedding: there is no direction to move along")
    return unit(diff).to(from_embed.dtype)


@torch.no_grad()
def ddim_invert(
    decoder_context: Engine,
    decoder_step: Engine,
    diffusion: DiffusionConfig,
    constants: ModelConstants,
    image: torch.Tensor,
    image_embed: torch.Tensor,
    text: TextConditioning,
    uncond: TextConditioning | None,
    table: StepTable,
    guidance_scale: float,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM inversion (eta = 0) of the decoder: the x_T that DDIM with `table` decodes into `image`.

    Generation step i maps x_{t_i} → x_{t_{i+1}} with the network at (x_{t_i}, t_i); inversion runs
    the steps backwards, evaluating the network at the less noisy side (x_{t_{i+1}}, t_{i+1}),
    the usual approximation. No x̂0 clamp (clamping is not invertible).

    :param image: [B, 3, S, S] in [−1, 1], the decoder's resolution.
    :param constants: the model's constants (its learned unconditional image embedding serves guidance).
    :param table: the DDIM table (`make_step_table(..., kind="ddim")`) that will decode the result.
    :return: x_T [B, 3, S, S] (float32, float64 with float64 engines).
    """
    b = image.shape[0]
    x = image.to(work_dtype(decoder_step.float_dtype))
    image_embed, text = decoder_conditioning(constants, image_embed, text, uncond, x.dtype)
    emb_add, context_kv, context_bias = decoder_context(image_embed, text.embed, text.tokens, text.mask)
    alphas = _alphas_cumprod_at(table)
    n = len(table)
    for k in progress_bar(n - 1, "invert", progress):
        i = n - 2 - k  # rebuild x_{t_i} from x_{t_{i+1}}
        j = i + 1
        x_in = torch.cat([x, x]) if uncond is not None else x
        t = timesteps_at(table, j, x_in.shape[0], x.device)
        (out,) = decoder_step(x_in, t, emb_add, context_kv, context_bias)
        out = out.to(x.dtype)[:, :3]
        if uncond is not None:
            out = classifier_free_guidance(out[:b], out[b:], guidance_scale)
        a_j, a_i = alphas[j].to(x.dtype), alphas[i].to(x.dtype)
        if diffusion.prediction == "epsilon":
            eps = out
            x0 = (x - (1 - a_j).sqrt() * eps) / a_j.sqrt()
        else:
            x0 = out
            eps = (x - a_j.sqrt() * x0) / (1 - a_j).sqrt()
        x = a_i.sqrt() * x0 + (1 - a_i).sqrt() * eps
    return x


def _alphas_cumprod_at(table: StepTable) -> torch.Tensor:
    """ᾱ at each step's timestep, recovered from the table (x0_from_xt = 1/√ᾱ_t)."""
    return 1 / table.x0_from_xt.double() ** 2
