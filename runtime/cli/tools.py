"""Command line of the image tools: `python -m runtime TOOL …` with TOOL one of

    variations IMAGE [-n 4] [--eta E] [--seed S]            -o out.png
    interpolate IMAGE_A IMAGE_B [--steps 5] [--path inverted|fixed_noise] [--seed S] -o out.png
    text-diff IMAGE --from CAPTION --to CAPTION [--amounts 0,0.15,0.3,0.45,0.6]  -o out.png
    invert IMAGE [--steps 100]                              -o latent.safetensors

Images are written as `out-0.png`, `out-1.png`, … (or .jpg, .webp, .bmp, .tif: the format the
suffix names); `invert` writes z_i and x_T (and the steps
and guidance that decode them) to a safetensors file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.cli.common import BACKEND_CHOICES

TOOLS = ("variations", "interpolate", "text-diff", "invert")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime", description="unCLIP image tools")
    sub = p.add_subparsers(dest="tool", required=True)
    v = sub.add_parser("variations", help="variations of one image")
    v.add_argument("image")
    v.add_argument("-n", type=int, default=4)
    v.add_argument("--eta", type=float, default=None, help="DDIM eta from the inverted latent (default: fresh noise)")
    i = sub.add_parser("interpolate", help="from one image to another")
    i.add_argument("image_a")
    i.add_argument("image_b")
    i.add_argument("--steps", type=int, default=5)
    i.add_argument("--path", default="inverted", choices=("inverted", "fixed_noise"))
    t = sub.add_parser("text-diff", help="move an image along a caption change")
    t.add_argument("image")
    t.add_argument("--from", dest="from_caption", required=True)
    t.add_argument("--to", dest="to_caption", required=True)
    t.add_argument("--amounts", default="0,0.15,0.3,0.45,0.6")
    n = sub.add_parser("invert", help="DDIM-invert an image into (z_i, x_T)")
    n.add_argument("image")
    n.add_argument("--steps", type=int, default=100)
    for s in (v, i, t, n):
        s.add_argument("-o", "--output", required=True)
        s.add_argument("--model", default=None, help="model folder (default: the shipped model)")
        s.add_argument("--engine-dir", default=None)
        s.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
        s.add_argument("--device", default=None)
        s.add_argument("--no-progress", action="store_true")
        if s is not n:
            s.add_argument("--seed", type=int, default=None)
            s.add_argument("--low-res", action="store_true", help="stop at the decoder's 64×64 (no super-res)")
    return p.parse_args(argv)


def _amounts(text: str) -> list[float]:
    try:
        return [float(a) for a in text.split(",")]
    except ValueError as exc:
        raise ValueError(f"--amounts must be comma-separated numbers, got {text!r}") from exc


def _image_count(args: argparse.Namespace) -> int:
    """How many images a tool writes, 1 to 1024 (the API's bounds, which it checks itself): the
    names its files get, checked before the model runs."""
    if args.tool == "variations":
        count = args.n
    elif args.tool == "interpolate":
        count = args.steps
    else:
        count = len(_amounts(args.amounts))
    return min(max(1, count), 1024)


def run(argv: list[str]) -> list[str]:
    """Run a tool; returns the paths written."""
    from safetensors.torch import save_file

    from models.checkpoint import atomic_write
    from runtime.cli.common import IMAGE_FORMATS, check_image_outputs, check_writable, output_paths, save_image
    from runtime.pipeline import UnCLIP

    args = parse(argv)
    output = Path(args.output)
    if args.tool == "invert":  # refused before the model loads, as the text-to-image command does
        if output.suffix.lower() in IMAGE_FORMATS:
            raise ValueError(f"-o {output}: invert writes a safetensors file of latents, not an image")
        check_writable([output])
    else:
        check_image_outputs(args.output, _image_count(args))
    pipe = UnCLIP(args.model, device=args.device, engine_dir=args.engine_dir, backend=args.backend,
                  progress=not args.no_progress)
    if args.tool == "invert":
        inv = pipe.invert(args.image, steps=args.steps)
        meta = {"steps": str(inv.steps), "guidance_scale": str(inv.guidance_scale), "prompt": json.dumps(inv.prompt)}
        tensors = {"image_embeds": inv.image_embeds.contiguous(), "latents": inv.latents.contiguous()}
        atomic_write(output, lambda p: save_file(tensors, str(p), metadata=meta))
        return [args.output]
    common = {"seed": args.seed, "super_res": not args.low_res}
    if args.tool == "variations":
        images = pipe.variations(args.image, n=args.n, eta=args.eta, **common).images
    elif args.tool == "interpolate":
        images = pipe.interpolate(args.image_a, args.image_b, steps=args.steps, path=args.path, **common).images
    else:
        images = pipe.text_diff(args.image, args.from_caption, args.to_caption, amounts=_amounts(args.amounts),
                                **common).images
    paths = output_paths(args.output, len(images))
    for image, path in zip(images, paths, strict=True):
        save_image(image, path)
    return [str(p) for p in paths]
