"""The three denoising loops (prior, decoder, super-res), each a few lines around
`sampling.denoise_step`, and the noise they consume.

The loops call stage engines (`runtime.engines.Engine`: torch modules, ONNX Runtime sessions or
TensorRT plans, all with the positional I/O of `runtime.signatures`) and never know which
backend runs; what they need besides the networks comes from `ModelConstants`.

All noise of a run is drawn before the loops start (`SamplingNoise`), so the loops hold no
RNG state, a run is reproducible from its noise alone, and a caller (a test, DDIM inversion)
can inject its own. Engines run in their own dtype (they cast float inputs); samples and updates
stay float32 (float64 when the engines are float64, for reference checks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from models.configs import DiffusionConfig
from models.layers import work_dtype
from models.super_res import upsample_low_res
from runtime.constants import ModelConstants
from runtime.engines import Engine
from runtime.sampling import StepTable, classifier_free_guidance, denoise_step


@dataclass(frozen=True)
class TextConditioning:
    """CLIP text outputs for a batch: embed [B, D], tokens [B, L, W], mask [B, L] (bool)."""

    embed: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def expand(self, batch: int) -> TextConditioning:
        """Broadcast a batch-1 conditioning (e.g. the empty prompt's) to `batch` rows, without copies."""
        return TextConditioning(*(t.expand(batch, *t.shape[1:]) for t in (self.embed, self.tokens, self.mask)))

    @staticmethod
    def cat(parts: Iterable[TextConditioning]) -> TextConditioning:
        parts = list(parts)
        return TextConditioning(*(torch.cat([getattr(p, f) for p in parts]) for f in ("embed", "tokens", "mask")))


@dataclass(frozen=True)
class StageNoise:
    """Initial sample x_T and one noise tensor per step ([steps, *x_T.shape]), float32."""

    init: torch.Tensor
    steps: torch.Tensor

    @staticmethod
    def draw(shape: tuple[int, ...], num_steps: int, generator: torch.Generator | None) -> StageNoise:
        init = torch.randn(shape, generator=generator, dtype=torch.float32)
        steps = torch.randn((num_steps, *shape), generator=generator, dtype=torch.float32)
        return StageNoise(init, steps)

    def to(self, device: torch.device | str) -> StageNoise:
        return StageNoise(self.init.to(device), self.steps.to(device))


@dataclass(frozen=True)
class SamplingNoise:
    """The noise of one text→image run, per stage (a stage may be None when it does not run)."""

    prior: StageNoise | None
    decoder: StageNoise | None
    super_res: StageNoise | None


class NumericalError(FloatingPointError):
    """A stage produced NaN or infinite values; names the stage and the first bad step."""


class FiniteGuard:
    """Records, on the device, the first step at which a stage's sample stops being finite, and
    raises once at the end of the loop: no host sync inside the loop, and no black image."""

    def __init__(self, stage: str, steps: int, device: torch.device) -> None:
        self.stage, self.steps = stage, steps
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def update(self, i: int, x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, i), self.first_bad)

    def check(self) -> None:
        step = int(self.first_bad)
        if step >= 0:
            raise NumericalError(f"the {self.stage} produced NaN or infinite values at step {step + 1} of "
                                 f"{self.steps}; no image was returned (check the inputs, or run in float32)")


def progress_bar(steps: int, desc: str, enabled: bool):
    return tqdm(range(steps), desc=desc, disable=not enabled, leave=False)


def _check_noise(noise: StageNoise, table: StepTable, shape: tuple[int, ...], stage: str) -> None:
    want = (len(table), *shape)
    if tuple(noise.init.shape) != shape or tuple(noise.steps.shape) != want:
        raise ValueError(
            f"{stage} noise has shapes {tuple(noise.init.shape)}/{tuple(noise.steps.shape)}, "
            f"expected {shape}/{want}"
        )


def timesteps_at(table: StepTable, i: int, batch: int, device: torch.device) -> torch.Tensor:
    return table.timesteps[i].expand(batch).to(device)


