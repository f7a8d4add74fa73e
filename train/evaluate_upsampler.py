"""`python -m train.evaluate_upsampler`: what a later super-res stage does to the images before it.

For the held-out prompts × seeds, the images at the stage's input size and at its output size
from the same seed (a run stopped at the input size gives exactly the images the longer run
upsamples: later stages' noise is drawn after), then: the attributes (foreground, background,
shape) read from pixels at both sizes — how often the upsampled image keeps the input's, and how
often each matches the prompt; the PSNR of the output downscaled to the input size (area) against
the input; the seconds per image of the stage.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime import UnCLIP
from train.attributes import read_batch
from train.data import HELD_OUT, canonical_caption
from train.evaluate import save_grid


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf for identical images)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@torch.no_grad()
def evaluate(pipe: UnCLIP, size: int, seeds: int = 2, batch: int = 4) -> tuple[dict, torch.Tensor]:
    """The figures of the super-res stage whose output is `size` (and its images in [0, 1])."""
    sizes = pipe.cfg.image_sizes
    if size not in sizes[1:]:
        raise ValueError(f"size must be a super-res stage's output size {list(sizes[1:])}, got {size}")
    before = sizes[sizes.index(size) - 1]
    prompts = [canonical_caption(c) for c in HELD_OUT for _ in range(seeds)]
    targets = [c for c in HELD_OUT for _ in range(seeds)]
    small, big, seconds = [], [], 0.0
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        small.append(pipe.generate(part, seed=1000 + i, size=before, output_type="pt").images)
        start = time.perf_counter()
        big.append(pipe.generate(part, seed=1000 + i, size=size, output_type="pt").images)
        seconds += time.perf_counter() - start
    small, big = torch.cat(small), torch.cat(big)
    down = F.interpolate(big, size=(before, before), mode="area")
    read_small, read_big = read_batch(small * 2 - 1), read_batch(big * 2 - 1)
    n = len(prompts)
    result: dict = {"images": n, "held_out_combos": len(HELD_OUT), "input_size": before, "size": size,
                    "device": str(pipe.device)}
    for i, attr in enumerate(("fg", "shape", "bg")):
        keep = sum(getattr(a, attr) == getattr(b, attr) for a, b in zip(read_small, read_big, strict=True))
        result[f"{attr}_kept"] = keep / n
        result[f"{attr}_accuracy_{before}"] = sum(r.combo[i] == t[i] for r, t in zip(read_small, targets,
                                                                                      strict=True)) / n
        result[f"{attr}_accuracy_{size}"] = sum(r.combo[i] == t[i] for r, t in zip(read_big, targets,
                                                                                   strict=True)) / n
    result["all_kept"] = sum(a.combo == b.combo for a, b in zip(read_small, read_big, strict=True)) / n
    values = [psnr(d, s) for d, s in zip(down, small, strict=True)]
    result["psnr_downscaled_vs_input_db"] = {"mean": sum(values) / n, "min": min(values)}
    result["seconds_per_image_to_size"] = round(seconds / n, 2)
    return result, big


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate_upsampler", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="weights/default")
    p.add_argument("--size", type=int, default=1024, help="the output size of the stage to evaluate")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--grid", default=None, help="write a prompts × seeds PNG grid of the upsampled images here")
    p.add_argument("--cell", type=int, default=256, help="grid cell side in pixels")
    args = p.parse_args(argv)
    pipe = UnCLIP(args.model, device=args.device, progress=False)
    result, images = evaluate(pipe, args.size, args.seeds)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.grid:
        save_grid(images, len(HELD_OUT), Path(args.grid), cell=args.cell)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
