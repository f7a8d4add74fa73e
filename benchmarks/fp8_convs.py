"""The UNets' 3×3 convolutions in fp16 (cuDNN) against the FP8 ways of `models.fp8.Fp8Conv`, one
process, CUDA events, each replayed from a CUDA graph:

    python benchmarks/fp8_convs.py [--out FILE.json] [--cudnn-benchmark-limit 0 --only cudnn|fp16]

Per shape (issue #33's table, then each decoder level at batch 2): cuDNN fp16 channels-last
(benchmark mode on), the FP8 "gemm" way whole (input quantisation, neighbourhood gather,
`torch._scaled_mm`, bias) and its parts (quantise + gather; the GEMM alone, the floor of that
way; the input's quantisation alone, torch's expression and the one-pass kernel), the "readback"
way, the Triton implicit GEMM (`models.fp8.implicit_gemm`) with e4m3 operands (the "implicit"
way) and with fp16 operands (against cuDNN: issue #33's first part), and CUTLASS's Hopper
implicit GEMM (`models.implicit_conv`) where it was built: in fp16 (the wrapper, which keeps cuDNN
where cuDNN wins its race), and in e4m3 as `Fp8Conv`'s
"cutlass" way (input quantisation included), with a fixed (calibrated) input scale, and the
kernel alone on an input quantised beforehand; and every built CUTLASS configuration alone on the
shape (`cutlass_configurations_us`), the persistent ones beside the rest, the stream-K ones also
in split-K mode (`SPLITS`). TFLOP/s counts 2·M·N·K of
the convolution for every column.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import cpp_ext  # noqa: E402
from benchmarks.timing import graph_ms  # noqa: E402
from models import implicit_conv  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402
from models.fp8.e4m3 import quantize, tensor_scale  # noqa: E402
from models.fp8.implicit_gemm import conv2d_nhwc, tap_major  # noqa: E402
from models.fp8.layers import Fp8Conv, _gathered_rows  # noqa: E402
from models.fp8.quantize_kernel import quantize_fused  # noqa: E402

# batch, channels, size: the super-res UNet's levels, then the decoder's at batch 2 (guidance), 64² down to 8²
SHAPES = [(1, 320, 256), (4, 320, 256), (1, 640, 128), (1, 960, 64), (2, 768, 64),
          (2, 320, 64), (2, 640, 32), (2, 960, 16), (2, 1280, 8)]


def _problem(batch: int, channels: int, size: int) -> tuple[nn.Conv2d, torch.Tensor, int, dict]:
    """The fp16 channels-last 3×3 convolution of one shape, its input, its FLOPs and the head of its
    result (label, GFLOP)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=torch.float16)
    x = x.to(memory_format=torch.channels_last)
    flop = 2 * batch * size * size * channels * channels * 9
    return conv, x, flop, {"shape": f"b{batch}, {channels}→{channels} @{size}²", "gflop": flop / 1e9}


def _timed(times: dict[str, float], flop: int) -> dict:
    """Each column's ms as µs and TFLOP/s."""
    return {k: {"us": v * 1e3, "tflops": flop / (v * 1e-3) / 1e12} for k, v in times.items()}


SPLITS = (2, 4, 8, 16)  # the split-K counts each stream-K configuration is also timed with


def _per_configuration(launches: dict) -> dict[str, float]:
    """Each built CUTLASS configuration's µs on one shape (graph replay), by name, for the operand
    kinds in `launches` ("f16", "e4m3": a launch taking the configuration's index and a split
    count, 0 for the configuration's own schedule); the stream-K ones also in split-K mode with each
    count of `SPLITS` (name + "_split" + count); an entry that cannot implement the shape is left
    out."""
    out = {}
    splittable = set(cpp_ext.cutlass_conv.split_configs())
    for index, name in enumerate(cpp_ext.cutlass_conv.configs()):
        launch = launches.get(name.split("_")[0])
        if launch is None:
            continue
        for splits in (0, *(SPLITS if index in splittable else ())):
            try:
                launch(index, splits)
            except RuntimeError:
                continue
            label = f"{name}_split{splits}" if splits else name
            out[label] = graph_ms(lambda launch=launch, index=index, splits=splits: launch(index, splits)) * 1e3
    return out


