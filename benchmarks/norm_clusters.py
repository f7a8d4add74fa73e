"""The group norm's thread-block clusters (`cpp_ext.kernels.set_norm_clusters`) at the decoder's
map sizes: microseconds per norm, replayed from a CUDA graph of many norms in a row (as the
decoder step's graph runs them): the default (one block per group, three passes past the
one-launch kernel's size), one block per group in one launch at every size, the bundled kernel
(`cpp_ext/group_norm_clusters.cu`) in clusters of 2, 4 and 8 blocks, and by size. With
UNCLIP_RT_NO_PDL=1 the same without programmatic dependent launch.

    python benchmarks/norm_clusters.py [--batch 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import cpp_ext  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402

# (channels, height = width): the decoder's levels (320/640/960/1280 channels at 64²/32²/16²/8²)
# and its output blocks' concatenations
SHAPES = [(320, 64), (640, 64), (960, 64), (640, 32), (1280, 32), (1600, 32), (960, 16), (1920, 16), (1280, 8),
          (2560, 8)]
# name → (set_norm_clusters, one_pass_mode): the default (one block a group, three passes past
# 16384 elements a group), one block a group in one launch at every size, the bundled kernel in
# clusters of 2, 4, 8 blocks and by size
SETTINGS = {"default": (1, -1), "one launch": (1, 1), "2 blocks": (2, -1), "4 blocks": (4, -1),
            "8 blocks": (8, -1), "by size": (0, -1)}
CALLS = 20  # norms per graph replay


def time_norm(batch: int, channels: int, size: int, setting: int, mode: int) -> float:
    """Microseconds of one FiLM + SiLU group norm (the decoder's scale-shift ResBlocks') of a
    channels-last fp16 [batch, channels, size, size] map under cluster `setting` and `one_pass_mode`."""
    g = torch.Generator(device="cuda").manual_seed(channels + size)
    x = torch.randn(batch, channels, size, size, generator=g, device="cuda").half()
    x = x.to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(channels, generator=g, device="cuda").half() for _ in range(2))
    scale, shift = (0.2 * torch.randn(batch, channels, generator=g, device="cuda").half() for _ in range(2))
    kept = cpp_ext.kernels.norm_clusters()
    cpp_ext.kernels.set_norm_clusters(setting)
    try:
        def norms() -> None:
            for _ in range(CALLS):
                cpp_ext.kernels.group_norm(x, 32, weight, bias, scale, shift, None, 1e-5, True, one_pass_mode=mode)

        return graph_ms(norms, replays=50) * 1e3 / CALLS
    finally:
        cpp_ext.kernels.set_norm_clusters(kept)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="maps per norm (the decoder's guided batch: 2 per image)")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    if cpp_ext.kernels is None or not hasattr(cpp_ext.kernels, "set_norm_clusters"):
        raise SystemExit(f"cpp_ext is not built with the norm's clusters: {cpp_ext.IMPORT_ERROR}")
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                     "pdl": "UNCLIP_RT_NO_PDL" not in os.environ,
                     "calls_per_replay": CALLS, "us": {}}
    for channels, size in SHAPES:
        key = f"{channels} ch @{size}²"
        row = {name: round(time_norm(args.batch, channels, size, *how), 2) for name, how in SETTINGS.items()}
        results["us"][key] = row
        print(f"{key:>16}  " + "  ".join(f"{name} {us:6.2f}" for name, us in row.items()), flush=True)
    if args.out:
        atomic_write(args.out, lambda path: path.write_text(json.dumps(results, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
