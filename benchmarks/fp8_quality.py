"""How far FP8 (`UnCLIP(precision="fp8")`) moves the outputs, on the same noise.

    python benchmarks/fp8_quality.py [--device cpu] [--seeds 4] [--karlo-stages] [--out FILE.json]

1. The shipped default model on its held-out prompts (`train.evaluate`: 16 combinations × seeds):
   foreground, shape and background accuracy read from the pixels for the reference dtype and
   for FP8 with activation scales measured per input ("dynamic") and calibrated (the model
   folder's `fp8_scales.safetensors`, when it has one), and the PSNR of every FP8 image against
   the reference image of the same prompt and seed.
2. Which networks carry the error: each group of `models.fp8.policy` converted alone (the prior,
   the decoder, the super-resolution chain), on the first eight held-out images: PSNR and the
   image embeddings' relative error.
3. `--karlo-stages`: Karlo's architecture with random weights, one forward of the prior step
   (batch 2), the decoder step (batch 2) and the first super-resolution stage (batch 1) with all
   their layers in FP8 against the same forward in the reference dtype: relative error
   (‖FP8 − ref‖ / ‖ref‖); and the same on the default model's trained weights.
4. `--perturbation`: how an FP8 network carries a change of 1e-7 in its input, layer by layer
   (the default model's decoder step), against the same change in the reference dtype.
5. `--prior-weights`: the prior's transformer linears with their weights alone rounded (int8 or
   e4m3, one scale per output channel; the activations untouched), the candidate for halving the
   weight stream that bounds the prior step: held-out accuracy, PSNR against the reference, the
   image embeddings' relative error, and one Karlo-size prior step's relative error (random weights).
On a GPU `--reference-dtype float16` compares with the fp16 pipeline; the CPU reference is fp32.
Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from models import fp8  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402
from models.fp8.policy import GROUPS  # noqa: E402
from models.fp8.scales import SCALES_FILE  # noqa: E402
from runtime import UnCLIP  # noqa: E402
from runtime.pipeline import DEFAULT_MODEL, load_folder  # noqa: E402
from train.data import HELD_OUT, canonical_caption  # noqa: E402
from train.evaluate import evaluate  # noqa: E402
from train.evaluate_upsampler import psnr  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACCURACIES = ("fg_accuracy", "shape_accuracy", "bg_accuracy")


def _psnrs(a: torch.Tensor, b: torch.Tensor) -> dict:
    values = [psnr(x, y) for x, y in zip(a, b, strict=True)]
    return {"psnr_min": min(values), "psnr_median": statistics.median(values), "psnr_mean": statistics.fmean(values),
            "share_at_least_30db": sum(v >= 30 for v in values) / len(values)}


def _first_eight(pipe: UnCLIP):
    """`pipe`'s output for the first eight held-out prompts at seed 1000, with the image embeddings."""
    prompts = [canonical_caption(c) for c in HELD_OUT[:8]]
    return pipe.generate(prompts, seed=1000, output_type="pt", return_image_embeds=True)


