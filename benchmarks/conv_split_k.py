"""The decoder's small-map 3×3 convolutions (its guided batch of 2 at 32², 16² and 8²) several ways,
to see whether splitting their long K loop over the idle SMs pays (fp16, channels-last, one
process, each way replayed from a CUDA graph over `COPIES` distinct weights in turn, so the
weights come from memory as in the UNet rather than from the L2 cache):

- "cudnn": torch's convolution (cuDNN, benchmark mode on);
- "gemm": `models.implicit_conv.conv2d_as_gemm` (neighbourhoods gathered, one cuBLAS product);
- "split S": the same gathered rows, their K split into S slices multiplied as one batched
  product with float32 outputs (`torch.bmm(..., out_dtype=torch.float32)`: every slice on its
  own SMs, no order among them), the S partial maps summed with the bias in float32, then fp16.
  Deterministic: the slices meet in a fixed order.
- "triton split S": the Triton implicit GEMM with its reduction split into S slices
  (`models.fp8.implicit_gemm.conv2d_nhwc_split_k`: no gathered copy, float32 partials, the slices
  added in order with the bias by a second kernel); autotuned on its first call per shape;
- "race": what the runtime's convolution runs by default (`implicit_conv.conv2d`: the fastest of
  cuDNN and the CUTLASS configurations for the shape, raced on its first call; its pick is the
  row's "race pick").

    python benchmarks/conv_split_k.py [--quick] [--out FILE.json]

`--quick` times only cuDNN and the race. (Session 38's split product, CUTLASS's batched GEMM over
the gathered rows, was timed here too; it lives on branch `dropped/split-product`.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import graph_ms  # noqa: E402
from models import implicit_conv  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402
from models.fp8.implicit_gemm import conv2d_nhwc_split_k, tap_major  # noqa: E402

# (batch, channels in, channels out, side): the decoder's ResBlock convolutions and widest skip
# concatenations at its guided batch
SHAPES = [(2, 640, 640, 32), (2, 960, 960, 16), (2, 1920, 960, 16), (2, 1280, 1280, 8), (2, 2560, 1280, 8),
          (2, 960, 1280, 8), (2, 2240, 1280, 8)]
SPLITS = (2, 4, 8, 16)
COPIES = 4  # distinct weights a replay walks through (more than the 50 MB L2 holds at the widest)


def split_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, splits: int) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` with the gathered rows' K split into `splits` slices
    (module docstring)."""
    k = weight.shape[0]
    rows, (b, h, w) = implicit_conv.neighbourhood_rows(x, (3, 3), 1)
    taps = weight.permute(0, 2, 3, 1).reshape(k, -1)
    part = rows.shape[1] // splits
    a = rows.view(b * h * w, splits, part).transpose(0, 1)  # [S, M, K/S], no copy
    t = taps.view(k, splits, part).permute(1, 2, 0)  # [S, K/S, N], no copy
    partials = torch.bmm(a, t, out_dtype=torch.float32)  # [S, M, N]
    out = (partials.sum(0) + bias.float()).half()
    return out.view(b, h, w, k).permute(0, 3, 1, 2)


def measure(batch: int, cin: int, cout: int, side: int, quick: bool = False) -> dict:
    """µs of each way (over `COPIES` weights in turn) and each way's largest difference from cuDNN's
    output relative to its largest magnitude."""
    g = torch.Generator().manual_seed(side + cin)
    cl = torch.channels_last
    x = torch.randn(batch, cin, side, side, generator=g).half().cuda().to(memory_format=cl)
    weights = [(torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)).half().cuda().to(memory_format=cl)
               for _ in range(COPIES)]
    bias = torch.randn(cout, generator=g).half().cuda()
    ways = {"cudnn": lambda w: F.conv2d(x, w, bias, padding=1)}
    if not quick:
        ways["gemm"] = lambda w: implicit_conv.conv2d_as_gemm(x, w, bias, 1)
        for s in SPLITS:
            if 9 * cin % s == 0:
                ways[f"split {s}"] = lambda w, s=s: split_gemm(x, w, bias, s)
        for s in (*SPLITS, 32):  # a channels-last weight is tap-major already: `tap_major` is a view
            ways[f"triton split {s}"] = lambda w, s=s: conv2d_nhwc_split_k(x, tap_major(w), 3, bias, s)
    ways["race"] = lambda w: implicit_conv.conv2d(x, w, bias, 1)
    want = F.conv2d(x, weights[0], bias, padding=1).float()
    row: dict = {"shape": f"b{batch}, {cin}→{cout} @{side}²"}
    for name, way in ways.items():
        try:
            got = way(weights[0]).float()  # the first call: Triton's autotuning, outside the capture
        except (RuntimeError, TypeError) as exc:  # e.g. a torch whose bmm takes no out_dtype
            row[name] = f"refused: {exc}".splitlines()[0]
            continue
        row[name] = round(graph_ms(lambda way=way: [way(w) for w in weights]) * 1000 / COPIES, 1)
        row[f"{name} difference"] = float((got - want).abs().max() / want.abs().max())
    # what the "race" way's first call above picked (none where the extension is not built)
    key = ("f16", tuple(x.shape), tuple(weights[0].shape), (1, 1))
    row["race pick"] = implicit_conv.describe(implicit_conv._best[key]) if key in implicit_conv._best else None
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="only cuDNN and the race")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copies": COPIES, "shapes": []}
    with torch.no_grad():
        for shape in SHAPES:
            row = measure(*shape, quick=args.quick)
            results["shapes"].append(row)
            print(row["shape"], {k: v for k, v in row.items() if k != "shape" and "difference" not in k},
                  "max difference", max((v for k, v in row.items() if "difference" in k), default=None), flush=True)
    if args.out is not None:
        atomic_write(args.out, lambda path: path.write_text(json.dumps(results, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
