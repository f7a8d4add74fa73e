"""The paper's image manipulations on `UnCLIP` (mixed into it): `encode_image`, `invert`,
`decode`, `variations`, `interpolate`, `text_diff`.

Every image is the pair (z_i, x_T): its CLIP image embedding and the 64×64 decoder latent that
DDIM decodes into it. The decoder is conditioned on z_i and on a caption (the empty one unless
`prompt=` says otherwise, as Karlo's variations). Super-resolution is not inverted: its output
follows the 64×64 image closely, so it is regenerated with fresh noise from the seed; pass
`super_res=False` for the 64×64 decoder images themselves. All images of a sweep decode in one
batch. Everything runs on the pipeline's engines, whichever backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime import edits
from runtime.batch_invariance import row_invariant
from runtime.call_limits import check_noise
from runtime.images import load_images, resize_batch
from runtime.outputs import OUTPUT_TYPES, UnCLIPOutput, to_output
from runtime.sampling import loops
from runtime.sampling.inputs import SamplingNoise, StageNoise, TextConditioning
from runtime.sampling.schedules import make_step_table
from runtime.serial import serialised
from runtime.validate import check_chain, check_int, check_scale, check_seed

PATHS = ("inverted", "fixed_noise")
INVERSION_STEPS = 100


@dataclass(frozen=True)
class Inversion:
    """An image's bipartite latent: image_embeds [B, D] (z_i) and latents [B, 3, S, S] (x_T),
    with the DDIM steps, guidance and caption that decode the latents back into the image."""

    image_embeds: torch.Tensor
    latents: torch.Tensor
    steps: int
    guidance_scale: float
    prompt: str


class ImageTools:
    """Mixin: expects `cfg`, `engines`, `constants`, `device`, `dtype`, `progress`,
    `encode_prompts` and `_decode` from `UnCLIP`."""

    @serialised
    @row_invariant
    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """Image(s) → CLIP image embeddings z_i [B, D] (float32, CPU). Karlo's preprocessing:
        resize to the encoder's size without cropping, CLIP normalisation."""
        if "clip_image" not in self.engines:
            raise RuntimeError("this model has no CLIP image encoder (diffusers' karlo-v1-alpha folder ships none); "
                               "load one that has it, e.g. UnCLIP.from_karlo(dir) with ViT-L-14.pt")
        pixels = resize_batch(load_images(image), self.cfg.clip.image_size)
        mean = torch.tensor(self.cfg.clip.image_mean)[None, :, None, None]
        std = torch.tensor(self.cfg.clip.image_std)[None, :, None, None]
        (embeds,) = self.engines["clip_image"](((pixels - mean) / std).to(self.device))
        return embeds.float().cpu()

    def _decoder_images(self, image) -> torch.Tensor:
        """Image(s) → [B, 3, S, S] in [−1, 1] at the decoder's resolution, on the device."""
        return (resize_batch(load_images(image), self.cfg.decoder.image_size) * 2 - 1).to(self.device)

    def _text(self, prompt: str, batch: int) -> TextConditioning:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        return self.encode_prompts([prompt]).expand(batch)

    @serialised
    @row_invariant
    @torch.no_grad()
    def invert(self, image, steps: int = 100, decoder_guidance_scale: float = 1.0, prompt: str = "") -> Inversion:
        """DDIM inversion (eta = 0) of the decoder: z_i from the CLIP image encoder, then the x_T
        that `decode(inv.image_embeds, inv.latents, steps=inv.steps)` turns back into the image.

        :param steps: DDIM steps (more: closer reconstruction; on the default model 100 steps give
            33–47 dB at 64×64, 50 steps 30–45 dB).
        :param decoder_guidance_scale: guidance during inversion (and the decode that reverses
            it); 1 = the conditional network alone, the most exact.
        """
        steps = check_int("steps", steps, 2, 1000)
        scale = check_scale("decoder_guidance_scale", decoder_guidance_scale)
        images = load_images(image)  # read and checked once, used by both encoders
        embeds = self.encode_image(images).to(self.device)
        b = embeds.shape[0]
        uncond = self._text("", b) if scale != 1.0 else None
        latents = edits.ddim_invert(
            self.engines["decoder_context"], self.engines["decoder_step"], self.cfg.decoder.diffusion,
            self.constants, self._decoder_images(images), embeds, self._text(prompt, b), uncond,
            make_step_table(self.cfg.decoder.diffusion, steps, "ddim").to(self.device), scale, self.progress,
        )
        return Inversion(embeds.cpu(), latents.float().cpu(), steps, scale, prompt)

    @serialised
    @row_invariant
    @torch.no_grad()
    def decode(
        self,
        image_embeds: torch.Tensor,
        latents: torch.Tensor | None = None,
        *,
        eta: float = 0.0,
        steps: int | None = None,
        decoder_guidance_scale: float | None = None,
        prompt: str = "",
        seed: int | None = None,
        super_res: bool = True,
        super_res_steps: int | Sequence[int] | None = None,
        output_type: str = "pil",
        noise: SamplingNoise | None = None,
    ):
        """CLIP image embeddings [B, D] → images.

        `super_res`: run the super-res chain to the model's default image size (as `generate`
        does without `size`); False: the decoder's images. `super_res_steps`: as `generate` takes it.

        `noise`: the run's noise, as `draw_noise(B, 1, steps, super_res_steps, generator)` gives it
        (its prior part is not used; with `latents`, the decoder's x_T is `latents`); overrides `seed`.

        Without `latents`: the model's sampler from fresh noise (Karlo's variations). With
        `latents` (x_T [B, 3, S, S], e.g. from `invert`): DDIM with `eta` from x_T (eta = 0
        reconstructs; eta > 0 adds fresh noise each step, the paper's variations).
        Steps and guidance left as None take the model's defaults (without latents) or 100 and
        1.0, `invert`'s defaults (with latents: use the values the latents were inverted with).
        """
        embeds = _check_embeds(image_embeds, self.cfg.clip.embed_dim).to(self.device)
        b = embeds.shape[0]
        s = self.cfg.sampling
        if latents is None:
            steps = check_int("steps", s.decoder_steps if steps is None else steps, 1, 1000)
            scale = check_scale("decoder_guidance_scale",
                                s.decoder_guidance_scale if decoder_guidance_scale is None else decoder_guidance_scale)
        else:
            steps = check_int("steps", INVERSION_STEPS if steps is None else steps, 2, 1000)
            scale = check_scale("decoder_guidance_scale", 1.0 if decoder_guidance_scale is None
                                else decoder_guidance_scale)
            size = self.cfg.decoder.image_size
            latents = _check_latents(latents, (b, 3, size, size))
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0 <= eta <= 10):
            raise ValueError(f"eta must be a number in [0, 10], got {eta!r}")
        sr_steps = check_chain(None if super_res else self.cfg.decoder.image_size, super_res_steps, self.cfg)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        generator = torch.Generator().manual_seed(check_seed(seed)) if seed is not None else None
        if noise is not None:
            if not isinstance(noise, SamplingNoise):
                raise TypeError(f"noise must be a SamplingNoise (see UnCLIP.draw_noise), got {type(noise).__name__}")
            check_noise(noise, b, {"prior_steps": 1, "decoder_steps": steps, "super_res_steps": sr_steps}, self.cfg,
                        self.prior == "ar")
        text = self._text(prompt, b)
        uncond = self._text("", b) if scale != 1.0 else None
        if noise is None:
            noise = self.draw_noise(b, 1, steps, sr_steps, generator)
        diff = self.cfg.decoder.diffusion
        if latents is None:
            table = make_step_table(diff, steps).to(self.device)
            dec_noise = noise.decoder
        else:
            table = make_step_table(diff, steps, "ddim", float(eta)).to(self.device)
            dec_noise = StageNoise(latents, noise.decoder.steps)
        small = loops.sample_decoder(
            self.engines["decoder_context"], self.engines["decoder_step"], diff, self.constants, embeds, text, uncond,
            table, dec_noise.to(self.device), scale, self.progress, learned_variance=latents is None,
            graphs=self.graphs,
        )
        images = self.sample_super_res_chain(small, sr_steps, noise.super_res)
        return UnCLIPOutput(to_output(images, output_type), embeds.float().cpu())

    @serialised
    @row_invariant
    @torch.no_grad()
    def variations(
        self, image, n: int = 4, *, eta: float | None = None, seed: int | None = None, steps: int | None = None,
        decoder_guidance_scale: float | None = None, prompt: str = "", super_res: bool = True,
        super_res_steps: int | Sequence[int] | None = None, output_type: str = "pil",
        noise: SamplingNoise | None = None,
    ):
        """`n` variations of one image: its z_i decoded with fresh noise (eta=None, Karlo's and
        diffusers' behaviour), or DDIM with `eta` from its inverted x_T (the paper's; eta = 0
        reconstructs the image n times). `noise`: as `decode` takes it, for `n` images."""
        n = check_int("n", n, 1, 1024)
        image = _single(image, "variations takes one image")
        if eta is None:
            embeds = self.encode_image(image).expand(n, -1)
            return self.decode(embeds, steps=steps, decoder_guidance_scale=decoder_guidance_scale, prompt=prompt,
                               seed=seed, super_res=super_res, super_res_steps=super_res_steps,
                               output_type=output_type, noise=noise)
        inv = self.invert(image, INVERSION_STEPS if steps is None else steps,
                          1.0 if decoder_guidance_scale is None else decoder_guidance_scale, prompt)
        return self.decode(inv.image_embeds.expand(n, -1), inv.latents.expand(n, -1, -1, -1), eta=eta,
                           steps=inv.steps, decoder_guidance_scale=inv.guidance_scale, prompt=prompt, seed=seed,
                           super_res=super_res, super_res_steps=super_res_steps, output_type=output_type,
                           noise=noise)

    @serialised
    @row_invariant
    @torch.no_grad()
    def interpolate(
        self, image_a, image_b, steps: int = 5, *, path: str = "inverted", seed: int | None = None,
        ddim_steps: int = 100, super_res: bool = True, output_type: str = "pil",
    ):
        """`steps` images from `image_a` to `image_b`: z_i by spherical interpolation (endpoints
        exact), and x_T either the slerp of both images' inverted latents (`path="inverted"`: the
        endpoints reconstruct the inputs) or one shared random x_T (`"fixed_noise"`)."""
        steps = check_int("steps", steps, 2, 1024)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        t = torch.linspace(0, 1, steps, dtype=torch.float64)
        size = self.cfg.decoder.image_size
        pair = [_single(image_a, "interpolate takes one image on each side", "image_a"),
                _single(image_b, "interpolate takes one image on each side", "image_b")]
        if path == "inverted":
            inv = self.invert(pair, ddim_steps)
            z = edits.slerp(inv.image_embeds[0], inv.image_embeds[1], t)
            x = edits.slerp(inv.latents[0].flatten(), inv.latents[1].flatten(), t).view(steps, 3, size, size)
        else:
            embeds = self.encode_image(pair)
            z = edits.slerp(embeds[0], embeds[1], t)
            gen = torch.Generator().manual_seed(check_seed(seed)) if seed is not None else None
            x = torch.randn((1, 3, size, size), generator=gen).expand(steps, -1, -1, -1)
        return self.decode(z, x, eta=0.0, steps=ddim_steps, decoder_guidance_scale=1.0, seed=seed,
                           super_res=super_res, output_type=output_type)

    @serialised
    @row_invariant
    @torch.no_grad()
    def text_diff(
        self, image, from_caption: str, to_caption: str, amounts=(0.0, 0.15, 0.3, 0.45, 0.6), *,
        seed: int | None = None, ddim_steps: int = 100, super_res: bool = True, output_type: str = "pil",
    ):
        """Move an image along a caption change (the paper's text diffs): z_d = normalise(z_t(to)
        − z_t(from)), z_θ = slerp(ẑ_i, z_d, θ) rescaled to ‖z_i‖, each decoded from the image's
        inverted x_T. One image per amount θ ∈ [0, 1] (θ = 0 reconstructs the image). The paper
        sweeps θ up to 0.25–0.5; on the default model the colour flips around 0.5–0.6, and past
        0.75 the image's own content (background, shape) is lost."""
        for name, caption in (("from_caption", from_caption), ("to_caption", to_caption)):
            if not isinstance(caption, str):
                raise TypeError(f"{name} must be a string, got {type(caption).__name__}")
        theta = torch.as_tensor(amounts, dtype=torch.float64).flatten()
        if theta.numel() == 0 or not torch.isfinite(theta).all() or (theta < 0).any() or (theta > 1).any():
            raise ValueError(f"amounts must be numbers in [0, 1], got {amounts!r}")
        inv = self.invert(_single(image, "text_diff takes one image"), ddim_steps)
        captions = self.encode_prompts([from_caption, to_caption]).embed.float().cpu()
        z_d = edits.text_diff_direction(captions[0], captions[1])
        z_i = inv.image_embeds[0]
        norm = z_i.norm()
        z = edits.slerp(z_i / norm, z_d, theta) * norm
        k = theta.numel()
        return self.decode(z, inv.latents.expand(k, -1, -1, -1), eta=0.0, steps=inv.steps,
                           decoder_guidance_scale=inv.guidance_scale, seed=seed, super_res=super_res,
                           output_type=output_type)


def _single(image, message: str, name: str = "image") -> torch.Tensor:
    """The one image of an input that must hold exactly one, as a [3, H, W] tensor."""
    images = load_images(image, name)
    if len(images) != 1:
        raise ValueError(f"{message}, got {len(images)}")
    return images[0]


def _check_embeds(embeds, dim: int) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        raise TypeError(f"image_embeds must be a float tensor [B, {dim}], got {type(embeds).__name__}")
    if embeds.ndim == 1:
        embeds = embeds[None]
    if embeds.ndim != 2 or embeds.shape[1] != dim or embeds.shape[0] < 1:
        raise ValueError(f"image_embeds must have shape [B, {dim}], got {tuple(embeds.shape)}")
    if not torch.isfinite(embeds).all():
        raise ValueError("image_embeds contain NaN or infinite values")
    return embeds.float()


def _check_latents(latents, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
        raise TypeError(f"latents must be a float tensor {list(shape)}, got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {list(shape)} (one per embedding), got {tuple(latents.shape)}")
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or infinite values")
    return latents.float()
