"""How far does a tiny error in one network call carry through the sampling loops?

    python benchmarks/sampling_sensitivity.py [--model DIR] [--eps 1e-3 1e-4] [--out FILE.json]

For each stage (the prior's step, the decoder's step, the super-res stages, then all of them) and
each `eps`, every output of that stage's network at every step is multiplied by (1 + eps·N(0, 1))
and the final images are compared (PSNR) with the unperturbed images of the same seed. fp16
rounding is a relative error of order 1e-3 per network call, and running requests of another
batch size changes which kernels round how, so this says which stage turns such differences into
visible ones (docs/serving.md, the GPU batching test). Runs wherever the model does (default: the
shipped default model on the CPU, fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from models.checkpoint import atomic_write  # noqa: E402
from runtime import UnCLIP  # noqa: E402
from train.evaluate_upsampler import psnr  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


class Perturbed:
    """A stage's engine whose floating-point outputs come back multiplied by (1 + eps·N(0, 1))."""

    def __init__(self, engine, eps: float, generator: torch.Generator) -> None:
        self.engine, self.eps, self.generator = engine, eps, generator

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.engine(*inputs)
        return tuple(o * (1 + self.eps * torch.randn(o.shape, generator=self.generator).to(o))
                     if o.is_floating_point() else o for o in outs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-4])
    p.add_argument("--seed", type=int, default=41)
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)

    def pipe() -> UnCLIP:
        return UnCLIP(args.model, device=args.device, progress=False)  # None: the shipped default model

    base = pipe()
    reference = base.generate(PROMPTS, seed=args.seed, output_type="pt").images
    super_res = [name for name in base.engines if name.startswith("super_res")]
    groups = {"prior": ["prior_step"], "decoder": ["decoder_step"], "super_res": super_res,
              "all": ["prior_step", "decoder_step", *super_res]}
    generator = torch.Generator().manual_seed(123)
    rows = []
    for group, stages in groups.items():
        for eps in args.eps:
            perturbed = pipe()
            for name in stages:
                perturbed.engines[name] = Perturbed(perturbed.engines[name], eps, generator)
            images = perturbed.generate(PROMPTS, seed=args.seed, output_type="pt").images
            values = [round(psnr(a, b), 1) for a, b in zip(images, reference, strict=True)]
            rows.append({"stages": group, "eps": eps, "psnr_db": values})
            print(f"{group:>9}  eps {eps:.0e}  PSNR per image {values}  worst {min(values)}", flush=True)
    if args.out:
        data = {"model": args.model or "default", "device": args.device, "prompts": PROMPTS, "seed": args.seed,
                "rows": rows}
        atomic_write(args.out, lambda path: path.write_text(json.dumps(data, indent=2)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
