"""The prior step's linear layers: `cpp_ext.skinny_linear` (8 and 4 warps per block, 16 or 32
output features per block) and, on Hopper, `cpp_ext.skinny_linear_staged` with the blocks
`linear_plan.staged_plan` gives it, against cuBLAS (torch's F.linear / addmm_, plus its separate
GELU) on the shapes of Karlo's prior, at 6 rows (one image: batch 2 × 3 step tokens) and 24 (four
images). The memory reference is a device copy of each weight (read and written: twice its bytes).

Each figure is one call's median over CUDA-graph replays of 20 calls on 20 different weight
matrices (so no weight is served from L2), in the launch mode of this process (set
UNCLIP_RT_NO_PDL=1 for launches without overlap). Prints a table, writes JSON with --out.

    python benchmarks/prior_linears.py [--out docs/prior_linears_h100.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpp_ext  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402
from models.fused.linear_plan import staged_plan  # noqa: E402

# (width in, features out, activation, accumulate into the residual stream): Karlo's prior layer
SHAPES = [(2048, 6144, 0, False), (2048, 2048, 0, True), (2048, 8192, 1, False), (8192, 2048, 0, True)]
CALLS = 20


def time_shape(rows: int, width: int, features: int, activation: int, accumulate: bool) -> dict[str, float]:
    """Microseconds per call of each implementation, and the weight bytes per call."""
    weights = [torch.randn(features, width, device="cuda", dtype=torch.half) / width**0.5 for _ in range(CALLS)]
    biases = [torch.randn(features, device="cuda", dtype=torch.half) for _ in range(CALLS)]
    x = torch.randn(rows, width, device="cuda", dtype=torch.half)
    out = torch.zeros(rows, features, device="cuda", dtype=torch.half)

    def ours(warps: int, block_features: int = 16) -> Callable[[], None]:
        def run() -> None:
            for w, b in zip(weights, biases, strict=True):
                cpp_ext.kernels.skinny_linear(x, w, b, activation, out if accumulate else None, warps, block_features)
        return run

    def staged(plan: tuple[int, int]) -> Callable[[], None]:
        def run() -> None:
            for w, b in zip(weights, biases, strict=True):
                cpp_ext.kernels.skinny_linear_staged(x, w, b, activation, out if accumulate else None, *plan)
        return run

    copies = [torch.empty_like(w) for w in weights]

    def copy() -> None:
        for w, c in zip(weights, copies, strict=True):
            c.copy_(w)

    def cublas() -> None:
        for w, b in zip(weights, biases, strict=True):
            if accumulate:
                out.addmm_(x, w.t())
            else:
                y = F.linear(x, w, b)
                if activation:
                    F.gelu(y)

    result = {f"ours_{warps}w_us": graph_ms(ours(warps)) / CALLS * 1e3 for warps in (8, 4)}
    if rows <= 32 and features % 32 == 0:
        result["ours_8w_32f_us"] = graph_ms(ours(8, 32)) / CALLS * 1e3
    plan = staged_plan(rows, width, features)
    if plan is not None:
        result["staged_us"] = graph_ms(staged(plan)) / CALLS * 1e3
    result["cublas_us"] = graph_ms(cublas) / CALLS * 1e3
    result["copy_us"] = graph_ms(copy) / CALLS * 1e3
    result["weight_mb"] = features * width * 2 / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[6, 24])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available() or cpp_ext.kernels is None:
        raise SystemExit(f"needs a CUDA GPU and cpp_ext built ({cpp_ext.IMPORT_ERROR or 'no GPU'})")
    overlapped = os.environ.get("UNCLIP_RT_NO_PDL") is None
    print(f"GPU: {torch.cuda.get_device_name()}; overlapped launches: {overlapped}")
    print(f"{'rows':>4} {'shape':>12} {'act':>3} {'acc':>3} {'ours 8w':>14} {'ours 4w':>14} {'8w 32f':>14} "
          f"{'staged':>14} {'cuBLAS':>14} {'copy (r+w)':>14}")
    table = []
    for rows in args.rows:
        for width, features, activation, accumulate in SHAPES:
            r = time_shape(rows, width, features, activation, accumulate)
            cells = [f"{r[k]:6.2f} ({r['weight_mb'] / r[k]:.2f})" if k in r else "-"
                     for k in ("ours_8w_us", "ours_4w_us", "ours_8w_32f_us", "staged_us", "cublas_us")]
            cells.append(f"{r['copy_us']:6.2f} ({2 * r['weight_mb'] / r['copy_us']:.2f})")
            print(f"{rows:4d} {width:>5}->{features:<5} {activation:3d} {int(accumulate):3d} " + " ".join(
                f"{c:>14}" for c in cells))
            table.append({"rows": rows, "width": width, "features": features, "activation": activation,
                          "accumulate": accumulate, **r})
    print("us per call (TB/s of weights)")
    if args.out:
        payload = {"gpu": torch.cuda.get_device_name(), "overlapped": overlapped, "shapes": table}
        atomic_write(args.out, lambda path: path.write_text(json.dumps(payload, indent=1)))


if __name__ == "__main__":
    main()
