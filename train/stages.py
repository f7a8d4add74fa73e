"""Training of each stage of the default model on the generated shapes domain.

One function per stage, each a plain loop: draw a batch of scenes (`train.data`), render it on
the device, compute the stage's loss, step AdamW, keep an EMA of the weights (the EMA weights are
what ships). Diffusion stages use the same schedule as sampling (`runtime.sampling`).

- CLIP: open_clip's `CLIP` trained contrastively (symmetric cross-entropy, learned temperature).
- Prior: x0-prediction MSE in standardised CLIP-image space; text dropped 20% for guidance.
- Decoder (+ text projection): ε-prediction MSE; image embedding replaced by the learned
  `cf_param` 10% of the time and the caption by "" 50% of the time (paper §2.1).
- Super-res: ε-prediction MSE at 256² given the 64² render, blurred and noised (the paper's
  corruption of the low-resolution input); the last-step model is the first-steps model
  fine-tuned on the final timesteps only (Karlo fine-tunes its last step with GAN losses instead).
"""

from __future__ import annotations

import copy
import logging
import math
import random
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
from runtime.loops import TextConditioning
from runtime.sampling import alphas_cumprod
from train.data import combo_index, render, sample_batch

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


SETTINGS = {
    "clip": TrainSettings(steps=4000, batch=512, lr=5e-4),
    "prior": TrainSettings(steps=6000, batch=512, lr=3e-4),
    "decoder": TrainSettings(steps=3000, batch=256, lr=5e-4),
    "super_res": TrainSettings(steps=2000, batch=48, lr=5e-4),
    "super_res_last": TrainSettings(steps=600, batch=48, lr=1e-4, warmup=50),
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
        for ema_p, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p, 1 - decay)
        for ema_b, b in zip(self.shadow.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)


def _fit(
    module: nn.Module,
    settings: TrainSettings,
    loss_fn: Callable[[int], torch.Tensor],
    name: str,
    extra_params: list[nn.Parameter] | None = None,
) -> tuple[nn.Module, list[float]]:
    """AdamW with linear warm-up then cosine decay; returns (EMA module, logged losses)."""
    params = list(module.parameters()) + (extra_params or [])
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = EMA(module, settings.ema)
    history, running = [], 0.0
    module.train()
    start = time.monotonic()
    for step in range(settings.steps):
        if settings.max_seconds is not None and time.monotonic() - start > settings.max_seconds:
            log.warning("%s: time budget reached after %d of %d steps", name, step, settings.steps)
            break
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(module)
        running += float(loss.detach())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            n = (step % settings.log_every) + 1
            history.append(running / n)
            log.info("%s step %d/%d loss %.5f", name, step + 1, settings.steps, running / n)
            running = 0.0
    return ema.shadow, history


def _clip_pixels(clip: ClipEncoder, images: torch.Tensor) -> torch.Tensor:
    return clip.preprocess((images + 1) / 2)


class Conditioner:
    """Frozen CLIP features of captions and images, and the empty prompt's features."""

    def __init__(self, clip: ClipEncoder, device: torch.device) -> None:
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = KarloTokenizer(clip.cfg.context_length)
        self.device = device
        self.empty = TextConditioning(*self.text([""]))

    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(captions)
        embed, seq = self.clip.encode_text(tok.tokens.to(self.device))
        return embed, seq, tok.mask.to(self.device)

    @torch.no_grad()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(_clip_pixels(self.clip, images))

    def drop_text(self, text, p: float, gen: torch.Generator):
        """Replace each row's text by the empty prompt's with probability p."""
        embed, seq, mask = text
        b = embed.shape[0]
        drop = torch.rand(b, generator=gen, device="cpu").to(self.device) < p
        empty = self.empty.expand(b)
        return (
            torch.where(drop[:, None], empty.embed, embed),
            torch.where(drop[:, None, None], empty.tokens, seq),
            torch.where(drop[:, None], empty.mask, mask),
        )