@torch.no_grad()
def sample_prior(
    prior_context: Engine,
    prior_step: Engine,
    diffusion: DiffusionConfig,
    constants: ModelConstants,
    text: TextConditioning,
    uncond: TextConditioning | None,
    table: StepTable,
    noise: StageNoise,
    guidance_scale: float,
    progress: bool = False,
) -> torch.Tensor:
    """Run the prior; return raw (de-standardised) CLIP image embeddings [B, D] (float32 or float64).

    The step-independent tokens go through `prior_context` once; each step runs `prior_step`
    against their cached keys and values.

    :param uncond: text conditioning of the empty prompt, batch B (None: no guidance).
    """
    b = text.embed.shape[0]
    _check_noise(noise, table, (b, constants.prior_clip_mean.shape[-1]), "prior")
    cond = TextConditioning.cat([text, uncond]) if uncond is not None else text
    x = noise.init.to(work_dtype(prior_step.float_dtype))
    (context_kv,) = prior_context(cond.embed, cond.tokens, cond.mask)
    guard = FiniteGuard("prior", len(table), x.device)
    for i in progress_bar(len(table), "prior", progress):
        x_in = torch.cat([x, x]) if uncond is not None else x
        t = timesteps_at(table, i, x_in.shape[0], x.device)
        (out,) = prior_step(x_in, t, context_kv, cond.mask)
        out = out.to(x.dtype)
        if uncond is not None:
            out = classifier_free_guidance(out[:b], out[b:], guidance_scale)
        x = denoise_step(table, i, x, out, noise.steps[i], diffusion.prediction, diffusion.clip_range)
        guard.update(i, x)
    guard.check()
    return constants.unnormalize(x)


@torch.no_grad()
def sample_decoder(
    decoder: Engine,
    diffusion: DiffusionConfig,
    constants: ModelConstants,
    image_embed: torch.Tensor,
    text: TextConditioning,
    uncond: TextConditioning | None,
    table: StepTable,
    noise: StageNoise,
    guidance_scale: float,
    progress: bool = False,
    learned_variance: bool = True,
) -> torch.Tensor:
    """Run the 64×64 decoder; return images [B, 3, S, S] in [−1, 1] (float32 or float64).

    The unconditional branch uses the learned unconditional image embedding and the empty
    prompt; guidance applies to the prediction, the variance comes from the conditional half.
    `learned_variance=False` ignores a learned-range variance (DDIM tables carry their own σ).
    """
    b = image_embed.shape[0]
    size = decoder.signature.outputs[0].shape[-1]
    _check_noise(noise, table, (b, 3, size, size), "decoder")
    x = noise.init.to(work_dtype(decoder.float_dtype))
    image_embed = image_embed.to(x.dtype)
    if uncond is not None:
        image_embed = torch.cat([image_embed, constants.uncond_image_embed(b, x.dtype).to(x.device)])
        text = TextConditioning.cat([text, uncond])
    has_var = diffusion.variance == "learned_range"
    learned = has_var and learned_variance
    guard = FiniteGuard("decoder", len(table), x.device)
    for i in progress_bar(len(table), "decoder", progress):
        x_in = torch.cat([x, x]) if uncond is not None else x
        t = timesteps_at(table, i, x_in.shape[0], x.device)
        (out,) = decoder(x_in, t, image_embed, text.embed, text.tokens, text.mask)
        out = out.to(x.dtype)
        pred, var = (out[:, :3], out[:, 3:]) if learned else (out[:, :3] if has_var else out, None)
        if uncond is not None:
            pred, var = classifier_free_guidance(pred[:b], pred[b:], guidance_scale), (var[:b] if learned else None)
        x = denoise_step(table, i, x, pred, noise.steps[i], diffusion.prediction, diffusion.clip_range, var)
        guard.update(i, x)
    guard.check()
    return x.clamp(-1, 1)


@torch.no_grad()
def sample_super_res(
    first_steps: Engine,
    last_step: Engine,
    diffusion: DiffusionConfig,
    low_res: torch.Tensor,
    table: StepTable,
    noise: StageNoise,
    progress: bool = False,
) -> torch.Tensor:
    """Upsample [B, 3, s, s] images in [−1, 1] to [B, 3, S, S]; `last_step` runs the final step."""
    b = low_res.shape[0]
    size = first_steps.signature.outputs[0].shape[-1]
    _check_noise(noise, table, (b, 3, size, size), "super_res")
    work = work_dtype(first_steps.float_dtype)
    low_res_up = upsample_low_res(low_res.to(work), size)
    x = noise.init.to(work)
    guard = FiniteGuard("super-res", len(table), x.device)
    for i in progress_bar(len(table), "super-res", progress):
        engine = last_step if i == len(table) - 1 else first_steps
        (out,) = engine(x, timesteps_at(table, i, b, x.device), low_res_up)
        x = denoise_step(table, i, x, out.to(x.dtype), noise.steps[i], diffusion.prediction, diffusion.clip_range)
        guard.update(i, x)
    guard.check()
    return x.clamp(-1, 1)
