"""Command line: `python -m runtime "a prompt" -o out.png [options]`, and the image tools
`python -m runtime variations|interpolate|text-diff|invert …` (see `runtime.cli.tools`).

Loads a model (the shipped default, `--model DIR` in our format, `--karlo DIR`, or
`--diffusers DIR`), generates,
and writes PNGs: `out.png` for one image, `out-0.png`, `out-1.png`, … for several.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from runtime.cli.common import BACKEND_CHOICES, as_cli_message, check_image_outputs, output_paths, save_image

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime", description="unCLIP text-to-image")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("-o", "--output", default="out.png",
                   help="output image: .png (default), .jpg, .webp, .bmp or .tif by its suffix; indexed when several")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="folder with config.json + model.safetensors (default: the shipped model)")
    src.add_argument("--karlo", help="folder with Kakao Brain's original Karlo files")
    src.add_argument("--diffusers", help="diffusers unCLIP folder (e.g. kakaobrain/karlo-v1-alpha)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="--karlo: also load files whose loading runs code (pickles, TorchScript with __setstate__); "
                        "only for files from a source you trust")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=None)
    defaults = " (default: the model's, see config.json 'sampling')"
    p.add_argument("--prior-steps", type=int, default=None, help="prior denoising steps" + defaults)
    p.add_argument("--decoder-steps", type=int, default=None, help="decoder denoising steps" + defaults)
    p.add_argument("--super-res-steps", type=int, nargs="+", default=None, metavar="STEPS",
                   help="super-res denoising steps: one for every stage, or one per stage of the chain" + defaults)
    p.add_argument("--size", type=int, default=None,
                   help="image size: the decoder's or a super-res stage's; the chain stops there (default: the "
                        "model's, config.json 'sampling.image_size', else its last stage's)")
    p.add_argument("--prior-guidance-scale", type=float, default=None, help="prior guidance" + defaults)
    p.add_argument("--decoder-guidance-scale", type=float, default=None, help="decoder guidance" + defaults)
    p.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion",
                   help="diffusion (default) or ar, the paper's autoregressive prior (models that have one)")
    p.add_argument("--temperature", type=float, default=None, help="--prior ar: logit temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="--prior ar: draw each code from the k most likely")
    p.add_argument("--top-p", type=float, default=None, help="--prior ar: nucleus sampling mass")
    p.add_argument("--similarity", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="--prior ar: quantile range of the text-image similarity token (default 0.5 1.0)")
    p.add_argument("--device", default=None, help="cuda, cpu, … (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="network dtype of the torch backend (default float32; engines keep their own)")
    p.add_argument("--prior-dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the text encoder and the prior (default: --dtype)")
    p.add_argument("--prior-batch", type=int, default=None,
                   help="batch the text encoder and the prior always run at (a service's --max-batch gives its images)")
    p.add_argument("--engine-dir", default=None, help="engine folder built by python -m export.build_engines")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="what runs the stages (default auto: see docs/engines.md, Backends)")
    p.add_argument("--precision", choices=("fp8",), default=None,
                   help="fp8: the super-res UNets' (or --fp8-networks') convolutions and attention projections with "
                        "e4m3 weights and inputs (docs/fp8.md); default: every network in --dtype")
    p.add_argument("--fp8-scales", default=None,
                   help="--precision fp8: 'dynamic' (each input's own), or a scales file (default: the model "
                        "folder's fp8_scales.safetensors where it has one, else dynamic)")
    p.add_argument("--fp8-networks", nargs="+", choices=("decoder", "super_res", "prior"), default=None,
                   help="--precision fp8: which networks (default: super_res; docs/fp8.md)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def _one_or_each(values: list[int] | None) -> int | list[int] | None:
    """A flag of one value or several: the value itself, or the list."""
    return values[0] if values is not None and len(values) == 1 else values


def main(argv: list[str] | None = None) -> int:
    from runtime.cli.tools import TOOLS, run
    from runtime.pipeline import UnCLIP

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:  # `python -m runtime variations IMAGE …` and the other image tools
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            for path in run(argv):
                print(path)
        except (FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
            print(f"error: {as_cli_message(exc)}", file=sys.stderr)
            return 2
        return 0
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_image_outputs(args.output, len(args.prompt) * args.num_images)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    common = {"device": args.device, "dtype": DTYPES.get(args.dtype),
              "prior_dtype": DTYPES.get(args.prior_dtype), "prior_batch": args.prior_batch,
              "progress": not args.no_progress,
              "engine_dir": args.engine_dir, "backend": args.backend, "prior": args.prior,
              "precision": args.precision, "fp8_scales": args.fp8_scales, "fp8_networks": args.fp8_networks}
    try:
        if args.karlo:
            pipe = UnCLIP.from_karlo(args.karlo, trust_pickle=args.trust_pickle, **common)
        elif args.diffusers:
            pipe = UnCLIP.from_diffusers(args.diffusers, **common)
        else:
            pipe = UnCLIP(args.model, **common)
        result = pipe.generate(
            args.prompt if len(args.prompt) > 1 else args.prompt[0],
            num_images_per_prompt=args.num_images, seed=args.seed,
            prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
            super_res_steps=_one_or_each(args.super_res_steps), size=args.size,
            prior_guidance_scale=args.prior_guidance_scale, decoder_guidance_scale=args.decoder_guidance_scale,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            similarity_quantiles=tuple(args.similarity) if args.similarity else None,
        )
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
        print(f"error: {as_cli_message(exc)}", file=sys.stderr)
        return 2
    paths = output_paths(args.output, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        try:
            save_image(image, path)
        except OSError as exc:  # the folder changed since it was checked
            print(f"error: cannot write {path} ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
