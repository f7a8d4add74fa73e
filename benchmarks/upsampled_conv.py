"""The UNets' up-block convolutions (a 3×3 convolution of a nearest-2x-upsampled map) two ways, at
Karlo's shapes: "plain", the convolution of the upsampled map (the fused path's norm writes that
map, so its upsampling costs no pass of its own) through the runtime's per-shape race of cuDNN
and CUTLASS; "folded" (`models.fused.upsampled_conv`), the 2×2 convolution of the map before
upsampling with the four phases' kernels folded (same race), then the interleave copy, each part
timed too. Then the block's second norm (plain, with the bias and embedding added, SiLU) of the
folded product both ways: of the interleaved copy (the copy timed with it), and reading the
product in place (`cpp_ext.kernels.group_norm_phased`, where it serves: three-pass maps). fp16,
channels-last, each way replayed from a CUDA graph over `COPIES` distinct weights in turn (from
memory, as in the UNet, not from the L2 cache); µs and TFLOP/s of the 3×3 convolution's products.

    python benchmarks/upsampled_conv.py [--out FILE.json]
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

import cpp_ext  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402
from models import implicit_conv  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402
from models.fused import FusedOptions, upsampled_conv  # noqa: E402

# (stage, batch, channels, side before upsampling): the super-res UNet's three up blocks at one and
# four images, the decoder's at its guided batch of two and eight
SHAPES = [("super_res", b, c, s) for b in (1, 4) for c, s in ((640, 128), (960, 64), (1280, 32))] + \
         [("decoder", b, c, s) for b in (2, 8) for c, s in ((640, 32), (960, 16), (1280, 8))]
COPIES = 4


def rows(batch: int, channels: int, side: int, replays: int) -> dict:
    """One shape's times (median of `replays` graph replays, µs), its race picks and the fold's error."""
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(batch, channels, side, side, device="cuda", generator=g, dtype=torch.float16)
    y = y.contiguous(memory_format=torch.channels_last)
    up = F.interpolate(y, scale_factor=2, mode="nearest").contiguous(memory_format=torch.channels_last)
    weights = [(torch.randn(channels, channels, 3, 3, device="cuda", generator=g, dtype=torch.float16)
                / (9 * channels) ** 0.5).contiguous(memory_format=torch.channels_last) for _ in range(COPIES)]
    folded = [upsampled_conv.fold_weights(w) for w in weights]
    options = FusedOptions(fold_upsampling=True)

    def each(call, items) -> float:
        """µs of one `call(item)`: a graph of one call per item, replayed, divided by their count."""
        return graph_ms(lambda: [call(item) for item in items], replays) * 1e3 / len(items)

    # the races run here, outside the captures
    plain_out = implicit_conv.conv2d(up, weights[0], None, 1)
    product = implicit_conv.conv2d(y, folded[0], None, 1)
    got = upsampled_conv.conv_of_upsampled(y, folded[0], options)
    ref = F.conv2d(up.float(), weights[0].float(), padding=1)
    times = {
        "plain_us": each(lambda w: implicit_conv.conv2d(up, w, None, 1), weights),
        "folded_product_us": each(lambda w: implicit_conv.conv2d(y, w, None, 1), folded),
        "interleave_us": each(upsampled_conv.interleave, [product]),
        "folded_us": each(lambda w: upsampled_conv.conv_of_upsampled(y, w, options), folded),
    }
    flop = 2 * batch * (2 * side) ** 2 * channels * channels * 9
    keys = {"plain": ("f16", tuple(up.shape), tuple(weights[0].shape), (1, 1)),
            "folded": ("f16", tuple(y.shape), tuple(folded[0].shape), (1, 1))}
    picks = {name: implicit_conv.describe(implicit_conv._best[key]) for name, key in keys.items()
             if key in implicit_conv._best}

    def rel_err(out: torch.Tensor) -> float:
        return float((out.float() - ref).abs().max() / ref.abs().max())

    times.update(_second_norm_times(product, each))
    return {**times, "speedup": times["plain_us"] / times["folded_us"],
            "plain_tflops": flop / times["plain_us"] / 1e6, "race_picks": picks,
            "rel_err_folded": rel_err(got), "rel_err_plain": rel_err(plain_out)}


def _second_norm_times(product: torch.Tensor, each) -> dict:
    """µs of the up block's second norm of the folded `product`: after the interleave's copy
    ("interleave_norm_us") and reading the product in place ("norm_in_place_us", where
    `group_norm_phased` serves), and their outputs' largest difference; {} without the kernels."""
    if cpp_ext.kernels is None or not hasattr(cpp_ext.kernels, "group_norm_phased"):
        return {}
    batch, k = product.shape[0], product.shape[1] // 4
    g = torch.Generator(device="cuda").manual_seed(1)
    terms = {"weight": 1 + 0.1 * torch.randn(k, device="cuda", generator=g, dtype=torch.float16),
             "bias": 0.1 * torch.randn(k, device="cuda", generator=g, dtype=torch.float16),
             "add": 0.1 * torch.randn(batch, k, device="cuda", generator=g, dtype=torch.float16),
             "add_bias": 0.1 * torch.randn(k, device="cuda", generator=g, dtype=torch.float16),
             "eps": 1e-5, "silu": True}

    def of_copy(p: torch.Tensor) -> torch.Tensor:
        return cpp_ext.kernels.group_norm(upsampled_conv.interleave(p), 32, **terms)

    out = {"interleave_norm_us": each(of_copy, [product])}
    if cpp_ext.kernels.group_norm_phased_serves(product, 32):
        out["norm_in_place_us"] = each(lambda p: cpp_ext.kernels.group_norm_phased(p, 32, **terms), [product])
        diff = cpp_ext.kernels.group_norm_phased(product, 32, **terms).float() - of_copy(product).float()
        out["norm_in_place_max_diff"] = float(diff.abs().max())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for stage, batch, channels, side in SHAPES:
        row = {"stage": stage, "batch": batch, "channels": channels, "side": side,
               **rows(batch, channels, side, args.replays)}
        results["shapes"].append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) and k.endswith(("us", "up", "ps")) else v
                          for k, v in row.items()}), flush=True)
    if args.out:
        atomic_write(args.out, lambda path: path.write_text(json.dumps(results, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