def bench(batch: int, channels: int, size: int) -> dict:
    conv, x, flop, head = _problem(batch, channels, size)
    layer = Fp8Conv.from_float(conv).cuda()
    layer.bias = layer.bias.half()
    weight_fp16, bias = tap_major(conv.weight.detach()), conv.bias.detach()
    for way in ("gemm", "implicit"):  # autotuning and first-use layouts before any capture
        layer(x, way)
    conv2d_nhwc(x, weight_fp16, 3, bias, out_dtype=torch.float16)
    scale = tensor_scale(x)
    rows = _gathered_rows(quantize(x, scale), (3, 3))
    weight = layer.tap_major_weight()
    a_scale = scale.expand(rows.shape[0], 1).contiguous()
    b_scale = layer.weight_scale.view(1, -1)
    times = {
        "cudnn_fp16": graph_ms(lambda: conv(x)),
        "fp8_gemm_way": graph_ms(lambda: layer(x, "gemm")),
        "fp8_quantise_and_gather": graph_ms(lambda: _gathered_rows(quantize(x, tensor_scale(x)), (3, 3))),
        "fp8_quantise_torch": graph_ms(lambda: quantize(x, tensor_scale(x))),
        "fp8_quantise_fused": graph_ms(lambda: quantize_fused(x, tensor_scale(x))),
        "fp8_gemm_alone": graph_ms(lambda: torch._scaled_mm(rows, weight.t(), scale_a=a_scale, scale_b=b_scale,
                                                            out_dtype=torch.float16)),
        "fp8_readback_way": graph_ms(lambda: layer(x, "readback")),
        "fp8_implicit_gemm": graph_ms(lambda: layer(x, "implicit")),
        "fp16_implicit_gemm": graph_ms(lambda: conv2d_nhwc(x, weight_fp16, 3, bias, out_dtype=torch.float16)),
    }
    if implicit_conv.serves_e4m3(channels, channels):  # CUTLASS with e4m3 operands: quantise + conv + epilogue
        layer(x, "cutlass")  # picks its tile configuration (timed) before capture
        times["cutlass_e4m3_way"] = graph_ms(lambda: layer(x, "cutlass"))
        # its parts: with a calibrated (fixed) scale, no reduction pass for the input's scale; and the
        # kernel alone on an input already quantised (what a quantisation fused into the op before leaves)
        fixed = copy.deepcopy(layer)
        fixed.set_input_scale(float(scale))
        times["cutlass_e4m3_way_fixed_scale"] = graph_ms(lambda: fixed(x, "cutlass"))
        q = quantize_fused(x, scale).contiguous(memory_format=torch.channels_last)
        times["cutlass_e4m3_alone"] = graph_ms(lambda: layer.cutlass_product(q, scale, layer.bias))
    if implicit_conv.serves(x, conv.weight):  # the CUTLASS Hopper kernel, where it was built
        weight_cl = conv.weight.detach()
        implicit_conv.conv2d(x, weight_cl, bias, 1)  # its race (cuDNN and every configuration) before capture
        times["cutlass_fp16"] = graph_ms(lambda: implicit_conv.conv2d(x, weight_cl, bias, 1))
    launches = {}
    if "cutlass_e4m3_alone" in times:
        wq, scales = layer.cutlass_operands(scale)
        launches["e4m3"] = lambda i, s: cpp_ext.cutlass_conv.conv2d_e4m3(q, wq, scales, layer.bias, 1, 1, i, s)
    if "cutlass_fp16" in times:
        launches["f16"] = lambda i, s: cpp_ext.cutlass_conv.conv2d(x, weight_cl, bias, 1, 1, i, s)
    err = float((layer(x, "gemm").float() - conv(x).float()).norm() / conv(x).float().norm())
    out = head | {"fp8_rel_error": err, "cutlass_configurations_us": _per_configuration(launches)}
    if "cutlass_fp16" in times:
        ref, got = conv(x).float(), implicit_conv.conv2d(x, weight_cl, bias, 1).float()
        out["cutlass_rel_error"] = float((got - ref).norm() / ref.norm())
    out |= _timed(times, flop)
    print(out["shape"], {k: f"{v['us']:.0f} µs ({v['tflops']:.0f} TFLOP/s)" for k, v in out.items()
                         if isinstance(v, dict) and "us" in v}, f"rel error {err:.1e}",
          f"cutlass rel error {out.get('cutlass_rel_error', float('nan')):.1e}",
          {k: f"{v:.0f} µs" for k, v in out["cutlass_configurations_us"].items()}, flush=True)
    return out


def cudnn_only(batch: int, channels: int, size: int) -> dict:
    """cuDNN's fp16 channels-last convolution alone, as `bench` times it (for other cuDNN settings)."""
    conv, x, flop, head = _problem(batch, channels, size)
    conv(x)
    out = head | _timed({"cudnn_fp16": graph_ms(lambda: conv(x))}, flop)
    print(out["shape"], f"cudnn_fp16 {out['cudnn_fp16']['us']:.0f} µs ({out['cudnn_fp16']['tflops']:.0f} TFLOP/s)",
          flush=True)
    return out


def fp16_ways(batch: int, channels: int, size: int) -> dict:
    """The fp16 ways alone: cuDNN's convolution, the GEMM way (`implicit_conv.conv2d_as_gemm`:
    gathered neighbourhoods, one cuBLAS product) and the runtime's race (`implicit_conv.conv2d`,
    where the CUTLASS kernel was built), with the race's pick named."""
    conv, x, flop, head = _problem(batch, channels, size)
    weight, bias = conv.weight.detach(), conv.bias.detach()
    times = {"cudnn_fp16": graph_ms(lambda: conv(x)),
             "gemm_fp16": graph_ms(lambda: implicit_conv.conv2d_as_gemm(x, weight, bias, 1))}
    out = dict(head)
    if implicit_conv.serves(x, weight):
        implicit_conv.conv2d(x, weight, bias, 1)  # the race, before capture
        times["race_fp16"] = graph_ms(lambda: implicit_conv.conv2d(x, weight, bias, 1))
        key = ("f16", tuple(x.shape), tuple(weight.shape), (1, 1))
        out["race_pick"] = implicit_conv.describe(implicit_conv._best[key])
    out |= _timed(times, flop)
    print(out["shape"], {k: f"{v['us']:.1f} µs" for k, v in out.items() if isinstance(v, dict)},
          out.get("race_pick", ""), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                   help="cuDNN plans torch's benchmark mode tries per shape (torch's default 10; 0: every plan "
                        "cuDNN's heuristics list)")
    p.add_argument("--only", choices=("cudnn", "fp16"), default=None,
                   help="cudnn: time cuDNN's fp16 convolution alone; fp16: cuDNN, the GEMM way and the race")
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    bench_shape = {"cudnn": cudnn_only, "fp16": fp16_ways}.get(args.only, bench)
    # no autograd: the layers' cached operands are then plain tensors (`copy.deepcopy` takes them)
    with torch.no_grad():
        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "cudnn_benchmark_limit": torch.backends.cudnn.benchmark_limit,
                  "shapes": [bench_shape(*s) for s in SHAPES]}
    if args.out:
        text = json.dumps(result, indent=1)
        atomic_write(Path(args.out), lambda path: path.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