def train_clip(cfg: UnCLIPConfig, settings: TrainSettings, device: torch.device, seed: int) -> ClipEncoder:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    clip = ClipEncoder(cfg.clip).to(device)
    tokenizer = KarloTokenizer(cfg.clip.context_length)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))

    def loss_fn(step: int) -> torch.Tensor:
        scenes, captions = sample_batch(rng, settings.batch)
        images = render(scenes, cfg.clip.image_size, device)
        img = F.normalize(clip.encode_image(_clip_pixels(clip, images)), dim=-1)
        txt = F.normalize(clip.encode_text(tokenizer(captions).tokens.to(device))[0], dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()
        # Captions of the same combination are true matches too: soft targets over them. (A caption
        # that leaves out the background also matches other backgrounds; ignored, as rare.)
        keys = torch.tensor([combo_index(s.combo) for s in scenes], device=device)
        same = (keys[:, None] == keys[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2

    ema, _ = _fit(clip, settings, loss_fn, "clip", [logit_scale])
    return ema


def _noised(x0: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn_like(x0)
    a = ac[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps


def clip_statistics(cond: Conditioner, device: torch.device, seed: int, n: int = 8192) -> tuple[torch.Tensor, ...]:
    """Mean and std of CLIP image embeddings over `n` training images."""
    rng = random.Random(seed)
    feats, batch = [], min(n, 512)
    for _ in range(max(1, n // batch)):
        scenes, _ = sample_batch(rng, batch)
        feats.append(cond.image(render(scenes, cond.clip.cfg.image_size, device)))
    f = torch.cat(feats)
    return f.mean(0), f.std(0)


def train_prior(
    cfg: UnCLIPConfig, clip: ClipEncoder, settings: TrainSettings, device: torch.device, seed: int
) -> Prior:
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cond = Conditioner(clip, device)
    prior = Prior(cfg.prior).to(device)
    mean, std = clip_statistics(cond, device, seed + 1, n=16 * settings.batch)
    prior.clip_mean.copy_(mean[None])
    prior.clip_std.copy_(std[None])
    ac = alphas_cumprod(cfg.prior.diffusion.schedule, cfg.prior.diffusion.num_train_timesteps).float().to(device)

    def loss_fn(step: int) -> torch.Tensor:
        scenes, captions = sample_batch(rng, settings.batch)
        z0 = prior.normalize(cond.image(render(scenes, cfg.clip.image_size, device)))
        embed, seq, mask = cond.drop_text(cond.text(captions), 0.2, gen)
        t = torch.randint(0, len(ac), (settings.batch,), device=device)
        x_t, _ = _noised(z0, t, ac)
        return F.mse_loss(prior(x_t, t, embed, seq, mask), z0)

    ema, _ = _fit(prior, settings, loss_fn, "prior")
    return ema


def train_decoder(
    cfg: UnCLIPConfig, clip: ClipEncoder, settings: TrainSettings, device: torch.device, seed: int,
    init_state: dict | None = None,
) -> Decoder:
    """:param init_state: weights to continue from (a previous run's decoder) instead of an init."""
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cond = Conditioner(clip, device)
    decoder = Decoder(cfg.decoder, cfg.text_proj).to(device)
    nn.init.normal_(decoder.text_proj.cf_param, std=0.02)
    if init_state is not None:
        decoder.load_state_dict({k: v.float() for k, v in init_state.items()})
    ac = alphas_cumprod(cfg.decoder.diffusion.schedule, cfg.decoder.diffusion.num_train_timesteps).float().to(device)

    def loss_fn(step: int) -> torch.Tensor:
        scenes, captions = sample_batch(rng, settings.batch)
        x0 = render(scenes, cfg.decoder.image_size, device)
        image_embed = cond.image(render(scenes, cfg.clip.image_size, device))
        drop_img = (torch.rand(settings.batch, generator=gen) < 0.1).to(device)
        image_embed = torch.where(drop_img[:, None], decoder.text_proj.unconditional_image_embed(settings.batch),
                                  image_embed)
        embed, seq, mask = cond.drop_text(cond.text(captions), 0.5, gen)
        t = torch.randint(0, len(ac), (settings.batch,), device=device)
        x_t, eps = _noised(x0, t, ac)
        return F.mse_loss(decoder(x_t, t, image_embed, embed, seq, mask), eps)

    ema, _ = _fit(decoder, settings, loss_fn, "decoder")
    return ema


def degrade(low_res: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The paper's corruption of the low-res conditioning: Gaussian blur and a little noise."""
    b = low_res.shape[0]
    sigma = torch.rand(b, generator=gen) * 0.8 + 0.2  # pixels at 64²
    radius = 2
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-(xs[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernels = (kernels / kernels.sum(1, keepdim=True)).to(low_res.device)  # [B, K]
    x = F.pad(low_res, (radius,) * 4, mode="replicate")
    c = x.shape[1]
    out = torch.empty_like(low_res)
    for i in range(b):  # separable blur, per-sample sigma
        k = kernels[i]
        row = F.conv2d(x[i : i + 1], k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        out[i : i + 1] = F.conv2d(row, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    noise_std = (torch.rand(b, generator=gen) * 0.04).to(low_res.device).view(-1, 1, 1, 1)
    return (out + noise_std * torch.randn(out.shape, generator=gen).to(low_res.device)).clamp(-1, 1)


def train_super_res(
    cfg: UnCLIPConfig, settings: TrainSettings, last_settings: TrainSettings, device: torch.device, seed: int,
    init_state: dict | None = None,
) -> SuperRes:
    """:param init_state: weights to continue from (a previous run's super-res) instead of an init."""
    torch.manual_seed(seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    sr = SuperRes(cfg.super_res).to(device)
    if init_state is not None:
        sr.load_state_dict({k: v.float() for k, v in init_state.items()})
    ac = alphas_cumprod(cfg.super_res.diffusion.schedule, cfg.super_res.diffusion.num_train_timesteps)
    ac = ac.float().to(device)
    size, small = cfg.super_res.image_size, cfg.decoder.image_size

    def make_loss(unet: nn.Module, t_max: int, batch: int) -> Callable[[int], torch.Tensor]:
        def loss_fn(step: int) -> torch.Tensor:
            scenes, _ = sample_batch(rng, batch)
            x0 = render(scenes, size, device)
            low = upsample_low_res(degrade(render(scenes, small, device), gen), size)
            t = torch.randint(0, t_max, (batch,), device=device)
            x_t, eps = _noised(x0, t, ac)
            return F.mse_loss(unet(torch.cat([x_t, low], 1), t), eps)

        return loss_fn

    first, _ = _fit(sr.first_steps, settings, make_loss(sr.first_steps, len(ac), settings.batch), "super_res")
    sr.first_steps = first
    last_start = copy.deepcopy(first).train().requires_grad_(True)
    last, _ = _fit(last_start, last_settings, make_loss(last_start, LAST_STEP_MAX_T + 1, last_settings.batch),
                   "super_res_last")
    sr.last_step = last
    return sr
