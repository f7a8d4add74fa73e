"""`python -m train.evaluate [--model weights/default]`: quality of the default model on the
held-out (foreground, shape, background) combinations, read from pixels, not by the model's CLIP.

Reports, as a table and JSON:
- foreground colour, background colour and shape accuracy of generated 256×256 images for the
  canonical prompt of every held-out combination × `--seeds` seeds;
- text→image retrieval top-1 of the small CLIP: each held-out caption against a gallery of
  rendered held-out images (correct when the best image shows the caption's combination);
- diversity: mean pairwise RMS pixel distance between the seeds of one prompt (in [0, 1] units),
  beside the same figure for ground-truth renders of random layouts of the combination;
- seconds per image on the device used (after a warm-up call), and of the prior alone.

`--prior both` runs the same prompts and seeds through the diffusion prior and the
autoregressive prior (`UnCLIP(prior="ar")`) and prints them side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime import UnCLIP
from runtime.validate import check_chain
from train.attributes import read_batch
from train.data import HELD_OUT, canonical_caption, render, sample_scene


def _diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS distance of [N, 3, H, W] images in [0, 1]."""
    pairs = list(itertools.combinations(range(len(images)), 2))
    return sum(float((images[i] - images[j]).pow(2).mean().sqrt()) for i, j in pairs) / len(pairs)


@torch.no_grad()
def retrieval_top1(pipe: UnCLIP, per_combo: int = 4, seed: int = 0) -> float:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, c) for c in HELD_OUT for _ in range(per_combo)]
    clip = pipe.model.clip
    images = render(scenes, clip.cfg.image_size, pipe.device)
    pixels = clip.preprocess((images + 1) / 2).to(next(clip.parameters()).dtype)  # preprocess gives fp32
    img = F.normalize(clip.encode_image(pixels).float(), dim=-1)
    txt = F.normalize(pipe.encode_prompts([canonical_caption(c) for c in HELD_OUT]).embed.float(), dim=-1)
    best = (txt @ img.t()).argmax(dim=1).cpu()
    return sum(scenes[int(b)].combo == c for b, c in zip(best, HELD_OUT, strict=True)) / len(HELD_OUT)


def _synchronize(pipe: UnCLIP) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


@torch.no_grad()
def prior_seconds_per_image(pipe: UnCLIP, prompts: list[str], batch: int, **prior_kwargs) -> float:
    """Seconds per image of the prior alone (text encoding included), after a warm-up batch: the
    loops `generate` runs, on the same prompts in the same batches."""
    from runtime.sampling.ar_loop import ARSettings
    from runtime.sampling.schedules import make_step_table

    cfg = pipe.cfg
    sampling = cfg.sampling.with_overrides(**{k: v for k, v in prior_kwargs.items() if k.startswith("prior_")})
    ar_kwargs = {k: prior_kwargs.get(k) for k in ("temperature", "top_k", "top_p", "similarity_quantiles")}
    settings = ARSettings.from_arguments(**ar_kwargs, buckets=cfg.ar_prior.buckets) if pipe.prior == "ar" else None
    scale = 1.0 if settings is not None else sampling.prior_guidance_scale
    table = make_step_table(cfg.prior.diffusion, sampling.prior_steps).to(pipe.device)

    def run(part: list[str], seed: int) -> torch.Tensor:
        text = pipe.encode_prompts(part)
        noise = pipe.draw_noise(len(part), sampling.prior_steps, 1, 2, torch.Generator().manual_seed(seed)).prior
        uncond = pipe.encode_prompts([""]).expand(len(part)) if scale != 1 else None
        return pipe.sample_image_embeds(text, uncond, noise, scale, table, settings)

    run(prompts[:batch], 0)
    _synchronize(pipe)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        run(prompts[i : i + batch], 1000 + i)
    _synchronize(pipe)
    return (time.perf_counter() - start) / len(prompts)


@torch.no_grad()
def evaluate(pipe: UnCLIP, seeds: int = 4, batch: int = 16, **generate_kwargs) -> dict:
    prompts = [canonical_caption(c) for c in HELD_OUT for _ in range(seeds)]
    targets = [c for c in HELD_OUT for _ in range(seeds)]
    pipe.generate(prompts[:batch], seed=0, output_type="pt", **generate_kwargs)  # warm-up (CUDA graph capture)
    _synchronize(pipe)
    images, start = [], time.time()
    for i in range(0, len(prompts), batch):
        out = pipe.generate(prompts[i : i + batch], seed=1000 + i, output_type="pt", **generate_kwargs)
        images.append(out.images)
    _synchronize(pipe)
    seconds = (time.time() - start) / len(prompts)
    images = torch.cat(images)
    readings = read_batch(images * 2 - 1)
    n = len(targets)
    result = {
        "held_out_combos": len(HELD_OUT),
        "images": n,
        "fg_accuracy": sum(r.fg == t[0] for r, t in zip(readings, targets, strict=True)) / n,
        "shape_accuracy": sum(r.shape == t[1] for r, t in zip(readings, targets, strict=True)) / n,
        "bg_accuracy": sum(r.bg == t[2] for r, t in zip(readings, targets, strict=True)) / n,
        "clip_retrieval_top1": retrieval_top1(pipe),
        "seconds_per_image": round(seconds, 4),
        "device": str(pipe.device),
        "prior": pipe.prior,
    }
    per_prompt = images.view(len(HELD_OUT), seeds, *images.shape[1:])
    result["diversity_generated"] = sum(_diversity(g) for g in per_prompt) / len(HELD_OUT)
    rng = random.Random(7)
    truth = [(render([sample_scene(rng, c) for _ in range(seeds)], 256) + 1) / 2 for c in HELD_OUT]
    result["diversity_ground_truth"] = sum(_diversity(g) for g in truth) / len(HELD_OUT)
    result["_images"] = images
    return result