def _embedding_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest relative error of an image embedding [B, D] against the reference's."""
    return ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def held_out(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Part 1: accuracies of the reference and of FP8, and PSNR of FP8 against the reference."""
    model = load_folder(args.model)
    out = {}
    runs = {"reference": {}, "fp8_dynamic": {"precision": "fp8", "fp8_scales": "dynamic"}}
    unets = {"precision": "fp8", "fp8_networks": ["decoder", "super_res"]}
    if (Path(args.model) / SCALES_FILE).is_file():
        runs["fp8_calibrated"] = {"precision": "fp8", "fp8_scales": Path(args.model) / SCALES_FILE}
        runs["fp8_unets_calibrated"] = unets | {"fp8_scales": Path(args.model) / SCALES_FILE}
    runs["fp8_unets_dynamic"] = unets | {"fp8_scales": "dynamic"}
    images = {}
    for name, kw in runs.items():
        pipe = UnCLIP(copy.deepcopy(model), device=args.device, dtype=dtype, progress=False, **kw)
        start = time.perf_counter()
        result = evaluate(pipe, seeds=args.seeds, batch=args.batch)
        images[name] = result.pop("_images")
        out[name] = {k: result[k] for k in ACCURACIES} | {"seconds": time.perf_counter() - start}
        if name != "reference":
            out[name] |= _psnrs(images["reference"], images[name])
        print(name, {k: round(v, 3) for k, v in out[name].items()}, flush=True)
        del pipe
        gc.collect()
    return out


def by_group(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Part 2: each group of layers in FP8 alone."""
    model = load_folder(args.model)
    ref = _first_eight(UnCLIP(copy.deepcopy(model), device=args.device, dtype=dtype, progress=False))
    out = {}
    for groups in [(g,) for g in GROUPS] + [("decoder", "super_res")]:
        pipe = UnCLIP(copy.deepcopy(model), device=args.device, dtype=dtype, progress=False)
        names = fp8.convert(pipe.model, groups=groups)
        got = _first_eight(pipe)
        embed = _embedding_error(got.image_embeds, ref.image_embeds)
        key = "+".join(groups)
        out[key] = {"layers": len(names), "embedding_rel_error_max": embed} | _psnrs(ref.images, got.images)
        print("FP8 in", key, {k: round(v, 4) for k, v in out[key].items()}, flush=True)
    return out


def karlo_stages(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Part 3: per-stage relative error at Karlo size (random weights, every layer of the policy)."""
    from export.build_engines import fill_zero_layers
    from models.configs import KARLO
    from models.prior import Prior
    from models.unclip import UnCLIPModel
    from models.unet import UNet
    from runtime.backends.signatures import signatures, stage_module

    out = {}
    sigs = signatures(KARLO)
    builders = {"prior_step": ("prior", lambda: Prior(KARLO.prior), ("prior",)),
                "decoder_step": ("decoder.unet", lambda: UNet(KARLO.decoder), ("decoder",)),
                "super_res_first": ("super_res.0.first_steps", lambda: UNet(KARLO.super_res[0].unet), ("super_res",))}
    for stage, (path, build, groups) in builders.items():
        torch.manual_seed(0)
        model = UnCLIPModel.empty(KARLO, with_vision=False, with_ar_prior=False)  # no memory: only `path` is real
        parent_name, _, child = path.rpartition(".")
        with torch.device(args.device):
            network = fill_zero_layers(build()).to(dtype).eval()
        setattr(model.get_submodule(parent_name) if parent_name else model, child, network)
        module = stage_module(model, stage)
        batch = 1 if stage.startswith("super_res") else 2
        inputs = sigs[stage].sample_inputs(batch, dtype, args.device, torch.Generator().manual_seed(1))
        with torch.no_grad():
            start = time.perf_counter()
            ref = module(*inputs.values())[0].float()
            fp8.convert(model, groups=groups)
            got = module(*inputs.values())[0].float()
        out[stage] = {"batch": batch, "rel_error": ((got - ref).norm() / ref.norm()).item(),
                      "seconds": time.perf_counter() - start}
        print(stage, out[stage], flush=True)
        del model, module, network
        gc.collect()
    return out


def default_stages(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Part 3b: the same per-stage error on the shipped default model's trained weights (the 256 →
    1024 stage at 4 tiles)."""
    from runtime.backends.signatures import signatures, stage_module

    model = load_folder(args.model).to(device=args.device, dtype=dtype).eval()
    converted = copy.deepcopy(model)
    fp8.convert(converted, groups=GROUPS)
    sigs = signatures(model.cfg)
    out = {}
    for stage, batch in (("prior_step", 2), ("decoder_step", 2), ("super_res_first", 1), ("super_res_2_first", 4)):
        if stage not in sigs:
            continue
        inputs = list(sigs[stage].sample_inputs(batch, dtype, args.device, torch.Generator().manual_seed(1)).values())
        with torch.no_grad():
            ref = stage_module(model, stage)(*inputs)[0].float()
            got = stage_module(converted, stage)(*inputs)[0].float()
        out[stage] = {"batch": batch, "rel_error": float((got - ref).norm() / ref.norm())}
    print("default model stages:", {k: f"{v['rel_error']:.1e}" for k, v in out.items()}, flush=True)
    return out


def grid(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """`--grid PATH`: the first eight held-out prompts (rows) in the reference dtype, with the
    default FP8 networks (the super-res chain) and with the decoder too in FP8 (columns), same
    seed; PNG."""
    import os

    from train.evaluate import save_grid

    prompts = [canonical_caption(c) for c in HELD_OUT[:8]]
    runs = {"reference": {}, "fp8": {"precision": "fp8"},
            "fp8_unets": {"precision": "fp8", "fp8_networks": ["decoder", "super_res"]}}
    images = []
    for kw in runs.values():
        pipe = UnCLIP(args.model, device=args.device, dtype=dtype, progress=False, **kw)
        images.append(pipe.generate(prompts, seed=1000, output_type="pt").images.cpu())
    path = Path(args.grid)
    tmp = path.with_name(f".{path.stem}.partial.png")  # PIL names the format by the suffix
    save_grid(torch.stack(images, dim=1).flatten(0, 1), len(prompts), tmp)
    os.replace(tmp, path)
    print("wrote", path, flush=True)
    return {"path": str(path), "columns": list(runs), "rows": prompts, "seed": 1000}


def perturbation(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Part 4: how an FP8 network carries a tiny change. The default model's decoder step on
    random inputs of its signature, and again with its image input multiplied by (1 + 1e-7·N(0, 1)):
    the output's relative change in `dtype` and in FP8, and in FP8 every FP8 layer's input and
    output change in order."""
    from runtime.backends.signatures import signatures, stage_module

    model = load_folder(args.model).to(device=args.device, dtype=dtype).eval()
    converted = copy.deepcopy(model)
    fp8.convert(converted)
    sig = signatures(model.cfg)["decoder_step"]
    inputs = list(sig.sample_inputs(2, dtype, args.device, torch.Generator().manual_seed(1)).values())
    noise = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2)).to(inputs[0])
    nudged = [inputs[0] * (1 + 1e-7 * noise), *inputs[1:]]
    trace: list[list] = [[], []]
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: trace[run].append((n, i[0].float(), o.float())))
             for n, m in fp8.fp8_layers(converted).items()]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    with torch.no_grad():
        plain = [stage_module(model, "decoder_step")(*x)[0] for x in (inputs, nudged)]
        run = 0
        first = stage_module(converted, "decoder_step")(*inputs)[0]
        run = 1
        second = stage_module(converted, "decoder_step")(*nudged)[0]
    for h in hooks:
        h.remove()
    layers = [{"layer": n, "input_change": rel(i1, i0), "output_change": rel(o1, o0)}
              for (n, i0, o0), (_, i1, o1) in zip(trace[0], trace[1], strict=True)]
    out = {"input_change": 1e-7, "reference_output_change": rel(plain[1], plain[0]),
           "fp8_output_change": rel(second, first), "fp8_vs_reference": rel(first, plain[0]), "layers": layers}
    print("decoder step, input × (1 + 1e-7·N):", {k: f"{v:.1e}" for k, v in out.items() if k != "layers"}, flush=True)
    return out


def rounded_rows(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """`weight` [out, in] as a weight-only kernel would hold it, read back in its dtype: int8 with a
    symmetric scale per output row (largest magnitude → 127), or e4m3 with a scale per row
    (largest magnitude → 448)."""
    w = weight.float()
    if kind == "int8":
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
        return ((w / scale).round().clamp(-127, 127) * scale).to(weight.dtype)
    scale = fp8.e4m3.channel_scales(w).view(-1, 1)
    return fp8.e4m3.dequantize(fp8.e4m3.quantize(w, scale), scale, weight.dtype)


def _round_prior_weights(model, kind: str) -> int:
    """Every linear layer of the prior's transformer blocks with its weight rounded (`rounded_rows`);
    the number of layers."""
    layers = [m for m in model.prior.transformer.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(rounded_rows(layer.weight, kind))
    return len(layers)


def prior_weights(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Part 5: the prior's linears with weight-only rounding (module docstring)."""
    from export.build_engines import fill_zero_layers
    from models.configs import KARLO
    from models.prior import Prior
    from models.unclip import UnCLIPModel
    from runtime.backends.signatures import signatures, stage_module

    model = load_folder(args.model)
    pipe = UnCLIP(copy.deepcopy(model), device=args.device, dtype=dtype, progress=False)
    ref_embeds = _first_eight(pipe).image_embeds
    ref = evaluate(pipe, seeds=args.seeds, batch=args.batch)
    out = {"reference": {k: ref[k] for k in ACCURACIES}}
    for kind in ("int8", "e4m3"):
        pipe = UnCLIP(copy.deepcopy(model), device=args.device, dtype=dtype, progress=False)
        layers = _round_prior_weights(pipe.model, kind)
        error = _embedding_error(_first_eight(pipe).image_embeds, ref_embeds)
        got = evaluate(pipe, seeds=args.seeds, batch=args.batch)
        out[kind] = ({"layers": layers, "embedding_rel_error_max": error} | {k: got[k] for k in ACCURACIES}
                     | _psnrs(ref["_images"], got["_images"]))
        print("prior weights", kind, {k: round(v, 4) for k, v in out[kind].items()}, flush=True)
    # one Karlo-size prior step (batch 2, random weights), each rounding against the unrounded weights
    torch.manual_seed(0)
    karlo = UnCLIPModel.empty(KARLO, with_vision=False, with_ar_prior=False)  # no memory: only the prior is real
    with torch.device(args.device):
        karlo.prior = fill_zero_layers(Prior(KARLO.prior)).to(dtype).eval()
    inputs = list(signatures(KARLO)["prior_step"].sample_inputs(2, dtype, args.device,
                                                                 torch.Generator().manual_seed(1)).values())
    with torch.no_grad():
        want = stage_module(karlo, "prior_step")(*inputs)[0].float()
        kept = copy.deepcopy(karlo.prior.state_dict())
        for kind in ("int8", "e4m3"):
            karlo.prior.load_state_dict(kept)
            _round_prior_weights(karlo, kind)
            got = stage_module(karlo, "prior_step")(*inputs)[0].float()
            out[kind]["karlo_prior_step_rel_error"] = float((got - want).norm() / want.norm())
    print("Karlo prior step:", {k: f"{out[k]['karlo_prior_step_rel_error']:.1e}" for k in ("int8", "e4m3")}, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--karlo-stages", action="store_true")
    p.add_argument("--skip-held-out", action="store_true")
    p.add_argument("--perturbation", action="store_true", help="part 4 (module docstring)")
    p.add_argument("--prior-weights", action="store_true", help="part 5 (module docstring)")
    p.add_argument("--grid", default=None, help="also write a PNG grid: 8 prompts × reference, FP8, FP8 UNets")
    p.add_argument("--update", action="store_true", help="keep the other parts of an existing --out file")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = DTYPES[args.reference_dtype]
    result = {"device": args.device, "reference_dtype": args.reference_dtype, "torch": torch.__version__,
              "policy": list(fp8.policy.DEFAULT_GROUPS)}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
    parts = [] if args.skip_held_out else [("held_out", held_out), ("by_group", by_group)]
    parts += [("karlo_stages", karlo_stages)] if args.karlo_stages else []
    parts += [("default_stages", default_stages)] if args.karlo_stages else []
    parts += [("perturbation", perturbation)] if args.perturbation else []
    parts += [("prior_weights", prior_weights)] if args.prior_weights else []
    parts += [("grid", grid)] if args.grid else []
    if args.update and args.out and Path(args.out).is_file():
        result = json.loads(Path(args.out).read_text()) | result
    for key, part in parts:
        result[key] = part(args, dtype)
        if args.out:  # after every part: a later part that fails leaves the earlier ones written
            text = json.dumps(result, indent=2)
            atomic_write(Path(args.out), lambda path, text=text: path.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
