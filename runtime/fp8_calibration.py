"""`python -m runtime.fp8_calibration --model DIR`: calibrate the FP8 activation scales of a model
once and store them beside its weights (`DIR/fp8_scales.safetensors`, recorded in its
`checksums.json`), where `UnCLIP(DIR, precision="fp8")` finds them.

The model runs with FP8 layers scaled on the fly (so each layer sees the inputs its FP8
predecessors give it) over the calibration prompts at the model's default size, and the first few of them
again at the largest size of its chain so that every super-resolution stage runs (those stages
are the slow ones); each FP8 layer's largest input magnitude becomes its scale
(`models.fp8.scales`). Calibration prompts should be like the prompts the model will serve; the
defaults are generic scene descriptions, `--prompts FILE` takes one per line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from models.checkpoint import weights_sha256
from models.file_integrity import CHECKSUMS, read_checksums, write_checksums
from models.fp8.scales import SCALES_FILE, observe, save_scales
from runtime.pipeline import DEFAULT_MODEL, UnCLIP, load_folder

log = logging.getLogger(__name__)

GENERIC_PROMPTS = (
    "a photo of a dog running on a beach", "an oil painting of a lighthouse at sunset",
    "a bowl of fruit on a wooden table", "a city street at night in the rain",
    "a close-up portrait of an old man", "a red sports car parked in front of a house",
    "a watercolor of mountains and a lake", "a cat sleeping on a sofa",
)


@torch.no_grad()
def calibrate(pipe: UnCLIP, prompts: list[str], seed: int = 0, batch: int = 8, full_chain_prompts: int = 2,
              **generate_kwargs) -> dict[str, float]:
    """Every FP8 layer's activation scale (`pipe` built with `precision="fp8"` and
    `fp8_scales="dynamic"`): `prompts` at the model's default size, the first `full_chain_prompts`
    of them at the chain's largest."""
    if pipe.precision != "fp8" or pipe.fp8_scales != "dynamic":
        raise ValueError("calibrate a pipeline built with precision='fp8', fp8_scales='dynamic'")
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    runs = [(prompts, pipe.cfg.default_image_size)]
    if pipe.cfg.image_sizes[-1] != pipe.cfg.default_image_size:
        runs.append((prompts[:full_chain_prompts], pipe.cfg.image_sizes[-1]))
    with observe(pipe.model) as scales:
        for chunk_prompts, size in runs:
            for i in range(0, len(chunk_prompts), batch):
                pipe.generate(chunk_prompts[i : i + batch], seed=seed + i, size=size, output_type="pt",
                              **generate_kwargs)
    return scales


def calibrate_folder(folder: Path, prompts: list[str], device: str | None = None, seed: int = 0,
                     batch: int = 8, networks: list[str] | None = None) -> Path:
    """Calibrate the model of `folder` (its FP8 `networks`, default the super-res chain) and
    write `folder/fp8_scales.safetensors`, adding it to the folder's checksums."""
    model = load_folder(folder)
    pipe = UnCLIP(model, device=device, progress=False, precision="fp8", fp8_scales="dynamic",
                  fp8_networks=networks)
    scales = calibrate(pipe, prompts, seed, batch)
    note = json.dumps({"prompts": prompts, "seed": seed, "device": str(pipe.device), "networks": networks,
                       "dtype": str(pipe.dtype).removeprefix("torch.")})
    path = folder / SCALES_FILE
    save_scales(path, scales, weights_sha256(model), note)
    recorded = read_checksums(folder, f"write {CHECKSUMS} again")
    if recorded is not None:
        write_checksums(folder, sorted({*recorded, SCALES_FILE}))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.fp8_calibration", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the shipped model)")
    p.add_argument("--prompts", help="a text file of calibration prompts, one per line (default: generic scenes)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    p.add_argument("--networks", nargs="+", choices=("decoder", "super_res", "prior"), default=None,
                   help="the FP8 networks to calibrate (default: super_res, as UnCLIP converts by default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prompts = list(GENERIC_PROMPTS)
    if args.prompts:
        try:
            prompts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines()
                       if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: --prompts: {exc}", file=sys.stderr)
            return 2
    try:
        path = calibrate_folder(Path(args.model), prompts, args.device, args.seed, args.batch, args.networks)
    except (ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(prompts)} prompts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
