"""`python benchmarks/priors.py [--model DIR] [--batch 1 16]`: the diffusion prior against the
autoregressive prior of one model (default: the shipped one) on one GPU, side by side.

For each prior and batch size: end-to-end milliseconds of `generate` (median and spread of
`--runs` calls after a warm-up that captures the CUDA graphs), milliseconds of the prior alone
(text encoding and the prior's loop, per call), and images/s. Prints a table; `--out` writes JSON.
Quality of the two priors is measured by `python -m train.evaluate --prior both`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.timing import wall_ms  # noqa: E402
from runtime import UnCLIP  # noqa: E402
from train.data import HELD_OUT, canonical_caption  # noqa: E402
from train.evaluate import prior_seconds_per_image  # noqa: E402


def measure(model: str | None, prior: str, batch: int, runs: int) -> dict:
    pipe = UnCLIP(model, device="cuda", progress=False, prior=prior)
    prompts = [canonical_caption(HELD_OUT[i % len(HELD_OUT)]) for i in range(batch)]
    seeds = iter(range(10**6))
    times = wall_ms(lambda: pipe.generate(prompts, seed=next(seeds), output_type="pt"), runs, warmup=2)
    prior_ms = 1e3 * batch * prior_seconds_per_image(pipe, prompts * runs, batch)
    median = statistics.median(times)
    return {"prior": prior, "batch": batch, "end_to_end_ms": round(median, 2),
            "end_to_end_ms_range": [round(min(times), 2), round(max(times), 2)],
            "prior_ms": round(prior_ms, 2), "images_per_s": round(1e3 * batch / median, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped default model)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: benchmarks/priors.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = [measure(args.model, prior, b, args.runs) for b in args.batch for prior in ("diffusion", "ar")]
    print(f"{'prior':10s} {'batch':>5s} {'e2e ms':>9s} {'range':>17s} {'prior ms':>9s} {'img/s':>8s}")
    for r in rows:
        lo, hi = r["end_to_end_ms_range"]
        print(f"{r['prior']:10s} {r['batch']:5d} {r['end_to_end_ms']:9.2f} {f'{lo:.2f}-{hi:.2f}':>17s} "
              f"{r['prior_ms']:9.2f} {r['images_per_s']:8.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
