"""`python -m export.build_engines`: export every stage of a model to ONNX, check each graph
against the torch module, build TensorRT plans where TensorRT is installed, write a manifest.

    python -m export.build_engines --model default --out engines/default
    python -m export.build_engines --model diffusers:/w/karlo-v1-alpha --out engines/karlo --fp16
    python -m export.build_engines --model random:karlo --out engines/karlo-random  # sizes only

`--model`: `default` (the shipped model), a folder of ours, `karlo:DIR` (Kakao Brain's files),
`diffusers:DIR`, or `random:CONFIG` (a named config with random weights, for size and speed work).
An engine folder whose manifest matches the model's config, weights hash, precision, max batch and
backends is left alone unless `--force`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

from export import manifest as mf
from export import tensorrt_build
from export.check import check_graph
from export.onnx_export import OPSET, export_stage
from models.configs import UnCLIPConfig, get_config
from models.unclip import UnCLIPModel
from runtime.backends.signatures import available_stages, signatures
from runtime.constants import ModelConstants

log = logging.getLogger("export")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # max relative error of a graph against the fp32 torch module
BACKENDS = ("onnxruntime", "tensorrt")


class BuildError(RuntimeError):
    """A graph failed its check, or a requested backend cannot build here."""


def load_model(spec: str) -> UnCLIPModel:
    """The float32 CPU model named by a `--model` value."""
    from runtime import UnCLIP

    kind, _, arg = spec.partition(":")
    if spec == "default":
        return UnCLIP(device="cpu", progress=False).model
    if kind == "random" and arg:
        return random_model(arg)
    if kind == "karlo" and arg:
        return UnCLIP.from_karlo(arg, device="cpu", progress=False).model
    if kind == "diffusers" and arg:
        return UnCLIP.from_diffusers(arg, device="cpu", progress=False).model
    if Path(spec).is_dir():
        return UnCLIP(spec, device="cpu", progress=False).model
    raise BuildError(f"--model {spec!r}: expected default, a model folder, karlo:DIR, diffusers:DIR or random:CONFIG")


def random_model(config: str | UnCLIPConfig, seed: int = 0, device: str | torch.device = "cpu") -> UnCLIPModel:
    """A model of a config (or a named one) with random weights, its zero-initialised layers
    included (`fill_zero_layers`)."""
    torch.manual_seed(seed)
    cfg = get_config(config) if isinstance(config, str) else config
    with torch.device(device):  # initialised where it will run (a Karlo-size model inits in seconds on a GPU)
        model = UnCLIPModel(cfg).eval()
    return fill_zero_layers(model)


def fill_zero_layers(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """`module` with the parameters a fresh module initialises to zero (each UNet's and block's
    output projection) drawn from N(0, std²), so every output depends on every weight and the
    graph checks compare something (a zero UNet output would match any graph)."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, std)
    return module


def source_spec(spec: str) -> str:
    """A `--model` value with its folder made absolute, for rebuild commands run from elsewhere."""
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("karlo", "diffusers"):
        return f"{kind}:{Path(arg).resolve()}"
    return str(Path(spec).resolve()) if Path(spec).is_dir() and spec != "default" else spec


