"""The small-map convolution kernel (`models.small_map_conv`) against what the fp16 race holds
besides it (cuDNN, CUTLASS's tiles) on the Karlo decoder's small-map convolutions, timed as the
race times them (`models.race_timing.graph_times`: replayed from CUDA graphs over copies of the
operands that together take twice the L2 cache, so the weights come from memory as in the
decoder's step, three interleaved rounds, the median), with each kernel way's largest difference
from a float32 convolution and the weights' memory floor (a device copy of the weights over the
same copies, read and written: the floor is half its time). Besides the race's entries
(`small_map_conv.ENTRIES`) it times the kernel at every block width, split count and stage count
it takes (`SWEEP`), to see which ways the race should hold.

    python benchmarks/small_map_conv.py [--out FILE.json]
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

from models import implicit_conv, race_timing, small_map_conv  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402

# (batch, channels in, channels out, side, kernel, padding): the Karlo decoder's convolutions with at
# most small_map_conv.MOST_ROWS output pixels at its guided batch of one image (2) and of four (8);
# the 2×2 ones are the up blocks' convolutions folded onto the map before upsampling
SHAPES = [(2, 960, 1280, 8, 3, 1), (2, 1280, 1280, 8, 3, 1), (2, 2240, 1280, 8, 3, 1), (2, 2560, 1280, 8, 3, 1),
          (2, 960, 960, 8, 3, 1), (2, 1280, 5120, 8, 2, 1),
          (2, 640, 640, 16, 3, 1), (2, 640, 960, 16, 3, 1), (2, 960, 960, 16, 3, 1), (2, 1280, 1280, 16, 3, 1),
          (2, 1600, 960, 16, 3, 1), (2, 1920, 960, 16, 3, 1), (2, 2240, 960, 16, 3, 1), (2, 960, 3840, 16, 2, 1),
          (8, 960, 1280, 8, 3, 1), (8, 1280, 1280, 8, 3, 1), (8, 2560, 1280, 8, 3, 1), (8, 960, 960, 8, 3, 1)]


SWEEP = tuple(small_map_conv.SmallMap(f, s, st) for f in (128, 64) for s in (2, 4, 6, 8) for st in (3, 4, 6))


def cutlass_entries() -> list:
    """The CUTLASS fp16 race's configurations (none where the extension is not built)."""
    return implicit_conv._configs("f16") if implicit_conv.cpp_ext.cutlass_conv is not None else []


def measure(batch: int, cin: int, cout: int, side: int, kernel: int, pad: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(cin + side)
    cl = torch.channels_last
    x = torch.randn(batch, cin, side, side, device="cuda", generator=g).half().to(memory_format=cl)
    w = (torch.randn(cout, cin, kernel, kernel, device="cuda", generator=g) / (cin * kernel * kernel) ** 0.5)
    w = w.half().to(memory_format=cl)
    padding = (pad, pad)
    race = small_map_conv.entries_for(tuple(x.shape), tuple(w.shape), padding)
    swept = small_map_conv.entries_for(tuple(x.shape), tuple(w.shape), padding, SWEEP)
    small = (*race, *(e for e in swept if e not in race))

    def launch(entry, x, w):
        return implicit_conv.run_f16(entry, x, w, None, padding)

    entries = [implicit_conv.CUDNN, *cutlass_entries(), *small]
    times = race_timing.graph_times(entries, launch, (x, w))
    copy = race_timing.graph_times(["copy"], lambda _, x, w: w.clone(), (x, w))["copy"]
    want = F.conv2d(x.float(), w.float(), None, padding=padding)
    row: dict = {"shape": f"b{batch}, {cin}→{cout} {kernel}×{kernel} @{side}²", "rows": small_map_conv.rows_of(
                 tuple(x.shape), tuple(w.shape), padding), "weight_mb": w.numel() * 2 / 1e6,
                 "weight_floor_us": round(copy * 1e3 / 2, 2)}
    row["us"] = {implicit_conv.describe(e): round(ms * 1e3, 2) for e, ms in times.items()}
    row["difference"] = {}
    for entry in (implicit_conv.CUDNN, *race):
        got = launch(entry, x, w).float()
        row["difference"][implicit_conv.describe(entry)] = float((got - want).abs().max() / want.abs().max())
    cutlass = {k: v for k, v in row["us"].items() if k != "cudnn" and not k.startswith("small_map_")}
    own = {e.name: row["us"][e.name] for e in small if e.name in row["us"]}
    entries = {e.name: row["us"][e.name] for e in race if e.name in row["us"]}
    row["best_cutlass"] = min(cutlass.items(), key=lambda kv: kv[1]) if cutlass else None
    row["best_small_map"] = min(own.items(), key=lambda kv: kv[1]) if own else None
    row["best_small_map_entry"] = min(entries.items(), key=lambda kv: kv[1]) if entries else None
    others = [v for k, v in row["us"].items() if k not in own]
    row["small_map_gain_us"] = (round(min(others) - row["best_small_map_entry"][1], 2)
                                if entries and others else None)  # what the race's entries win
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if not small_map_conv.built():
        p.error("cpp_ext is not built with small_map_conv (python setup.py build_ext --inplace)")
    torch.backends.cudnn.benchmark = True
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    with torch.no_grad():
        for shape in SHAPES:
            row = measure(*shape)
            results["shapes"].append(row)
            print(row["shape"], f"floor {row['weight_floor_us']} us", "cudnn", row["us"].get("cudnn"),
                  "cutlass", row["best_cutlass"], "entries", row["best_small_map_entry"], "any way",
                  row["best_small_map"], "gain", row["small_map_gain_us"],
                  "max diff", f"{max(row['difference'].values()):.2e}", flush=True)
            if args.out is not None:  # after every shape: a run stopped early keeps what it measured
                atomic_write(args.out, lambda path: path.write_text(json.dumps(results, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
