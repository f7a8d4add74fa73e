"""Per-forward time of one stage under each way of running it, at Karlo's shapes in fp16 with
random weights: eager modules replayed from a CUDA graph (`graph`), the same in channels-last
memory (`channels_last`), and an AOTInductor package (`aoti`: torch.export + Inductor, compiled
ahead of time, loaded without recompiling) replayed from a CUDA graph — with compile and load
times. This is how the engine kinds of `export.build_engines` are chosen, stage by stage.

    python benchmarks/stage_variants.py --stages super_res_first decoder_step prior_step --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import graph_ms  # noqa: E402
from export.build_engines import random_model  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402
from runtime.backends.signatures import is_unet_stage, signatures, stage_module  # noqa: E402

ROWS = {"prior_step": 2, "prior_context": 2, "decoder_step": 2, "decoder_context": 2, "super_res_first": 1,
        "super_res_last": 1, "clip_text": 2}


def _inputs(sig, batch: int) -> list[torch.Tensor]:
    return list(sig.sample_inputs(batch, torch.float16, "cuda", torch.Generator().manual_seed(0)).values())


def variant_graph(module, inputs) -> dict:
    return {"ms": graph_ms(lambda: module(*inputs))}


def variant_channels_last(module, inputs) -> dict:
    module.to(memory_format=torch.channels_last)
    x = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs]
    try:
        return {"ms": graph_ms(lambda: module(*x))}
    finally:
        module.to(memory_format=torch.contiguous_format)


def variant_aoti(module, inputs) -> dict:
    start = time.perf_counter()
    program = torch.export.export(module, tuple(inputs))
    exported = time.perf_counter()
    path = Path(tempfile.mkdtemp()) / "stage.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    compiled = time.perf_counter()
    runner = torch._inductor.aoti_load_package(str(path))
    loaded = time.perf_counter()
    ref = module(*inputs)[0].float()
    got = runner(*inputs)[0].float()
    err = float((got - ref).abs().max() / ref.abs().max())
    return {"ms": graph_ms(lambda: runner(*inputs)), "export_s": exported - start, "compile_s": compiled - exported,
            "load_s": loaded - compiled, "max_rel_err_vs_eager": err, "package_mb": path.stat().st_size / 2**20}


def variant_inductor(module, inputs) -> dict:
    start = time.perf_counter()
    compiled = torch.compile(module, mode="default", fullgraph=True)
    compiled(*inputs)
    torch.cuda.synchronize()
    return {"ms": graph_ms(lambda: compiled(*inputs)), "compile_s": time.perf_counter() - start}


VARIANTS = {"graph": variant_graph, "channels_last": variant_channels_last, "inductor": variant_inductor,
            "aoti": variant_aoti}


# kernel families by name, first match wins: what share of a forward each takes (`kernel_shares`)
KERNEL_FAMILIES = (
    ("convolution", re.compile(r"fprop|conv|implicit_gemm|_cutlass_conv|cutlass.*Conv", re.I)),
    ("group norm", re.compile(r"group_norm|groupnorm", re.I)),
    ("residual join", re.compile(r"bias_residual|residual", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|softmax", re.I)),
    ("matrix product", re.compile(r"gemm|nvjet|cublas|skinny|linear", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled|reduce|copy|cat|fill", re.I)),
)


def kernel_shares(events) -> dict:
    """The profiled CUDA kernels grouped into `KERNEL_FAMILIES` ("other" for the rest): per family
    its µs, launches and share of the kernels' total, largest first."""
    families: dict[str, dict] = {}
    for event in events:
        us = event.self_device_time_total
        if us <= 0:
            continue
        name = next((f for f, pattern in KERNEL_FAMILIES if pattern.search(event.key)), "other")
        entry = families.setdefault(name, {"us": 0.0, "launches": 0})
        entry["us"] += us
        entry["launches"] += event.count
    total = sum(e["us"] for e in families.values())
    return {"total_us": total, "families": {
        name: {**e, "share": e["us"] / total} for name, e in sorted(families.items(), key=lambda kv: -kv[1]["us"])}}


def profile(module, inputs, top: int = 12) -> tuple[str, dict]:
    """The top CUDA kernels of one eager forward (a table) and their families' shares. Kernels
    launched by programmatic dependent launch count their on-GPU wait for the kernel before as
    theirs: set UNCLIP_RT_NO_PDL=1 for shares that add up to the forward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    module(*inputs)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        module(*inputs)
        torch.cuda.synchronize()
    events = prof.key_averages()
    shares = kernel_shares(events) | {"pdl": os.environ.get("UNCLIP_RT_NO_PDL") is None}
    return events.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70), shares


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="karlo")
    p.add_argument("--stages", nargs="+", default=["super_res_first", "decoder_step", "prior_step"])
    p.add_argument("--batch", type=int, default=1, help="images (CFG-doubled stages see twice as many rows)")
    p.add_argument("--variants", nargs="+", default=["graph", "channels_last", "aoti"], choices=list(VARIANTS))
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one eager forward "
                   "(in channels-last memory for the UNet stages)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    model = random_model(args.config, device="cuda").half()
    sigs = signatures(model.cfg)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch, "stages": {}}
    with torch.no_grad():
        for name in args.stages:
            module = stage_module(model, name)
            inputs = _inputs(sigs[name], ROWS[name] * args.batch)
            row = results["stages"][name] = {}
            for variant in args.variants:
                try:
                    row[variant] = VARIANTS[variant](module, inputs)
                except Exception as exc:  # report and go on: one failing variant must not hide the others
                    row[variant] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    traceback.print_exc()
                print(name, variant, json.dumps(row[variant]), flush=True)
            if args.profile:
                if is_unet_stage(name):
                    module.to(memory_format=torch.channels_last)
                    inputs = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in inputs]
                table, row["profile"] = profile(module, inputs)
                print(table, json.dumps(row["profile"], indent=1), sep="\n", flush=True)
    if args.out:
        text = json.dumps(results, indent=1)
        atomic_write(args.out, lambda path: path.write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
