"""`python -m train.evaluate_edits [--model weights/default] [--backend torch]`: the image
tools of `UnCLIP` (inversion, variations, interpolation, text diffs) measured on the default
model's domain, on rendered scenes of the held-out combinations, read from pixels
(`train.attributes`, as `train.evaluate`).

Reports, as JSON:
- inversion: PSNR of decode(invert(x)) against x at the decoder's 64×64 (50 and 100 DDIM
  steps, guidance 1), mean / min / share ≥ 30 dB;
- interpolation (`path="inverted"`): PSNR of both endpoints against their inputs;
- variations, both kinds (fresh noise; DDIM eta from the inverted latent): share keeping
  foreground, background and shape, and layout spread (mean pairwise RMS distance, beside the
  same for the input repeated, which is 0);
- text diffs for three colour pairs: at each amount, the share whose foreground reads as the
  target colour and whose background is unchanged;
- seconds for each part on the device used.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from runtime import UnCLIP
from train.attributes import read_batch
from train.data import COLOURS, HELD_OUT, SHAPES, canonical_caption, render, sample_scene
from train.evaluate import _diversity

TEXT_DIFF_PAIRS = (("red", "blue"), ("yellow", "green"), ("white", "orange"))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image PSNR (dB) of [B, 3, H, W] images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return [10 * math.log10(1 / max(m, 1e-12)) for m in mse.tolist()]


def _stats(values: list[float], threshold: float) -> dict:
    return {"mean": round(sum(values) / len(values), 2), "min": round(min(values), 2),
            "share_at_least": round(sum(v >= threshold for v in values) / len(values), 4),
            "threshold": threshold, "n": len(values)}


def _scenes(rng: random.Random, combos, size: int, device) -> tuple[list, torch.Tensor]:
    scenes = [sample_scene(rng, c) for c in combos]
    return scenes, (render(scenes, size, device).cpu() + 1) / 2


@torch.no_grad()
def evaluate(pipe: UnCLIP, per_combo: int = 2, variations: int = 4, diff_images: int = 16,
             amounts=(0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0), inversion_steps=(50, 100), seed: int = 0) -> dict:
    rng = random.Random(seed)
    size = pipe.cfg.decoder.image_size
    out: dict = {}

    _, images = _scenes(rng, [c for c in HELD_OUT for _ in range(per_combo)], size, pipe.device)
    for steps in inversion_steps:
        start = time.perf_counter()
        inv = pipe.invert(list(images), steps=steps)
        rec = pipe.decode(inv.image_embeds, inv.latents, steps=steps, super_res=False, output_type="pt").images
        out[f"inversion_psnr_{steps}_steps"] = _stats(_psnr(rec, images), 30.0)
        out[f"inversion_{steps}_steps_seconds"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    ends = []
    for a, b in zip(images[0::2][:8], images[1::2][:8], strict=True):
        sweep = pipe.interpolate(a, b, steps=5, path="inverted", ddim_steps=50, super_res=False,
                                 output_type="pt").images
        ends += _psnr(sweep[[0, -1]], torch.stack([a, b]))
    out["interpolation_endpoint_psnr"] = _stats(ends, 30.0)
    out["interpolation_seconds"] = round(time.perf_counter() - start, 1)

    for kind, eta in (("fresh_noise", None), ("inverted_eta0.5", 0.5), ("inverted_eta1", 1.0)):
        start = time.perf_counter()
        kept = {"fg": 0, "bg": 0, "shape": 0, "all": 0}
        spread, total = [], 0
        scenes, sources = _scenes(rng, HELD_OUT, size, pipe.device)
        for scene, source in zip(scenes, sources, strict=True):
            result = pipe.variations(source, n=variations, eta=eta, seed=seed, steps=None if eta is None else 50,
                                     output_type="pt").images
            for r in read_batch(result * 2 - 1):
                total += 1
                kept["fg"] += r.fg == scene.fg
                kept["bg"] += r.bg == scene.bg
                kept["shape"] += r.shape == scene.shape
                kept["all"] += r.combo == (scene.fg, scene.shape, scene.bg)
            spread.append(_diversity(torch.nn.functional.interpolate(result, size=(size, size), mode="area")))
        out[f"variations_{kind}"] = {**{k: round(v / total, 4) for k, v in kept.items()},
                                     "layout_spread": round(sum(spread) / len(spread), 4), "n": total,
                                     "seconds": round(time.perf_counter() - start, 1)}

    start = time.perf_counter()
    diffs = {}
    for src, dst in TEXT_DIFF_PAIRS:
        combos = [(src, rng.choice(SHAPES), rng.choice([c for c in COLOURS if c not in (src, dst)]))
                  for _ in range(diff_images)]
        scenes, sources = _scenes(rng, combos, size, pipe.device)
        per_amount = {a: {"target_fg": 0, "bg_kept": 0} for a in amounts}
        for scene, source in zip(scenes, sources, strict=True):
            to_combo = (dst, scene.shape, scene.bg)
            result = pipe.text_diff(source, canonical_caption(scene.combo), canonical_caption(to_combo),
                                    amounts=amounts, seed=seed, ddim_steps=50, super_res=False,
                                    output_type="pt").images
            for a, r in zip(amounts, read_batch(result * 2 - 1), strict=True):
                per_amount[a]["target_fg"] += r.fg == dst
                per_amount[a]["bg_kept"] += r.bg == scene.bg
        diffs[f"{src}->{dst}"] = {str(a): {k: v / diff_images for k, v in d.items()} for a, d in per_amount.items()}
    out["text_diff"] = diffs
    out["text_diff_seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate_edits", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    p.add_argument("--device", default=None)
    p.add_argument("--engine-dir", default=None)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    pipe = UnCLIP(args.model, device=args.device, engine_dir=args.engine_dir, backend=args.backend, progress=False)
    result = {"device": str(pipe.device), "backend": pipe.backend, **evaluate(pipe)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
