"""Training of each stage of the default model on the generated shapes domain.

One function per stage, each a plain loop: draw a batch of scenes and caption indices on the
device (`train.batches`), render it there, compute the stage's loss (bf16 autocast on CUDA),
step AdamW, keep an fp32 EMA of the weights (the EMA weights are what ships). Captions are
tokenised once, and for the stages that condition on a frozen CLIP, encoded once. Diffusion
stages use the same schedule as sampling (`runtime.sampling.schedules`).

- CLIP: open_clip's `CLIP` trained contrastively (symmetric cross-entropy, learned temperature).
- Prior: x0-prediction MSE in standardised CLIP-image space; text dropped 20% for guidance.
- Decoder (+ text projection): MSE on the config's prediction (ε for Karlo; x0, SNR-weighted, for
  default: `_diffusion_loss`); image embedding replaced by the learned `cf_param` 10% of the time
  and the caption by "" 50% of the time (paper §2.1).
- Super-res: MSE on the config's prediction given the 64² render, blurred and noised (the paper's
  corruption of the low-resolution input), on random crops of the 256² target (the UNet has no
  attention, so, as in the paper, it trains on crops and runs on whole images); the last-step
  model is the first-steps model fine-tuned on the final timesteps only (Karlo fine-tunes its last
  step with GAN losses instead).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.clip import ClipEncoder, KarloTokenizer
from models.configs import UnCLIPConfig
from models.decoder import Decoder
from models.prior import Prior
from models.super_res import SuperRes, upsample_low_res
from runtime.sampling.inputs import TextConditioning
from runtime.sampling.schedules import alphas_cumprod
from train.batches import CaptionBank, SceneSampler
from train.data import inside_shape, render, render_windows

log = logging.getLogger("train")


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    lr: float
    warmup: int = 200
    ema: float = 0.999
    log_every: int = 200
    max_seconds: float | None = None  # stop early past this (the manifest records the steps run)
    crop: int | None = None  # super-res: train on random crops of this side


SETTINGS = {
    "clip": TrainSettings(steps=4000, batch=512, lr=5e-4),
    "prior": TrainSettings(steps=30000, batch=512, lr=3e-4),
    "decoder": TrainSettings(steps=30000, batch=128, lr=5e-4),
    "super_res": TrainSettings(steps=15000, batch=64, lr=5e-4, crop=128),
    "super_res_last": TrainSettings(steps=5000, batch=64, lr=1e-4, warmup=50, crop=128),
    "super_res_2": TrainSettings(steps=3000, batch=32, lr=5e-4, warmup=50, log_every=25, crop=64),
    "ar_prior": TrainSettings(steps=30000, batch=512, lr=3e-4),
}
LAST_STEP_MAX_T = 166  # the last-step model sees t ≤ the step before the final one (7-step schedule)


class EMA:
    """Exponential moving average of a module's parameters and buffers, with the usual warm-up
    (decay (1+n)/(10+n) until it reaches `decay`) so short runs are not dominated by the init."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.shadow.parameters()), list(module.parameters()), 1 - decay)
        for ema_b, b in zip(self.shadow.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)


def _fit(
    module: nn.Module,
    settings: TrainSettings,
    loss_fn: Callable[[int], torch.Tensor],
    name: str,
    extra_params: list[nn.Parameter] | None = None,
) -> tuple[nn.Module, list[float]]:
    """AdamW with linear warm-up then cosine decay to 0.1·lr; returns (EMA module, logged losses).
    Under a time budget the decay follows whichever is further along, steps or seconds, so a run cut
    short by time still ends annealed."""
    params = list(module.parameters()) + (extra_params or [])
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.99))

    def lr_factor(step: int, elapsed: float) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        if settings.max_seconds:
            progress = max(progress, elapsed / settings.max_seconds)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    ema = EMA(module, settings.ema)
    history, running = [], 0.0
    module.train()
    device = next(module.parameters()).device
    start = time.monotonic()
    for step in range(settings.steps):
        elapsed = time.monotonic() - start
        if settings.max_seconds is not None and elapsed > settings.max_seconds:
            log.warning("%s: time budget reached after %d of %d steps", name, step, settings.steps)
            break
        for group in opt.param_groups:
            group["lr"] = settings.lr * lr_factor(step, elapsed)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(step).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(module)
        running = running + loss.detach()  # summed on the device: no host sync per step
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            n = (step % settings.log_every) + 1
            history.append(float(running) / n)
            log.info("%s step %d/%d loss %.5f (%.1f steps/s)", name, step + 1, settings.steps, history[-1],
                     (step + 1) / (time.monotonic() - start))
            running = 0.0
    return ema.shadow, history