@torch.no_grad()
def oracle_accuracy(pipe: UnCLIP, seeds: int = 4, decoder_guidance_scale: float | None = None) -> dict:
    """Diagnostic: decoder + super-res from the CLIP image embeddings of rendered held-out scenes
    (the prior bypassed), read from pixels; separates prior errors from decoder errors."""
    from runtime.sampling.loops import sample_decoder
    from runtime.sampling.schedules import make_step_table

    decoder_guidance_scale = pipe.cfg.sampling.with_overrides(
        decoder_guidance_scale=decoder_guidance_scale).decoder_guidance_scale

    rng = random.Random(3)
    scenes = [sample_scene(rng, c) for c in HELD_OUT for _ in range(seeds)]
    clip, cfg, dev = pipe.model.clip, pipe.cfg, pipe.device
    pixels = clip.preprocess((render(scenes, cfg.clip.image_size, dev) + 1) / 2).to(pipe.dtype)
    image_embed = clip.encode_image(pixels).float()
    text = pipe.encode_prompts([canonical_caption(s.combo) for s in scenes])
    uncond = pipe.encode_prompts([""]).expand(len(scenes))
    b = len(scenes)
    chain = check_chain(None, None, cfg)  # each stage's own steps, up to the model's default size
    noise = pipe.draw_noise(b, 1, 25, chain, torch.Generator().manual_seed(5))
    e = pipe.engines
    small = sample_decoder(e["decoder_context"], e["decoder_step"], cfg.decoder.diffusion, pipe.constants,
                           image_embed, text, uncond, make_step_table(cfg.decoder.diffusion, 25).to(dev),
                           noise.decoder.to(dev), decoder_guidance_scale)
    big = pipe.sample_super_res_chain(small, chain, noise.super_res)
    result = {}
    for name, images in ((f"decoder_{cfg.decoder.image_size}", small), (f"super_res_{cfg.default_image_size}", big)):
        readings = read_batch(images)
        for i, attr in enumerate(("fg", "shape", "bg")):
            ok = sum(r.combo[i] == s.combo[i] for r, s in zip(readings, scenes, strict=True))
            result[f"oracle_{name}_{attr}_accuracy"] = ok / b
    return result


def save_grid(images: torch.Tensor, rows: int, path: Path, cell: int = 128) -> None:
    """Write a rows × (N/rows) grid PNG of [N, 3, H, W] images in [0, 1]."""
    from PIL import Image

    small = F.interpolate(images.float(), size=(cell, cell), mode="bilinear", antialias=True, align_corners=False)
    cols = len(images) // rows
    grid = small.view(rows, cols, 3, cell, cell).permute(0, 3, 1, 4, 2).reshape(rows * cell, cols * cell, 3)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy()).save(path)


def evaluate_prior(args: argparse.Namespace, prior: str) -> tuple[dict, torch.Tensor]:
    """The figures of one prior (and its images) for the command line's settings."""
    pipe = UnCLIP(args.model, device=args.device, progress=False, prior=prior)
    sampling = pipe.cfg.sampling.with_overrides(prior_guidance_scale=args.prior_guidance_scale,
                                                decoder_guidance_scale=args.decoder_guidance_scale)
    if prior == "ar":
        prior_kwargs = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                          ("top_p", args.top_p)) if v is not None}
        if args.similarity:
            prior_kwargs["similarity_quantiles"] = tuple(args.similarity)
    else:
        prior_kwargs = {"prior_guidance_scale": sampling.prior_guidance_scale}
    kwargs = {**prior_kwargs, "decoder_guidance_scale": sampling.decoder_guidance_scale}
    result = evaluate(pipe, seeds=args.seeds, **kwargs)
    result.update(kwargs)
    prompts = [canonical_caption(c) for c in HELD_OUT for _ in range(args.seeds)]
    result["prior_seconds_per_image"] = round(prior_seconds_per_image(pipe, prompts, 16, **prior_kwargs), 5)
    images = result.pop("_images")
    if args.oracle:
        result.update(oracle_accuracy(pipe, args.seeds, sampling.decoder_guidance_scale))
    return result, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="weights/default")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--prior", choices=("diffusion", "ar", "both"), default="diffusion",
                   help="which prior generates (both: side by side on the same prompts and seeds)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--grid", default=None, help="write a prompts × seeds PNG grid here (one per prior: PRIOR-GRID)")
    p.add_argument("--oracle", action="store_true", help="also decode true CLIP image embeddings (diagnostic)")
    p.add_argument("--prior-guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--decoder-guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--temperature", type=float, default=None, help="AR prior (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="AR prior (default: all codes)")
    p.add_argument("--top-p", type=float, default=None, help="AR prior (default: all codes)")
    p.add_argument("--similarity", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="AR prior: quantile range of the similarity token (default 0.5 1.0)")
    args = p.parse_args(argv)
    priors = ("diffusion", "ar") if args.prior == "both" else (args.prior,)
    results = {}
    for prior in priors:
        results[prior], images = evaluate_prior(args, prior)
        if args.grid:
            grid = Path(args.grid)
            save_grid(images, len(HELD_OUT), grid if len(priors) == 1 else grid.with_name(f"{prior}-{grid.name}"))
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    print(f"{'':28s}" + "".join(f"{prior:>22s}" for prior in priors))
    for key in keys:
        print(f"{key:28s}" + "".join(f"{str(results[prior].get(key, '-')):>22s}" for prior in priors))
    if args.json:
        Path(args.json).write_text(json.dumps(results if len(priors) > 1 else results[priors[0]], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
