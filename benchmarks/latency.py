"""Latency of unclip-rt against the peer, in one process on one GPU, on the same weights and steps.

    python benchmarks/latency.py --config karlo --random-weights --batch 1 4 --out docs/results/latency.json
    python benchmarks/latency.py --diffusers /weights/karlo-v1-alpha        # a real model, both sides

Ours: `UnCLIP` on the torch backend in fp16 with CUDA graphs over each sampling loop and the
fused update kernel (when `cpp_ext` is built), and optionally the same without graphs
(`--ours-eager`). The peer: diffusers' `UnCLIPPipeline` in fp16 with SDPA attention, eager, and
optionally under `torch.compile(mode="reduce-overhead")` (`--peer-compile`; minutes of compiling).
`--backends torch onnxruntime` adds ours on ONNX Runtime's CUDA provider: the same weights
exported to fp16 graphs in a temporary folder, run by `runtime.backends.ort_cuda` (fixed-batch
sessions, ONNX Runtime's own CUDA graphs); its memory is the device's used memory (ONNX Runtime
allocates outside torch); and ours with `backend="auto"` on that folder, which on a GPU with the
CUDA provider times each stage on both backends and runs it on the faster (what it picked is
printed and written). `--precision fp8 fp8-unets` adds ours with FP8 networks, their activation
scales measured on every call and/or (`--fp8-scales dynamic calibrated`) calibrated once in the
process and fixed, as a model folder's `fp8_scales.safetensors` fixes them.

Reported per system and batch (default steps 25/25/7, guidance 4/8): end-to-end ms (median of
`--runs` after warm-up, with the spread), images/s, the first call (ours: graph capture),
per-forward ms of each stage, peak GPU memory (its weights + its working memory), and for
ours the time from a new process to the first image with the model on disk (`--first-image`).
The FLOP floor comes from torch's FLOP counter over one forward of each stage times the steps
(the architecture's products as written; ours folds the up blocks' convolutions into fewer), at
the dense fp16 matmul throughput measured in the same run; "share of peak" = floor / time.
Prints a table and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import cpp_ext  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    ForwardTimer,
    event_ms,
    forward_flops,
    fp8_matmul_peak_tflops,
    graph_ms,
    matmul_peak_tflops,
    wall_ms,
)
from models.checkpoint import atomic_write  # noqa: E402
from models.configs import get_config  # noqa: E402
from models.unclip import UnCLIPModel  # noqa: E402
from runtime.backends.signatures import super_res_stages  # noqa: E402

PROMPT = "a high-resolution photograph of a red fox sitting in fresh snow"


def stage_rows(cfg) -> dict[str, int]:
    """The stages timed per forward, with their rows per image: the guided ones two."""
    chain = {super_res_stages(cfg, i)[0]: 1 for i in range(len(cfg.super_res))}
    return {"prior_step": 2, "decoder_step": 2, **chain, "clip_text": 2}


# The extra fp16 rows of ours with one fusion or kernel choice changed: (flag, result key, the
# FusedOptions fields it sets, the flag's help).
FP16_OPTION_ROWS = (
    ("--no-keys-around-images", "ours_no_keys_around_images", {"keys_around_images": False},
     "also ours with the decoder attention's image and context keys packed every step "
     "(FusedOptions(keys_around_images=False)) instead of the context keys laid out around the QKV "
     "projection's image rows once per loop"),
    ("--cudnn-attention", "ours_cudnn_attention", {"cudnn_attention": True},
     "also ours (fp16) with the decoder's attention on cuDNN's op over the packed keys with "
     "per-sample key counts (FusedOptions(cudnn_attention=True); a torch whose op takes "
     "seqused_k) instead of flash attention's variable-length form"),
    ("--residual-in-conv", "ours_residual_in_conv", {"residual_in_conv": True},
     "also ours (fp16, and each calibrated FP8 row) with the identity skips added in the last "
     "convolution's epilogue (FusedOptions(residual_in_conv=True)) instead of a join pass"),
    ("--no-unet-time-table", "ours_no_unet_time_table", {"unet_time_table": False},
     "also ours with the UNets running their time MLP each forward (no table)"),
    ("--no-loop-projections", "ours_no_loop_projections", {"loop_projections": False},
     "also ours with each UNet forward making its own time-embedding projections"),
    ("--no-fold-upsampling", "ours_no_fold_upsampling", {"fold_upsampling": False},
     "also ours with the up blocks' first convolutions on the upsampled map "
     "(FusedOptions(fold_upsampling=False)) instead of folded onto the map before it"),
    ("--interleave-in-norm", "ours_interleave_in_norm", {"interleave_in_norm": True},
     "also ours with the up blocks' folded products read in place by the next norm "
     "(FusedOptions(interleave_in_norm=True)) instead of interleaved by a copy of their own"),
    ("--fold-race", "ours_fold_race", {"fold_race": True},
     "also ours with the up blocks' convolutions folded only where a per-shape race finds the fold "
     "faster (FusedOptions(fold_race=True))"),
    ("--cudnn-convs", "ours_cudnn", {"cutlass_convs": False},
     "also ours with every convolution on cuDNN (FusedOptions(cutlass_convs=False)): what the "
     "CUTLASS kernel buys where it is built"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="karlo", help="model config for --random-weights (default karlo)")
    p.add_argument("--random-weights", action="store_true", help="random weights of --config (latency does not "
                   "depend on the values)")
    p.add_argument("--diffusers", type=Path, help="a diffusers unCLIP folder: both sides load its weights")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="images per call (default 1 4)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per system and batch (median reported)")
    p.add_argument("--peer", choices=["eager", "none"], default="eager", help="run diffusers' UnCLIPPipeline")
    p.add_argument("--peer-compile", action="store_true", help="also the peer under torch.compile(reduce-overhead)")
    p.add_argument("--ours-eager", action="store_true", help="also ours without CUDA graphs")
    p.add_argument("--fp8-conv-path", choices=["auto", "gemm", "implicit", "cutlass"], default=None,
                   help="how the FP8 rows run their convolutions (models.fp8.layers.CONV_PATH; default auto)")
    p.add_argument("--cutlass-plain", action="store_true",
                   help="leave the persistent-kernel configurations out of the CUTLASS convolutions' choice (FP8's "
                        "and fp16's; models.implicit_conv.PERSISTENT off), for every system of the run")
    p.add_argument("--cutlass-splits", type=int, nargs="+", default=[],
                   help="also ours (fp16) with the stream-K CUTLASS configurations in each shape's choice once per "
                        "split-K count given (models.implicit_conv.SPLITS; every shape raced afresh for that row)")
    p.add_argument("--eager-race", action="store_true",
                   help="also ours (fp16) with the convolutions' race timed by host launches on one set of operands "
                        "(models.implicit_conv.RACE_TIMING='eager', the default before the graph-timed race; every "
                        "shape raced afresh); the races' wall time is in the row's race_s")
    p.add_argument("--race-again", action="store_true",
                   help="also race every shape afresh once more with each timing asked for (the default 'graph', and "
                        "'eager' with --eager-race), a row each: how often two races of the same entries disagree "
                        "is in the results' race_agreement")
    p.add_argument("--cutlass-overlap", action="store_true",
                   help="also ours (fp16) with the persistent CUTLASS convolutions launched by programmatic "
                        "dependent launch (cpp_ext._cutlass_conv.set_overlapped(True)): what the overlap buys")
    for flag, _, _, text in FP16_OPTION_ROWS:
        p.add_argument(flag, action="store_true", help=text)
    p.add_argument("--fp8-norm-fp16", action="store_true",
                   help="also each calibrated FP8 row with the norms writing fp16 that the FP8 convolution "
                        "quantises (FusedOptions(norm_writes_e4m3=False)) instead of e4m3 (the default)")
    p.add_argument("--fp8-skips-fp8", action="store_true",
                   help="also each calibrated FP8 row with the UNets' 1×1 skip convolutions in FP8 too "
                        "(models.fp8.policy.SKIP_CONVS on; by default they stay in fp16, accumulated into their "
                        "blocks' last convolution): a quantising pass, an e4m3 product and a join each")
    p.add_argument("--precision", nargs="+", choices=["fp16", "fp8", "fp8-unets"], default=["fp16"],
                   help="our precisions to time (fp8: UnCLIP(precision='fp8'), the super-res chain in FP8; "
                        "fp8-unets: the decoder too)")
    p.add_argument("--fp8-scales", nargs="+", choices=["dynamic", "calibrated"], default=["dynamic"],
                   help="the FP8 rows' activation scales: measured on every call, and/or calibrated once in "
                        "this process (runtime.fp8_calibration over two generic prompts, then fixed)")
    p.add_argument("--backends", nargs="+", choices=["torch", "onnxruntime"], default=["torch"],
                   help="our backends to time (default torch; onnxruntime: the CUDA provider, onnxruntime-gpu)")
    p.add_argument("--ort-layouts", nargs="+", choices=["nchw", "nhwc"], default=["nchw"],
                   help="ONNX Runtime CUDA: the provider's convolution layouts to time (runtime.backends.ort_cuda."
                        "CONV_LAYOUT; default nchw)")
    p.add_argument("--ort-unet-fusions", nargs="+", choices=["off", "on"], default=["off"],
                   help="ONNX Runtime CUDA: without and/or with its own UNet fusions on the UNet stages "
                        "(runtime.backends.ort_cuda.UNET_FUSIONS; default off)")
    p.add_argument("--ort-graphs", nargs="+", choices=["onnxruntime", "torch"], default=["onnxruntime", "torch"],
                   help="ONNX Runtime CUDA: who replays the sessions' kernels from CUDA graphs (ONNX Runtime's own "
                        "per session, or the runtime's loop graphs; runtime.backends.ort_cuda.GRAPHS; default both)")
    p.add_argument("--ort-auto", choices=["on", "off"], default="on",
                   help="ONNX Runtime CUDA: also time backend='auto' with the same graphs (default on)")
    p.add_argument("--ort-engine-dir", type=Path,
                   help="where the onnxruntime rows' fp16 graphs are built (kept, and reused while the model and "
                        "settings match: a second run skips the export); default a temporary folder")
    p.add_argument("--first-image", action="store_true", help="time a new process from start to its first image")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not (args.random_weights or args.diffusers):
        p.error("give --random-weights (with --config) or --diffusers DIR")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    from models.fused.unet_blocks import CUDNN_VARLEN

    if args.cudnn_attention and not CUDNN_VARLEN:
        p.error(f"--cudnn-attention: torch {torch.__version__}'s cuDNN attention op takes no per-sample key "
                "counts (seqused_k)")
    return args


def build(args: argparse.Namespace):
    """(peer pipeline in fp16 or None, our model with the same weights)."""
    from benchmarks.diffusers_peer import build_pipeline, ours_from_pipeline

    if args.diffusers:
        from diffusers import UnCLIPPipeline

        from models.convert.diffusers_folder import load_diffusers

        pipe = UnCLIPPipeline.from_pretrained(args.diffusers, torch_dtype=torch.float16, local_files_only=True)
        return pipe.to("cuda"), load_diffusers(args.diffusers)
    cfg = get_config(args.config)
    with torch.device("cuda"):
        pipe = build_pipeline(cfg, Path(tempfile.mkdtemp()) / "tokenizer")
    pipe = pipe.to(torch.float16)
    return pipe, ours_from_pipeline(pipe, cfg)


def stage_inputs(pipe, name: str, batch: int) -> list[torch.Tensor]:
    sig = pipe.engines[name].signature
    return list(sig.sample_inputs(batch, torch.float16, "cuda", torch.Generator().manual_seed(0)).values())


def calibrated_scales(model: UnCLIPModel, fp8_networks: list[str] | None, device: str = "cuda",
                      prompts: int = 2) -> dict[str, float]:
    """The FP8 activation scales of `model`'s `fp8_networks`, calibrated here as
    `runtime.fp8_calibration` does (dynamic scales observed over `prompts` generic prompts, at the
    model's default size and its chain's largest), without graphs (observing is eager work)."""
    from runtime import UnCLIP
    from runtime.fp8_calibration import GENERIC_PROMPTS, calibrate

    pipe = UnCLIP(model, device=device, dtype=torch.float16 if device == "cuda" else torch.float32,
                  progress=False, cuda_graphs=False, precision="fp8", fp8_scales="dynamic", fp8_networks=fp8_networks)
    return calibrate(pipe, list(GENERIC_PROMPTS[:prompts]), batch=prompts, full_chain_prompts=1)


def bench_ours(model: UnCLIPModel, args: argparse.Namespace, graphs: bool, precision: str | None = None,
               fp8_networks: list[str] | None = None, fused=None, input_scales: dict[str, float] | None = None,
               cache_savings: bool = False) -> dict:
    """Ours on the torch backend; `input_scales` (qualified FP8 layer name → scale): the FP8
    layers' calibrated activation scales, else they measure each input. `cache_savings` (with
    graphs): also time what the K/V caches save (the main row's figure; the others leave it out)."""
    from models import fp8 as fp8_package
    from runtime import UnCLIP
    from runtime.sampling.update import implementation

    fp8 = {"fp8_scales": "dynamic", "fp8_networks": fp8_networks} if precision == "fp8" else {}
    pipe = UnCLIP(model, device="cuda", dtype=torch.float16, progress=False, cuda_graphs=graphs,
                  precision=precision, fused=fused, **fp8)
    if input_scales is not None:  # before the first call: the graphs capture the fixed scales
        for name, layer in fp8_package.fp8_layers(pipe.model).items():
            layer.set_input_scale(input_scales.get(name))  # a layer calibration never reached: dynamic
    tensors = [*pipe.model.parameters(), *pipe.model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    result = {"update": implementation("cuda"), "cuda_graphs": graphs, "weights_gib": weights / 2**30, "batches": {},
              "precision": precision or "fp16"}
    if precision == "fp8":
        result["fp8_scales"] = "calibrated" if input_scales is not None else "dynamic"
    for n in args.batch:
        def run(n=n):
            return pipe.generate(PROMPT, num_images_per_prompt=n, seed=0, output_type="np")

        entry = _time_calls(run, args.runs, n, weights)
        if graphs:
            entry["forward_ms"] = {}
            for name, rows in stage_rows(pipe.cfg).items():
                x = stage_inputs(pipe, name, rows * n)
                entry["forward_ms"][name] = graph_ms(lambda name=name, x=x: pipe.engines[name](*x))
            for i in range(len(pipe.cfg.super_res)):  # a last-step UNet has its first-steps UNet's shape
                first, *last = super_res_stages(pipe.cfg, i)
                entry["forward_ms"].update({name: entry["forward_ms"][first] for name in last})
            entry["loop_ms"] = _loop_ms(pipe, n)
        result["batches"][n] = entry
    if graphs and cache_savings:
        result["cache_savings"] = _cache_savings(pipe, model)
    return result


def bench_ours_onnxruntime(model: UnCLIPModel, args: argparse.Namespace,
                           measured: Callable[[dict], None] = lambda result: None) -> dict:
    """Ours on ONNX Runtime's CUDA provider: fp16 graphs of `model` exported to a temporary folder,
    replayed both ways `runtime.backends.ort_cuda` offers (ONNX Runtime's own CUDA graph per
    session; the sessions inside the runtime's loop graphs); `measured` is handed the result so
    far after each variant."""
    from export.build_engines import build
    from runtime import UnCLIP
    from runtime.backends.engines import EngineFolder
    from runtime.backends.signatures import generate_stages
    from runtime.sampling.graphs import GraphCache

    folder = args.ort_engine_dir or Path(tempfile.mkdtemp(prefix="ort-engines-"))
    start = time.perf_counter()
    manifest = build(model, folder, ["onnxruntime"], fp16=True, stages=list(generate_stages(model.cfg)))
    result = {"export_s": time.perf_counter() - start, "modes": {},
              "check_error": {k: v["max_relative_error"] for k, v in manifest["stages"].items()}}
    pipe = UnCLIP(model, engine_dir=folder, backend="onnxruntime", device="cuda", progress=False)
    from runtime.backends import ort_cuda

    runs = [(mode, layout, fusions) for fusions in args.ort_unet_fusions for layout in args.ort_layouts
            for mode in args.ort_graphs]
    settings = ort_cuda.CONV_LAYOUT, ort_cuda.UNET_FUSIONS  # put back after the variants
    for mode, layout, fusions in runs:
        ort_cuda.CONV_LAYOUT, ort_cuda.UNET_FUSIONS = layout, fusions == "on"
        key = mode + ("+nhwc" if layout == "nhwc" else "") + ("+unet_fusions" if fusions == "on" else "")
        pipe.engines = {}  # the last variant's sessions, released before this one's baseline
        free_before = free_device_memory()
        try:
            pipe.engines = EngineFolder.open(folder).onnxruntime_engines(["CUDAExecutionProvider"],
                                                                         torch.device("cuda"), graphs=mode)
            pipe.graphs = GraphCache("cuda") if mode == "torch" else None
            entry = {"engines": sorted({type(e).__name__ for e in pipe.engines.values()}),
                     "batches": _engine_batches(pipe, args, free_before)}
        except Exception as exc:  # a mode that cannot run here is reported, not fatal to the others
            entry = {"error": f"{type(exc).__name__}: {exc}"}
        result["modes"][key] = entry
        timings = {n: f"{b['ms']:.1f} ms" for n, b in entry.get("batches", {}).items()}
        print(f"ONNX Runtime CUDA, graphs={mode}, layout {layout}, UNet fusions {fusions}:",
              timings or entry.get("error"), flush=True)
        measured(result)
    ort_cuda.CONV_LAYOUT, ort_cuda.UNET_FUSIONS = settings
    best = min((m for m in result["modes"].values() if "batches" in m), default=None,
               key=lambda m: m["batches"][args.batch[0]]["ms"])
    if best is not None:
        result["batches"] = best["batches"]
    pipe.engines.clear()  # its sessions' memory, before the next system loads
    if args.ort_auto == "on":
        result["auto"] = bench_ours_auto(model, folder, args)
    return result


def bench_ours_auto(model: UnCLIPModel, folder: Path, args: argparse.Namespace) -> dict:
    """Ours with `backend="auto"` and the fp16 engine folder: on a GPU with ONNX Runtime's CUDA
    provider, each stage on whichever backend measured faster at start-up; what it picked and
    the end-to-end time."""
    from runtime import UnCLIP

    free_before = free_device_memory()
    try:
        start = time.perf_counter()
        pipe = UnCLIP(model, engine_dir=folder, backend="auto", device="cuda", progress=False)
        entry = {"backend": pipe.backend, "choose_s": time.perf_counter() - start,
                 "choice": [dataclasses.asdict(c) for c in pipe.backend_choice], "batches": {}}
        print("auto picked:", pipe.backend, *(c.describe() for c in pipe.backend_choice), sep="\n  ", flush=True)
        entry["batches"] = _engine_batches(pipe, args, free_before)
        print("auto:", {n: f"{b['ms']:.1f} ms" for n, b in entry["batches"].items()}, flush=True)
    except Exception as exc:  # reported, not fatal to the other systems
        entry = {"error": f"{type(exc).__name__}: {exc}"}
    return entry


def free_device_memory() -> int:
    """Free device bytes once what earlier systems left is released (unreferenced sessions
    collected, torch's cached blocks returned): the baseline of a system's memory in use."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def _engine_batches(pipe, args: argparse.Namespace, free_before: int) -> dict:
    """Per batch of `args.batch`: end-to-end times of `pipe` (`_time_calls`), the device memory in use
    since `free_before` (`free_device_memory`; engines outside torch allocate there), and each
    stage's forward ms between CUDA events."""
    batches = {}
    for n in args.batch:
        def run(n=n):
            return pipe.generate(PROMPT, num_images_per_prompt=n, seed=0, output_type="np")

        timed = _time_calls(run, args.runs, n, 0)
        timed["peak_gib"] = (free_before - torch.cuda.mem_get_info()[0]) / 2**30
        timed["forward_ms"] = {}
        for name, rows in stage_rows(pipe.cfg).items():
            x = stage_inputs(pipe, name, rows * n)
            timed["forward_ms"][name] = event_ms(lambda name=name, x=x: pipe.engines[name](*x))
        batches[n] = timed
    return batches


def _loop_ms(pipe, n: int) -> dict[str, float]:
    """Each captured stage loop's replay time (CUDA events around one generate call; the prior's
    graphs, its first steps and the rest in pieces, summed)."""
    events = []
    real_run = pipe.graphs.run

    def timed(tag, loop, args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = real_run(tag, loop, args)
        end.record()
        events.append((tag[0].removesuffix("_rest"), start, end))
        return out

    pipe.graphs.run = timed
    try:
        pipe.generate(PROMPT, num_images_per_prompt=n, seed=1, output_type="np")
    finally:
        pipe.graphs.run = real_run
    torch.cuda.synchronize()
    loops: dict[str, float] = {}
    for name, start, end in events:
        loops[name] = loops.get(name, 0.0) + start.elapsed_time(end)
    return loops


def _cache_savings(pipe, model: UnCLIPModel) -> dict[str, float]:
    """Per-forward ms of the whole prior/decoder networks against their cached-context steps (batch 2)."""
    from runtime.backends.engines import TorchEngine

    out = {}
    for whole, step in (("prior", "prior_step"), ("decoder", "decoder_step")):
        engine = TorchEngine(pipe.model, whole)
        x = list(engine.signature.sample_inputs(2, torch.float16, "cuda", torch.Generator().manual_seed(0)).values())
        out[f"{whole}_whole_ms"] = graph_ms(lambda engine=engine, x=x: engine(*x))
        y = stage_inputs(pipe, step, 2)
        out[f"{step}_ms"] = graph_ms(lambda step=step, y=y: pipe.engines[step](*y))
    return out


def bench_peer(pipe, args: argparse.Namespace, compiled: bool) -> dict:
    if compiled:
        for name in ("prior", "decoder", "super_res_first", "super_res_last", "text_encoder"):
            setattr(pipe, name, torch.compile(getattr(pipe, name), mode="reduce-overhead"))
    pipe.set_progress_bar_config(disable=True)
    s = _steps()
    modules = {"prior": pipe.prior, "decoder": pipe.decoder, "super_res_first": pipe.super_res_first,
               "super_res_last": pipe.super_res_last, "text_encoder": pipe.text_encoder}
    weights = sum(p.numel() * p.element_size() for m in modules.values() for p in m.parameters())
    weights += sum(p.numel() * p.element_size() for p in pipe.text_proj.parameters())
    result = {"compiled": compiled, "weights_gib": weights / 2**30, "batches": {}}
    for n in args.batch:
        def run(n=n):
            return pipe(PROMPT, num_images_per_prompt=n, generator=torch.Generator("cuda").manual_seed(0),
                        output_type="np", **s)

        entry = _time_calls(run, args.runs, n, weights)
        timer = ForwardTimer(modules)
        run()
        entry["forward_ms"] = timer.median_ms()
        timer.remove()
        result["batches"][n] = entry
    return result


def _time_calls(run, runs: int, images: int, weights: int) -> dict:
    """The first call (ours: graph capture), then `runs` timed calls; peak memory = weights + the
    working memory above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first = (time.perf_counter() - start) * 1e3
    times = wall_ms(run, runs)
    peak = torch.cuda.max_memory_allocated() - base + weights
    return {"first_call_ms": first, **_summary(times, images), "peak_gib": peak / 2**30}


def _steps() -> dict:
    return {"prior_num_inference_steps": 25, "decoder_num_inference_steps": 25, "super_res_num_inference_steps": 7}


def _summary(times: list[float], n: int) -> dict:
    median = statistics.median(times)
    return {"ms": median, "ms_min": min(times), "ms_max": max(times), "runs": len(times),
            "images_per_s": n * 1e3 / median}


def flop_floor(model: UnCLIPModel, batches: list[int], peak_tflops: float,
               fp8_peak_tflops: float | None = None) -> dict:
    """FLOPs per forward of each stage (ours, fp16) at each batch, the run's total and its floor."""
    from runtime import UnCLIP

    pipe = UnCLIP(model, device="cuda", dtype=torch.float16, progress=False, cuda_graphs=False)
    s = pipe.cfg.sampling
    steps = {"clip_text": 1, "prior_context": 1, "prior_step": s.prior_steps, "decoder_context": 1,
             "decoder_step": s.decoder_steps}
    rows = {"clip_text": 2, "prior_context": 2, "prior_step": 2, "decoder_context": 2, "decoder_step": 2}
    for i, stage in enumerate(pipe.cfg.super_res):
        first, *last = super_res_stages(pipe.cfg, i)
        steps[first], rows[first] = stage.steps - len(last), 1
        steps.update({name: 1 for name in last})
        rows.update({name: 1 for name in last})
    out = {"peak_tflops": peak_tflops, "fp8_peak_tflops": fp8_peak_tflops, "batches": {}}
    # Counted on the reference path, the architecture's products as written (what the peers run):
    # torch's FLOP counter sees only its own operators (a prior step made wholly of cpp_ext linears
    # counts 0). The fused path does the same arithmetic but for the up blocks' folded
    # convolutions (`models.fused.upsampled_conv`, 4/9 of theirs), so it runs fewer products than
    # counted here (docs/kernels.md).
    kernels, cpp_ext.kernels = cpp_ext.kernels, None
    try:
        for n in batches:
            per_forward = {}
            for name in steps:
                x = stage_inputs(pipe, name, rows[name] * n)
                per_forward[name] = forward_flops(lambda name=name, x=x: pipe.engines[name](*x))
            total = sum(per_forward[k] * steps[k] for k in steps)
            out["batches"][n] = {"gflop_per_forward": {k: v / 1e9 for k, v in per_forward.items()},
                                 "tflop_per_call": total / 1e12,
                                 "floor_ms": total / (peak_tflops * 1e12) * 1e3}
            if fp8_peak_tflops:  # every FLOP at the FP8 GEMM rate: a floor no mixed-precision run reaches
                out["batches"][n]["floor_ms_fp8"] = total / (fp8_peak_tflops * 1e12) * 1e3
    finally:
        cpp_ext.kernels = kernels
    return out


def first_image(model: UnCLIPModel) -> dict:
    """A new Python process: import, load the model folder (fp16 safetensors), first image; twice,
    with an empty file of stored convolution choices (`models.conv_choices`: the race times every
    shape and stores its choices) and then with that file (a later start on this machine)."""
    from models import conv_choices
    from models.checkpoint import save_model

    folder = Path(tempfile.mkdtemp(prefix="unclip-bench-"))
    save_model(model.half(), model.cfg, folder)
    env = {**os.environ, conv_choices.ENV: str(folder / "conv_choices.json")}
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_image.py"), str(folder)],
                              capture_output=True, text=True, cwd=ROOT, check=False, env=env)
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"first-image process failed:\n{done.stderr[-3000:]}")
        runs.append({"new_process_to_first_image_s": wall, **json.loads(done.stdout.strip().splitlines()[-1])})
    return {**runs[0], "with_stored_choices": runs[1]}


def table(results: dict) -> str:
    """The results as a text table."""
    floor = results["flops"]
    lines = [f"GPU: {results['gpu']}; fp16; steps 25/25/7; matmul peak {floor['peak_tflops']:.0f} TFLOP/s"]
    for n in results["batch"]:
        f = floor["batches"][n]
        fp8_floor = f" (at the FP8 GEMM rate {f['floor_ms_fp8']:.0f} ms)" if "floor_ms_fp8" in f else ""
        lines.append(f"\n{n} image(s): {f['tflop_per_call']:.1f} TFLOP, FLOP floor {f['floor_ms']:.0f} ms{fp8_floor}")
        chain = results.get("super_res_stages", ["super_res_first"])
        lines.append(f"{'system':34} {'ms (min-max)':>22} {'img/s':>6} {'x eager peer':>12} {'share':>6} "
                     f"{'peak GiB':>8}  forward ms (prior b2 / decoder b2 / super-res b1, each stage)")
        peer_ms = results.get("peer_eager", {}).get("batches", {}).get(n, {}).get("ms")
        for key, label in (("ours", "unclip-rt (fp16, graphs, fused)"), ("ours_eager", "unclip-rt eager (no graphs)"),
                           ("ours_onnxruntime", "unclip-rt on ONNX Runtime CUDA"),
                           ("ours_auto", "unclip-rt auto (per-stage choice)"),
                           ("ours_fp8", "unclip-rt FP8 (super-res)"),
                           ("ours_fp8_calibrated", "unclip-rt FP8 (super-res), calib."),
                           ("ours_cutlass", "unclip-rt, CUTLASS convolutions"),
                           ("ours_cudnn", "unclip-rt, cuDNN convolutions"),
                           ("ours_splits", "unclip-rt, split-K in the race"),
                           ("ours_eager_race", "unclip-rt, race timed eagerly"),
                           ("ours_eager_race_again", "unclip-rt, eager race again"),
                           ("ours_graph_race_again", "unclip-rt, graph race again"),
                           ("ours_overlap", "unclip-rt, CUTLASS with PDL"),
                           ("ours_residual_in_conv", "unclip-rt, skips in the conv epilogue"),
                           ("ours_cudnn_attention", "unclip-rt, cuDNN attention"),
                           ("ours_no_unet_time_table", "unclip-rt, UNets without time table"),
                           ("ours_no_loop_projections", "unclip-rt, projections made per step"),
                           ("ours_fp8_calibrated_norm_fp16", "unclip-rt FP8 (s-r), calib., fp16 norms"),
                           ("ours_fp8_calibrated_residual_in_conv", "unclip-rt FP8 (s-r), cal., skips in conv"),
                           ("ours_fp8_calibrated_skips_fp8", "unclip-rt FP8 (s-r), cal., FP8 1x1 skips"),
                           ("ours_fp8_unets", "unclip-rt FP8 (decoder + super-res)"),
                           ("ours_fp8_unets_calibrated", "unclip-rt FP8 (dec. + s-r), calib."),
                           ("ours_fp8_unets_calibrated_norm_fp16", "unclip-rt FP8 (d.+s-r), cal., fp16 n."),
                           ("ours_fp8_unets_calibrated_residual_in_conv", "unclip-rt FP8 (d.+s-r), cal., skips"),
                           ("ours_fp8_unets_calibrated_skips_fp8", "unclip-rt FP8 (d.+s-r), cal., FP8 1x1"),
                           ("peer_eager", "diffusers UnCLIPPipeline eager"),
                           ("peer_compiled", "diffusers + torch.compile")):
            entry = results.get(key, {}).get("batches", {}).get(n)
            if not entry:
                continue
            fw = entry.get("forward_ms", {})
            fwd = " / ".join(f"{fw[k]:.2f}" if k in fw else "-" for k in (
                ("prior_step", "decoder_step", *chain) if key.startswith("ours") else
                ("prior", "decoder", "super_res_first")))
            ratio = f"{peer_ms / entry['ms']:.2f}x" if peer_ms else "-"
            spread = f"{entry['ms']:.0f} ({entry['ms_min']:.0f}-{entry['ms_max']:.0f})"
            lines.append(f"{label:34} {spread:>22} {entry['images_per_s']:6.2f} {ratio:>12} "
                         f"{f['floor_ms'] / entry['ms']:6.0%} {entry['peak_gib']:8.1f}  {fwd}")
    if "first_image" in results:
        fi = results["first_image"]
        for label, run in (("", fi), (", convolution choices stored", fi.get("with_stored_choices"))):
            if run:
                lines.append(f"\nnew process → first image (model on disk, fp16{label}): "
                             f"{run['new_process_to_first_image_s']:.1f} s (import {run['import_s']:.1f}, "
                             f"load {run['load_s']:.1f}, first image {run['first_image_s']:.1f})")
    if "cache_savings" in results.get("ours", {}):
        c = results["ours"]["cache_savings"]
        lines.append(f"K/V caches (batch 2): prior whole {c['prior_whole_ms']:.2f} → step {c['prior_step_ms']:.2f} ms; "
                     f"decoder whole {c['decoder_whole_ms']:.2f} → step {c['decoder_step_ms']:.2f} ms")
    return "\n".join(lines)


def bench_with_race(model: UnCLIPModel, args: argparse.Namespace, **settings: object) -> dict:
    """Ours in fp16 with the convolutions' race changed (`models.implicit_conv`'s module settings,
    e.g. SPLITS=(2, 4)): the choices made without them are set aside first, so
    that every shape races afresh, and put back after with the settings for the rows that follow;
    what this row kept is in its `cutlass_choice`, the races' wall time (host clock, all shapes)
    in its `race_s`."""
    from models import implicit_conv

    kept = dict(implicit_conv._best)
    race = implicit_conv._fastest
    racing = [0.0]

    def timed_race(*a, **kw):
        known = len(implicit_conv._best)
        start = time.perf_counter()
        entry = race(*a, **kw)
        if len(implicit_conv._best) > known:  # a shape raced now, not one already chosen
            racing[0] += time.perf_counter() - start
        return entry

    implicit_conv._best.clear()
    try:
        with mock.patch.multiple(implicit_conv, _fastest=timed_race, **settings):
            result = bench_ours(model, args, graphs=True)
            result["cutlass_choice"] = cutlass_choice()
        result["race_settings"] = {name: list(v) if isinstance(v, tuple) else v for name, v in settings.items()}
        result["race_s"] = round(racing[0], 2)
    finally:
        implicit_conv._best.clear()
        implicit_conv._best.update(kept)
    return result


def fp16_option_rows(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(result key, FusedOptions) of the extra fp16 rows asked for (`FP16_OPTION_ROWS`)."""
    from models.fused import FusedOptions

    return [(key, FusedOptions(**changes)) for flag, key, changes, _ in FP16_OPTION_ROWS
            if getattr(args, flag[2:].replace("-", "_"))]


def fp8_option_rows(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(row suffix, FusedOptions) of the extra rows each calibrated FP8 row gets: the norms writing
    fp16 for the convolutions to quantise (`--fp8-norm-fp16`), and the identity skips in the
    convolutions' epilogue (`--residual-in-conv`)."""
    from models.fused import FusedOptions

    rows = []
    if args.fp8_norm_fp16:
        rows.append(("norm_fp16", FusedOptions(norm_writes_e4m3=False)))
    if args.residual_in_conv:
        rows.append(("residual_in_conv", FusedOptions(residual_in_conv=True)))
    return rows


def bench_fp8_skips_in_fp8(model: UnCLIPModel, args: argparse.Namespace, networks: list[str] | None,
                           input_scales: dict[str, float]) -> dict:
    """Ours in FP8 with calibrated scales, the UNets' 1×1 skip convolutions in FP8 too
    (`models.fp8.policy.SKIP_CONVS` on while the pipeline converts its copy; put back after)."""
    from models.fp8 import policy

    with mock.patch.object(policy, "SKIP_CONVS", True):
        return bench_ours(model, args, graphs=True, precision="fp8", fp8_networks=networks, input_scales=input_scales)


def bench_with_setting(model: UnCLIPModel, args: argparse.Namespace, module: object, setter: str, getter: str,
                       value: object) -> dict:
    """Ours in fp16 with a kernel module's setting (`module.setter(value)`, read back by
    `module.getter()`) in force while its graphs are captured and timed; the setting is put back after."""
    if module is None or not hasattr(module, setter):
        return {"error": f"the kernels with {setter} are not built"}
    kept = getattr(module, getter)()
    getattr(module, setter)(value)
    try:
        result = bench_ours(model, args, graphs=True)
    finally:
        getattr(module, setter)(kept)
    return result


def cutlass_choice() -> dict[str, str]:
    """What the CUTLASS convolutions' per-shape race kept in this process (`models.implicit_conv`):
    "kind x-shape w-shape" → the configuration's name, or "cudnn"."""
    import cpp_ext
    from models import implicit_conv

    if cpp_ext.cutlass_conv is None:
        return {}
    return {f"{kind} x{list(x)} w{list(w)}": implicit_conv.describe(best)
            for (kind, x, w, _), best in implicit_conv._best.items()}


def fp16_choices(choices: dict[str, str]) -> dict[str, str]:
    """The fp16 shapes' entries of a `cutlass_choice` (what the fp16 rows race)."""
    return {shape: entry for shape, entry in choices.items() if shape.startswith("f16 ")}


def race_agreement(results: dict) -> dict[str, dict]:
    """For each pair of rows that raced the same entries the same way (the default row, graph-timed,
    and `ours_graph_race_again`; `ours_eager_race` and `ours_eager_race_again`): how many fp16
    shapes both raced and at how many their picks differ."""
    pairs = {"graph": ("ours", "ours_graph_race_again"), "eager": ("ours_eager_race", "ours_eager_race_again")}
    agreement = {}
    for timing, (first, second) in pairs.items():
        if "cutlass_choice" not in results.get(first, {}) or "cutlass_choice" not in results.get(second, {}):
            continue
        a, b = (fp16_choices(results[row]["cutlass_choice"]) for row in (first, second))
        shared = a.keys() & b.keys()
        agreement[timing] = {"shapes": len(shared), "differ": sum(a[k] != b[k] for k in shared),
                             "rows": [first, second]}
    return agreement


def write_results(results: dict, out: Path | None) -> None:
    """The results as JSON at `out` (atomically), where one is given."""
    if out is not None:
        atomic_write(out, lambda path: path.write_text(json.dumps(results, indent=1, default=str)))


def save_partial(results: dict, out: Path | None) -> None:
    """Write the systems measured so far, marked partial, so that a run stopped by a time limit keeps them."""
    write_results({**results, "partial": True}, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                     "source": str(args.diffusers) if args.diffusers else f"random:{args.config}", "prompt": PROMPT}
    if args.peer != "none" and len(get_config(args.config).super_res) != 1 and not args.diffusers:
        raise SystemExit(f"--config {args.config}: diffusers' UnCLIPPipeline has one super-res stage, this config "
                         f"{len(get_config(args.config).super_res)}; run it with --peer none")
    from models import implicit_conv

    implicit_conv.PERSISTENT = results["cutlass_persistent"] = not args.cutlass_plain
    peer, model = build(args)
    results["super_res_stages"] = [super_res_stages(model.cfg, i)[0] for i in range(len(model.cfg.super_res))]
    results["flops"] = flop_floor(model, args.batch, matmul_peak_tflops(),
                                  fp8_matmul_peak_tflops() if set(args.precision) - {"fp16"} else None)
    results["ours"] = bench_ours(model, args, graphs=True, cache_savings=True)
    save_partial(results, args.out)
    if args.ours_eager:
        results["ours_eager"] = bench_ours(model, args, graphs=False)
        save_partial(results, args.out)
    if args.cutlass_splits:
        results["ours_splits"] = bench_with_race(model, args, SPLITS=tuple(args.cutlass_splits))
        save_partial(results, args.out)
    if args.eager_race:
        results["ours_eager_race"] = bench_with_race(model, args, RACE_TIMING="eager")
        save_partial(results, args.out)
    if args.race_again:
        results["ours"]["cutlass_choice"] = fp16_choices(cutlass_choice())
        for timing in ("graph", "eager") if args.eager_race else ("graph",):
            results[f"ours_{timing}_race_again"] = bench_with_race(model, args, RACE_TIMING=timing)
            save_partial(results, args.out)
        results["race_agreement"] = race_agreement(results)
    if args.cutlass_overlap:  # the persistent CUTLASS convolutions launched by programmatic dependent launch
        results["ours_overlap"] = bench_with_setting(model, args, cpp_ext.cutlass_conv, "set_overlapped",
                                                     "overlapped", True)
        save_partial(results, args.out)
    for key, options in fp16_option_rows(args):  # ours in fp16 with one fusion or kernel choice changed
        results[key] = bench_ours(model, args, graphs=True, fused=options)
        save_partial(results, args.out)
    if args.fp8_conv_path:
        from models.fp8 import layers as fp8_layers

        fp8_layers.CONV_PATH = args.fp8_conv_path
        results["fp8_conv_path"] = args.fp8_conv_path
    fp8_variants = (("fp8", "ours_fp8", None), ("fp8-unets", "ours_fp8_unets", ["decoder", "super_res"]))
    for variant, key, networks in fp8_variants:
        if variant not in args.precision:
            continue
        for scales in args.fp8_scales:
            row = key if scales == "dynamic" else f"{key}_calibrated"
            try:
                fixed = calibrated_scales(model, networks) if scales == "calibrated" else None
                results[row] = bench_ours(model, args, graphs=True, precision="fp8", fp8_networks=networks,
                                          input_scales=fixed)
                for suffix, options in fp8_option_rows(args) if fixed is not None else ():
                    save_partial(results, args.out)
                    results[f"{row}_{suffix}"] = bench_ours(model, args, graphs=True, precision="fp8",
                                                            fp8_networks=networks, input_scales=fixed, fused=options)
                if fixed is not None and args.fp8_skips_fp8:
                    save_partial(results, args.out)
                    results[f"{row}_skips_fp8"] = bench_fp8_skips_in_fp8(model, args, networks, fixed)
            except Exception as exc:  # reported, not fatal to the other systems
                results[row] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{variant} ({scales} scales):", results[row]["error"], flush=True)
            save_partial(results, args.out)
    # The eager peer before ONNX Runtime's rows and the compiled peer last: the longest systems come
    # after the quick ones, so a run stopped early keeps the comparison it most needs.
    if args.peer == "eager":
        results["peer_eager"] = bench_peer(peer, args, compiled=False)
        save_partial(results, args.out)
    if "onnxruntime" in args.backends:
        results["ours_onnxruntime"] = bench_ours_onnxruntime(
            model, args, lambda part: save_partial({**results, "ours_onnxruntime": part}, args.out))
        if "auto" in results["ours_onnxruntime"]:
            results["ours_auto"] = results["ours_onnxruntime"].pop("auto")
        save_partial(results, args.out)
    if args.peer == "eager" and args.peer_compile:
        results["peer_compiled"] = bench_peer(peer, args, compiled=True)
    del peer
    torch.cuda.empty_cache()
    if args.first_image:
        results["first_image"] = first_image(model)
    results["cutlass_choice"] = cutlass_choice()
    text = table(results)
    print(text)
    write_results({**results, "table": text}, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