def _clip_pixels(clip: ClipEncoder, images: torch.Tensor) -> torch.Tensor:
    return clip.preprocess((images + 1) / 2)


class Conditioner:
    """Frozen CLIP features: of captions (through a `CaptionBank`), of images, of the empty prompt."""

    def __init__(self, clip: ClipEncoder, sampler: SceneSampler) -> None:
        self.clip = clip.eval().requires_grad_(False)
        self.sampler = sampler
        lazy = sampler.device.type == "cpu"
        self.bank = CaptionBank(sampler, clip.cfg.context_length).encode(self.clip, lazy=lazy)
        tok = KarloTokenizer(clip.cfg.context_length)([""])
        with torch.no_grad():
            embed, seq = self.clip.encode_text(tok.tokens.to(sampler.device))
        self.empty = TextConditioning(embed.float(), seq.float(), tok.mask.to(sampler.device))

    @torch.no_grad()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(_clip_pixels(self.clip, images)).float()

    def text(self, index: torch.Tensor, drop: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embed, seq, mask) of the captions at `index`, each replaced by the empty prompt's with
        probability `drop` (classifier-free guidance training)."""
        embed, seq, mask = self.bank.text(index)
        b = embed.shape[0]
        dropped = self.sampler.uniform(b) < drop
        empty = self.empty.expand(b)
        return (
            torch.where(dropped[:, None], empty.embed, embed),
            torch.where(dropped[:, None, None], empty.tokens, seq),
            torch.where(dropped[:, None], empty.mask, mask),
        )


def train_clip(cfg: UnCLIPConfig, settings: TrainSettings, device: torch.device, seed: int) -> ClipEncoder:
    torch.manual_seed(seed)
    sampler = SceneSampler(device, seed)
    bank = CaptionBank(sampler, cfg.clip.context_length)
    clip = ClipEncoder(cfg.clip).to(device)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))

    def loss_fn(step: int) -> torch.Tensor:
        scenes, captions = sampler.scenes(settings.batch)
        images = render(scenes, cfg.clip.image_size)
        img = F.normalize(clip.encode_image(_clip_pixels(clip, images)).float(), dim=-1)
        txt = F.normalize(clip.encode_text(bank.tokens[captions])[0].float(), dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()
        # Captions of the same combination are true matches too: soft targets over them. (A caption
        # that leaves out the background also matches other backgrounds; ignored, as rare.)
        keys = scenes.combo_keys()
        same = (keys[:, None] == keys[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2

    ema, _ = _fit(clip, settings, loss_fn, "clip", [logit_scale])
    return ema


def _noised(x0: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn_like(x0)
    a = ac[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps


def _diffusion_loss(
    diffusion, out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, ac: torch.Tensor
) -> torch.Tensor:
    """MSE on what the stage predicts. ε: plain (the DDPM loss). x0: weighted per timestep by
    clamp(SNR, 1, 5) — at least the x0 loss (Salimans & Ho's truncated-SNR weighting, so the
    high-noise steps that fix colours and layout still count) and at most 5× it (Hang et al.'s
    min-SNR-5, so nearly clean steps don't dominate)."""
    if diffusion.prediction == "epsilon":
        return F.mse_loss(out.float(), eps)
    snr = ac[t] / (1 - ac[t])
    per_sample = (out.float() - x0).pow(2).flatten(1).mean(1)
    return (snr.clamp(1, 5) * per_sample).mean()


def clip_statistics(cond: Conditioner, n: int = 8192) -> tuple[torch.Tensor, ...]:
    """Mean and std of CLIP image embeddings over `n` training images."""
    feats, batch = [], min(n, 512)
    for _ in range(max(1, n // batch)):
        scenes, _ = cond.sampler.scenes(batch)
        feats.append(cond.image(render(scenes, cond.clip.cfg.image_size)))
    f = torch.cat(feats)
    return f.mean(0), f.std(0)


def _schedule(diffusion, device: torch.device) -> torch.Tensor:
    return alphas_cumprod(diffusion.schedule, diffusion.num_train_timesteps).float().to(device)


def _load(module: nn.Module, init_state: dict | None) -> None:
    if init_state is not None:
        module.load_state_dict({k: v.float() for k, v in init_state.items()})


def train_prior(
    cfg: UnCLIPConfig, clip: ClipEncoder, settings: TrainSettings, device: torch.device, seed: int,
    init_state: dict | None = None,
) -> Prior:
    """:param init_state: weights to continue from (a previous run's prior, its CLIP statistics
    kept) instead of an init."""
    torch.manual_seed(seed)
    cond = Conditioner(clip, SceneSampler(device, seed))
    prior = Prior(cfg.prior).to(device)
    mean, std = clip_statistics(cond, n=16 * settings.batch)
    prior.clip_mean.copy_(mean[None])
    prior.clip_std.copy_(std[None])
    _load(prior, init_state)
    ac = _schedule(cfg.prior.diffusion, device)

    def loss_fn(step: int) -> torch.Tensor:
        scenes, captions = cond.sampler.scenes(settings.batch)
        z0 = prior.normalize(cond.image(render(scenes, cfg.clip.image_size)))
        embed, seq, mask = cond.text(captions, 0.2)
        t = torch.randint(0, len(ac), (settings.batch,), device=device)
        x_t, _ = _noised(z0, t, ac)
        return F.mse_loss(prior(x_t, t, embed, seq, mask).float(), z0)

    ema, _ = _fit(prior, settings, loss_fn, "prior")
    return ema


def train_decoder(
    cfg: UnCLIPConfig, clip: ClipEncoder, settings: TrainSettings, device: torch.device, seed: int,
    init_state: dict | None = None,
) -> Decoder:
    """:param init_state: weights to continue from (a previous run's decoder) instead of an init."""
    torch.manual_seed(seed)
    cond = Conditioner(clip, SceneSampler(device, seed))
    decoder = Decoder(cfg.decoder, cfg.text_proj).to(device, memory_format=torch.channels_last)  # faster convs
    nn.init.normal_(decoder.text_proj.cf_param, std=0.02)
    _load(decoder, init_state)
    ac = _schedule(cfg.decoder.diffusion, device)

    def loss_fn(step: int) -> torch.Tensor:
        scenes, captions = cond.sampler.scenes(settings.batch)
        x0 = render(scenes, cfg.decoder.image_size).contiguous(memory_format=torch.channels_last)
        same_size = cfg.clip.image_size == cfg.decoder.image_size
        image_embed = cond.image(x0 if same_size else render(scenes, cfg.clip.image_size))
        drop_img = cond.sampler.uniform(settings.batch) < 0.1
        image_embed = torch.where(drop_img[:, None], decoder.text_proj.unconditional_image_embed(settings.batch),
                                  image_embed)
        embed, seq, mask = cond.text(captions, 0.5)
        t = torch.randint(0, len(ac), (settings.batch,), device=device)
        x_t, eps = _noised(x0, t, ac)
        out = decoder(x_t, t, image_embed, embed, seq, mask)
        return _diffusion_loss(cfg.decoder.diffusion, out, x0, eps, t, ac)

    ema, _ = _fit(decoder, settings, loss_fn, "decoder")
    return ema


def degrade(low_res: torch.Tensor, gen: torch.Generator, radius: int = 2) -> torch.Tensor:
    """The paper's corruption of the low-res conditioning: Gaussian blur (σ uniform in
    [0.2, 1] pixels at 64², per image) and a little noise (std uniform in [0, 0.04])."""
    b, c, h, w = low_res.shape
    dev = low_res.device
    sigma = torch.rand(b, generator=gen, device=dev) * 0.8 + 0.2
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32, device=dev)
    kernels = torch.exp(-(xs[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B·C, K]
    x = F.pad(low_res.float(), (radius,) * 4, mode="replicate").reshape(1, b * c, h + 2 * radius, w + 2 * radius)
    x = F.conv2d(x, kernels[:, None, None, :], groups=b * c)  # separable blur: one grouped conv per axis
    x = F.conv2d(x, kernels[:, None, :, None], groups=b * c).view(b, c, h, w)
    noise_std = (torch.rand(b, generator=gen, device=dev) * 0.04).view(-1, 1, 1, 1)
    return (x + noise_std * torch.randn(x.shape, generator=gen, device=dev)).clamp(-1, 1)


def degrade_bsr(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The paper's corruption of a later upsampler's input, beyond blur (BSR-style, as for its
    256 → 1024 stage): per image, in this order, a Gaussian blur (σ uniform in [0.2, 1.5] pixels),
    a downscale by a factor uniform in [1, 2] and back (bilinear, or area then bicubic), Gaussian
    noise (std uniform in [0, 0.05]) and a JPEG round trip (quality uniform in [30, 95]).
    [B, 3, H, W] in [−1, 1] → the same shape."""
    from torchvision.io import decode_jpeg, encode_jpeg

    b, _, h, w = image.shape
    dev = image.device
    out = []
    for i in range(b):
        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=gen, device=dev))

        x = _blur(image[i : i + 1].float(), uniform(0.2, 1.5))
        factor = uniform(1.0, 2.0)
        small = (max(8, round(h / factor)), max(8, round(w / factor)))
        if uniform(0, 1) < 0.5:
            x = F.interpolate(F.interpolate(x, size=small, mode="bilinear", align_corners=False), size=(h, w),
                              mode="bilinear", align_corners=False)
        else:
            x = F.interpolate(F.interpolate(x, size=small, mode="area"), size=(h, w), mode="bicubic",
                              align_corners=False)
        x = x + uniform(0.0, 0.05) * torch.randn(x.shape, generator=gen, device=dev)
        pixels = ((x.clamp(-1, 1)[0] + 1) * 127.5).round().to(torch.uint8).cpu()
        jpeg = decode_jpeg(encode_jpeg(pixels, quality=round(uniform(30, 95))))
        out.append(jpeg.to(dev).float() / 127.5 - 1)
    return torch.stack(out)


def _blur(x: torch.Tensor, sigma: float, radius: int = 4) -> torch.Tensor:
    """Separable Gaussian blur of [1, C, H, W] (replicated borders)."""
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-(xs**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(x.shape[1], 1)  # [C, K]
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k[:, None, None, :], groups=x.shape[1])
    return F.conv2d(x, k[:, None, :, None], groups=x.shape[1])


def _random_crops(images: list[torch.Tensor], crop: int, gen: torch.Generator, cells: int = 3) -> list[torch.Tensor]:
    """A random crop window per image of the batch (the same for every tensor given), placed on a
    `cells`×`cells` grid of offsets from one edge to the other: every window touches an image edge
    unless it is the centre one, so the model learns the borders it meets on whole images, and
    offsets stay multiples of (side − crop)/(cells − 1), aligned with the UNet's downsampling."""
    b, _, h, w = images[0].shape
    dev = images[0].device
    top = torch.randint(0, cells, (b,), generator=gen, device=dev) * ((h - crop) // (cells - 1))
    left = torch.randint(0, cells, (b,), generator=gen, device=dev) * ((w - crop) // (cells - 1))
    rows = (top[:, None] + torch.arange(crop, device=dev)[None])[:, None, :, None]  # [B, 1, crop, 1]
    cols = (left[:, None] + torch.arange(crop, device=dev)[None])[:, None, None, :]  # [B, 1, 1, crop]
    batch = torch.arange(b, device=dev)[:, None, None, None]
    out = []
    for x in images:
        chans = torch.arange(x.shape[1], device=dev)[None, :, None, None]
        out.append(x[batch, chans, rows, cols])
    return out


def _later_stage_crops(scenes, size: int, small: int, crop: int, gen: torch.Generator,
                       margin: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(target crops [B, 3, crop, crop] of the scenes rendered at `size`, the same windows of their
    `small` renders corrupted by `degrade_bsr` and upsampled to `size`). Only the windows are
    rendered and corrupted — the small one with `margin` pixels around it, so that the blur, the
    resampling and the upsampling see real neighbours, then cut away. Both get one random colour
    gain and offset per image and channel. Three windows in four are
    centred near a random point of the shape's outline (where an upsampler has work to do; a window
    inside a plain area teaches little), the others anywhere; offsets are multiples of 16 (the
    UNet's downsampling, and the small image's pixels), clamped to the image."""
    factor = size // small
    b, dev = len(scenes), scenes.fg.device
    # the outline along a random ray from the centre: the first of 64 points along it outside the shape
    angle = 2 * math.pi * torch.rand(b, generator=gen, device=dev)
    along = scenes.radius[:, None] * torch.linspace(0.0, 1.05, 64, device=dev)[None]  # [B, 64]
    inside = inside_shape(scenes, scenes.cx[:, None] + along * torch.cos(angle)[:, None],
                     scenes.cy[:, None] + along * torch.sin(angle)[:, None])
    reach = along.gather(1, (~inside).float().argmax(1, keepdim=True))[:, 0]
    on_edge_y = (scenes.cy + reach * torch.sin(angle)) * size - crop / 2
    on_edge_x = (scenes.cx + reach * torch.cos(angle)) * size - crop / 2
    anywhere = torch.rand(2, b, generator=gen, device=dev) * (size - crop)
    edge = torch.rand(b, generator=gen, device=dev) < 0.75
    top, left = (torch.where(edge, on_edge, free) for on_edge, free in ((on_edge_y, anywhere[0]),
                                                                       (on_edge_x, anywhere[1])))
    top, left = ((v.clamp(0, size - crop) / 16).floor().long() * 16 for v in (top, left))
    x0 = render_windows(scenes, size, top, left, crop)
    low = render_windows(scenes, small, top // factor - margin, left // factor - margin, crop // factor + 2 * margin)
    # the same random colour shift of both: an upsampler keeps its input's colours, which the stage
    # before it never gets exactly right (a model shown only the palette's overshoots off it)
    gain = 1 + 0.2 * (2 * torch.rand(b, 3, 1, 1, generator=gen, device=dev) - 1)
    offset = 0.2 * (2 * torch.rand(b, 3, 1, 1, generator=gen, device=dev) - 1)
    x0, low = ((v * gain + offset).clamp(-1, 1) for v in (x0, low))
    low = upsample_low_res(degrade_bsr(low, gen), low.shape[-1] * factor)
    keep = slice(margin * factor, margin * factor + crop)
    return x0, low[:, :, keep, keep].contiguous()


def train_super_res(
    cfg: UnCLIPConfig, settings: TrainSettings, last_settings: TrainSettings, device: torch.device, seed: int,
    init_state: dict | None = None, stage: int = 0,
) -> SuperRes:
    """Super-res stage `stage` of the chain, from the size before it to its own.

    :param init_state: weights to continue from (a previous run's super-res) instead of an init."""
    torch.manual_seed(seed)
    sampler = SceneSampler(device, seed)
    stage_cfg = cfg.super_res[stage]
    sr = SuperRes(stage_cfg).to(device, memory_format=torch.channels_last)  # faster convs
    _load(sr, init_state)
    ac = _schedule(stage_cfg.diffusion, device)
    size, small = cfg.image_sizes[stage + 1], cfg.image_sizes[stage]

    def make_loss(unet: nn.Module, t_max: int, s: TrainSettings) -> Callable[[int], torch.Tensor]:
        def loss_fn(step: int) -> torch.Tensor:
            scenes, _ = sampler.scenes(s.batch)
            if stage == 0:  # the decoder's 64² image: blur and a little noise (the paper's first upsampler)
                x0 = render(scenes, size)
                low = upsample_low_res(degrade(render(scenes, small), sampler.gen), size)
                if s.crop is not None and s.crop < size:
                    x0, low = _random_crops([x0, low], s.crop, sampler.gen)
            else:  # a later stage: the BSR-style corruption, and only the crops rendered at the full size
                x0, low = _later_stage_crops(scenes, size, small, s.crop or size, sampler.gen)
            t = torch.randint(0, t_max, (s.batch,), device=device)
            x_t, eps = _noised(x0, t, ac)
            x_in = torch.cat([x_t, low], 1).contiguous(memory_format=torch.channels_last)
            return _diffusion_loss(stage_cfg.diffusion, unet(x_in, t), x0, eps, t, ac)

        return loss_fn

    name = "super_res" if stage == 0 else f"super_res_{stage + 1}"
    first, _ = _fit(sr.first_steps, settings, make_loss(sr.first_steps, len(ac), settings), name)
    sr.first_steps = first
    if sr.last_step is None:  # the stage runs its last step with the same UNet
        return sr
    last_start = copy.deepcopy(first).train().requires_grad_(True)
    if init_state is not None:  # continue the last-step model from its own previous weights
        last_start.load_state_dict({k[len("last_step.") :]: v.float() for k, v in init_state.items()
                                    if k.startswith("last_step.")})
    last, _ = _fit(last_start, last_settings, make_loss(last_start, LAST_STEP_MAX_T + 1, last_settings),
                   "super_res_last")
    sr.last_step = last
    return sr