def build(
    model: UnCLIPModel, out: Path, backends: list[str], fp16: bool = False, max_images: int = 4, force: bool = False,
    stages: list[str] | None = None, source: str | None = None,
) -> dict:
    """Build (or keep) every engine of `model` in `out`; returns the manifest.

    :param source: the `--model` value that names the model, recorded so that a stale folder's
        error message can give the exact rebuild command.
    """
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise BuildError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if "tensorrt" in backends and not tensorrt_build.available():
        raise BuildError("backend tensorrt asked for, but TensorRT's builder (tensorrt + polygraphy) does not import "
                         "here; install it (see docs/engines.md) or build with --backends onnxruntime")
    precision = "fp16" if fp16 else "fp32"
    stages = stages or available_stages(model)
    key = mf.build_key(model, precision, max_images, backends)
    if not force and mf.is_current(out, key, stages):
        log.info("%s is up to date (same config, weights, precision, batch, backends); --force rebuilds", out)
        return mf.read(out)

    sigs = signatures(model.cfg)
    export_model = copy.deepcopy(model).half() if fp16 else model
    manifest = {**key, "source": source, "opset": OPSET, "versions": library_versions_with_trt(backends),
                "compute_capability": tensorrt_build.compute_capability() if "tensorrt" in backends else None,
                "tolerance": TOLERANCE[precision], "signatures": {s: mf.signature_dict(sigs[s]) for s in stages},
                "stages": {}}
    out.mkdir(parents=True, exist_ok=True)
    # A rebuild first drops the old manifest: a build killed midway leaves a folder the runtime refuses.
    (out / mf.MANIFEST).unlink(missing_ok=True)
    ModelConstants.from_model(export_model).save(out)
    for name in stages:
        sig = sigs[name]
        start = time.perf_counter()
        path = export_stage(export_model, sig, out, torch.float16 if fp16 else torch.float32)
        exported = time.perf_counter()
        error = check_graph(model, sig, path, torch.float16 if fp16 else torch.float32, providers=check_providers())
        files = [path.name] + ([path.name + ".data"] if (out / (path.name + ".data")).is_file() else [])
        entry = {"files": files, "bytes": sum((out / f).stat().st_size for f in files),
                 "export_seconds": round(exported - start, 2), "max_relative_error": error}
        if error > TOLERANCE[precision]:
            raise BuildError(f"{name}: ONNX Runtime differs from torch by {error:.2e} (relative), over the "
                             f"{precision} tolerance {TOLERANCE[precision]:.0e}")
        if "tensorrt" in backends:
            plan = out / f"{name}.plan"
            t0 = time.perf_counter()
            tensorrt_build.build_plan(path, sig, plan, max_images, fp16, out / "timing.cache")
            entry["files"].append(plan.name)
            entry["plan_seconds"] = round(time.perf_counter() - t0, 2)
        entry["seconds"] = round(time.perf_counter() - start, 2)
        manifest["stages"][name] = entry
        log.info("%-16s %8.1f MB  %6.1f s  error %.1e", name, entry["bytes"] / 1e6, entry["seconds"], error)
    mf.seal(out, manifest)
    mf.write(out, manifest)
    return manifest


def check_providers() -> tuple[str | tuple[str, dict[str, str]], ...]:
    """Where the graphs are checked: ONNX Runtime's CUDA provider where it and a GPU are here (a
    Karlo-size fp16 graph takes minutes on the CPU provider), with TF32 off (the check is against
    the fp32 module, to fp32 tolerance), else the CPU provider."""
    from runtime.backends.engines import onnxruntime_providers

    if torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime_providers():
        return (("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def library_versions_with_trt(backends: list[str]) -> dict[str, str]:
    versions = mf.library_versions()
    if "tensorrt" in backends:
        versions.update(tensorrt_build.versions())
    return versions


def summary_table(manifest: dict) -> str:
    rows = [f"{'stage':16s} {'size MB':>9s} {'build s':>8s} {'check error':>12s}"]
    for name, e in manifest["stages"].items():
        rows.append(f"{name:16s} {e['bytes'] / 1e6:9.1f} {e['seconds']:8.1f} {e['max_relative_error']:12.2e}")
    rows.append(f"precision {manifest['precision']}, tolerance {manifest['tolerance']:.0e}, opset {manifest['opset']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.build_engines", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--backends", default=None,
                   help="comma-separated, from onnxruntime,tensorrt (default: onnxruntime, plus tensorrt if installed)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="export in float16")
    precision.add_argument("--fp32", action="store_true", help="export in float32 (default)")
    p.add_argument("--max-batch", type=int, default=4, help="most images per call the engines must take")
    p.add_argument("--stages", default=None, help="comma-separated subset of the stages")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backends = (args.backends.split(",") if args.backends
                else ["onnxruntime"] + (["tensorrt"] if tensorrt_build.available() else []))
    if "tensorrt" not in backends and not tensorrt_build.available():
        log.info("TensorRT's builder is not installed here: building ONNX graphs for onnxruntime only")
    try:
        if args.max_batch < 1:
            raise BuildError("--max-batch must be at least 1")
        model = load_model(args.model)
        stages = args.stages.split(",") if args.stages else None
        if stages:
            buildable = [*available_stages(model), "prior"]
            bad = sorted(set(stages) - set(buildable))
            if bad:
                raise BuildError(f"unknown or unavailable stage(s) {bad}; this model has {buildable}")
        manifest = build(model, args.out, backends, args.fp16, args.max_batch, args.force, stages,
                         source_spec(args.model))
    except (BuildError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
