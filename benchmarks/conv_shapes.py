"""The convolutions of one UNet forward, by shape: how many run, their output pixels (the product's
rows), weight bytes and FLOPs, from the reference UNet run on torch's meta device (shapes only, no
arithmetic, no GPU). It says which convolutions a kernel for some regime would take and what they
weigh; e.g. the decoder step's small maps (docs/kernels.md, the small-map kernel):

    python benchmarks/conv_shapes.py --stage decoder --batch 2 --most-rows 640

The fused path runs the same convolutions, except that an up block's first convolution may be
folded onto the map before upsampling (`models.fused.upsampled_conv`: a 2×2 one with 4× the
outputs on the smaller map), which this count lists as the reference runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from models.checkpoint import atomic_write  # noqa: E402
from models.configs import get_config  # noqa: E402
from models.implicit_conv import output_shape  # noqa: E402
from models.unet import UNet  # noqa: E402

CONTEXT_TOKENS = 81  # the decoder's context: 77 text tokens and 4 extra ones (models.text_proj)


def conv_shapes(config: str, stage: str, batch: int) -> list[dict]:
    """One forward of `stage` ("decoder", or "super_res" for the first upsampler) of `config` at
    `batch` rows, on the meta device: one entry per (input shape, weight shape) with its count."""
    cfg = get_config(config)
    ucfg = cfg.decoder if stage == "decoder" else cfg.super_res[0].unet
    size = cfg.decoder.image_size if stage == "decoder" else cfg.super_res[0].image_size
    seen: Counter = Counter()
    forward = nn.Conv2d._conv_forward

    def counted(self, x, weight, bias):
        seen[(tuple(x.shape), tuple(weight.shape), tuple(self.padding))] += 1
        return forward(self, x, weight, bias)

    with torch.device("meta"), torch.no_grad(), mock.patch.object(nn.Conv2d, "_conv_forward", counted):
        net = UNet(ucfg).half()
        x = torch.empty(batch, ucfg.in_channels, size, size, dtype=torch.half)
        t = torch.zeros(batch, dtype=torch.long)
        context = (torch.empty(batch, CONTEXT_TOKENS, ucfg.context_width, dtype=torch.half)
                   if ucfg.context_width else None)
        net(x, t, torch.empty(batch, ucfg.time_embed_dim, dtype=torch.half), context)
    rows = []
    for (xs, ws, pad), n in seen.items():
        batch, _, height, width = output_shape(xs, ws, pad)
        pixels = batch * height * width
        rows.append({"x": list(xs), "weight": list(ws), "padding": list(pad), "count": n, "rows": pixels,
                     "weight_mb": ws[0] * ws[1] * ws[2] * ws[3] * 2 / 1e6,
                     "gflop": 2 * pixels * ws[0] * ws[1] * ws[2] * ws[3] / 1e9})
    return sorted(rows, key=lambda r: (r["rows"], r["x"][1], r["weight"][0]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="karlo")
    p.add_argument("--stage", choices=["decoder", "super_res"], default="decoder")
    p.add_argument("--batch", type=int, default=2, help="rows of one forward (default 2: one guided image)")
    p.add_argument("--most-rows", type=int, help="only the convolutions with at most this many output pixels")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = conv_shapes(args.config, args.stage, args.batch)
    if args.most_rows is not None:
        rows = [r for r in rows if r["rows"] <= args.most_rows]
    for r in rows:
        print(f"x{r['x']} w{r['weight']} ×{r['count']}: {r['rows']} rows, {r['weight_mb']:.1f} MB, "
              f"{r['gflop']:.1f} GFLOP")
    total = {"convolutions": sum(r["count"] for r in rows),
             "weight_mb": round(sum(r["count"] * r["weight_mb"] for r in rows), 1),
             "gflop": round(sum(r["count"] * r["gflop"] for r in rows), 1)}
    print("total:", total)
    if args.out is not None:
        result = {"config": args.config, "stage": args.stage, "batch": args.batch, "most_rows": args.most_rows,
                  "total": total, "shapes": rows}
        atomic_write(args.out, lambda path: path.write_text(json.dumps(result, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
