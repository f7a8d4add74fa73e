"""Where one `generate` call's wall time goes on the GPU: the host's lead before the first
kernel (and, without the profiler, before the first graph replay), the GPU's busy time, every
idle gap between kernels (with the kernels around it) and the tail after the last kernel; and,
per stage, the costliest operations of one eager forward with their input shapes. Karlo's
architecture with random weights, fp16, the runtime's defaults.

    python benchmarks/timeline.py --batch 1 --out docs/results/timeline.json

A CUDA graph's kernels are recorded by the profiler like any others (CUPTI), so the gaps
include those inside the loops' graphs: launch latency between dependent kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from export.build_engines import random_model  # noqa: E402
from models.checkpoint import atomic_write  # noqa: E402

PROMPT = "a high-resolution photograph of a red fox sitting in fresh snow"
STAGE_ROWS = {"prior_step": 2, "decoder_step": 2, "super_res_first": 1}


GAP_BINS_US = (2.0, 5.0, 20.0, 100.0)  # idle gaps are counted by size: launch latency, then longer waits


def device_spans(events) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of the device's own work (kernels, copies, sets), by start. Left
    out: the profiler's GPU-side ranges of `record_function` annotations, which span every kernel
    inside them (the runtime's and this script's) and would hide every gap."""
    annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)}
    out = []
    for e in events:
        if (e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
                and not getattr(e, "is_user_annotation", False) and e.name not in annotations):
            out.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(out)


def idle_summary(spans: list[tuple[float, float, str]], origin: float, gap_us: float, top: int) -> dict:
    """The device's busy time over `spans` (overlapping ones, e.g. kernels launched early by PDL or
    on a side stream, counted once), its idle gaps counted by size (`GAP_BINS_US`), the largest
    ones at least `gap_us` long with the work either side, and the longest single spans. µs;
    `at_ms` from `origin`."""
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = spans[0]
    for start, end, name in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, cur_end, cur_name, name))
            cur_start = start
        if end >= cur_end:
            cur_end, cur_name = end, name
    busy += cur_end - cur_start
    first, last = spans[0][0], max(s[1] for s in spans)
    bins = {}
    for low, high in zip((0.0, *GAP_BINS_US), (*GAP_BINS_US, float("inf")), strict=True):
        inside = [g[0] for g in gaps if low <= g[0] < high]
        bins[f"{low:g}-{high:g}us"] = {"gaps": len(inside), "us": sum(inside)}
    listed = sorted((g for g in gaps if g[0] >= gap_us), key=lambda g: -g[0])
    longest = sorted(spans, key=lambda sp: sp[0] - sp[1])[:top]
    return {"gpu_span_us": last - first, "gpu_busy_us": busy, "gpu_idle_us": (last - first) - busy,
            "gaps": len(gaps), "gaps_by_size": bins, "device_events": len(spans),
            "largest_gaps": [{"us": us, "at_ms": (at - origin) / 1e3, "after": a[:90], "before": b[:90]}
                             for us, at, a, b in listed[:top]],
            "longest_events": [{"us": end - start, "at_ms": (start - origin) / 1e3, "name": name[:90]}
                               for start, end, name in longest]}


def kernel_name(name: str) -> str:
    """A kernel's family: its name without template arguments and parameter lists (CUTLASS's and
    torch's kernels differ only there from one instance to the next); mangled names as they are."""
    name = name.replace("(anonymous namespace)::", "")
    for mark in ("<", "("):
        name = name.split(mark, 1)[0]
    return name.rsplit("::", 1)[-1].strip() or name


def kernel_table(spans: list[tuple[float, float, str]], top: int) -> list[dict]:
    """Device time by kernel family (`kernel_name`) over `spans` (by start), costliest first:
    launches, and total and mean µs of each kernel's own time, what it adds after the work before
    it ended: a kernel launched early (programmatic dependent launch) waits inside its span for
    its predecessor, and that wait is the predecessor's time. The totals add up to the busy time."""
    totals: dict[str, list[float]] = {}
    reached = float("-inf")
    for start, end, name in spans:
        entry = totals.setdefault(kernel_name(name), [0, 0.0])
        entry[0] += 1
        entry[1] += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    rows = [{"kernel": k[:90], "launches": n, "us": us, "mean_us": us / n} for k, (n, us) in totals.items()]
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def host_lead_ops(events, c0: float, first_kernel: float, top: int) -> list[dict]:
    """The host's work before the call's first kernel: CPU events that start in that lead, longest
    first (nested ones included, so a parent and its children both show), µs."""
    rows = [{"op": e.name[:90], "us": e.time_range.end - e.time_range.start, "at_us": e.time_range.start - c0}
            for e in events
            if e.device_type == torch.autograd.DeviceType.CPU and c0 < e.time_range.start < first_kernel]
    rows.sort(key=lambda r: -r["us"])
    return rows[:top]


def unprofiled_calls(call: Callable[[], object], runs: int = 5) -> tuple[list[float], list[float]]:
    """`runs` calls of `call()` without the profiler: each one's wall milliseconds (synchronised),
    and the milliseconds from its start to its first CUDA-graph replay on the host's clock: the
    host's lead before the GPU's main work without the profiler's own work in it (the text
    encoder's replay is a call's first; only uploads come before it). Both sorted; a call that
    replays no graph has no lead."""
    graph_type = torch.cuda.CUDAGraph
    original = graph_type.replay
    first: list[float] = []

    def replay(graph):
        if not first:
            first.append(time.perf_counter())
        return original(graph)

    walls, leads = [], []
    graph_type.replay = replay
    try:
        for _ in range(runs):
            first.clear()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            walls.append((time.perf_counter() - start) * 1e3)
            if first:
                leads.append((first[0] - start) * 1e3)
    finally:
        graph_type.replay = original
    return sorted(walls), sorted(leads)


def call_timeline(pipe, batch: int, gap_us: float, top: int) -> dict:
    """One profiled `generate` call: host lead, busy time, idle gaps and tail, µs."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("generate_call"):
            pipe.generate(PROMPT, num_images_per_prompt=batch, seed=1, output_type="np")
        torch.cuda.synchronize()
    events = prof.events()
    call = next(e for e in events if e.name == "generate_call" and e.device_type == torch.autograd.DeviceType.CPU)
    c0, c1 = call.time_range.start, call.time_range.end
    spans = [sp for sp in device_spans(events) if sp[0] >= c0 - 1]
    if not spans:
        return {"error": "the profiler recorded no device-side events"}
    summary = idle_summary(spans, c0, gap_us, top)
    return {"call_us": c1 - c0, "host_lead_us": spans[0][0] - c0, "tail_us": c1 - max(sp[1] for sp in spans),
            **summary, "kernels": kernel_table(spans, 2 * top),
            "host_lead_ops": host_lead_ops(events, c0, spans[0][0], top)}


def stage_ops(pipe, name: str, batch: int, top: int) -> list[dict]:
    """The costliest operators of one eager forward of a stage's engine, as the runtime runs it
    (device time, grouped by input shapes). The extension's own kernels are called outside torch's
    operators and are not listed."""
    from torch.profiler import ProfilerActivity, profile

    engine = pipe.engines[name]
    inputs = list(engine.signature.sample_inputs(STAGE_ROWS[name] * batch, torch.float16, "cuda",
                                                 torch.Generator().manual_seed(0)).values())
    engine(*inputs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        engine(*inputs)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        # the operators that launched kernels themselves (self time): not the kernels, nor the
        # operators wrapping those (conv2d → convolution → cudnn_convolution would list one three times)
        if e.self_device_time_total <= 0 or e.device_type != torch.autograd.DeviceType.CPU or e.key.startswith("cuda"):
            continue
        rows.append({"op": e.key[:80], "shapes": str(e.input_shapes)[:200], "calls": e.count,
                     "device_us": e.self_device_time_total})
    rows.sort(key=lambda r: -r["device_us"])
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="karlo")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="images per call")
    p.add_argument("--gap-us", type=float, default=20.0, help="list idle gaps at least this long")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--stages", nargs="*", default=list(STAGE_ROWS), help="stages whose operators are listed")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from runtime import UnCLIP

    model = random_model(args.config, device="cuda")
    pipe = UnCLIP(model, device="cuda", dtype=torch.float16, progress=False)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "calls": {}, "stage_ops": {}}
    for n in args.batch:
        for _ in range(2):  # capture the graphs, race the convolutions
            pipe.generate(PROMPT, num_images_per_prompt=n, seed=0, output_type="np")
        walls, leads = unprofiled_calls(lambda n=n: pipe.generate(PROMPT, num_images_per_prompt=n, seed=0,
                                                                  output_type="np"))
        entry = call_timeline(pipe, n, args.gap_us, args.top)
        entry["wall_ms_unprofiled"], entry["ms_to_first_replay_unprofiled"] = walls, leads
        results["calls"][n] = entry
        lists = ("largest_gaps", "longest_events", "kernels", "host_lead_ops")
        print(n, json.dumps({k: v for k, v in entry.items() if k not in lists}), flush=True)
        for g in entry.get("largest_gaps", [])[:10]:
            print("  gap", json.dumps(g), flush=True)
        for e in entry.get("longest_events", [])[:5]:
            print("  event", json.dumps(e), flush=True)
        for k in entry.get("kernels", []):
            print(f"  kernel {k['us']:10.1f} us x{k['launches']:<6} {k['mean_us']:8.2f} {k['kernel']}", flush=True)
        for o in entry.get("host_lead_ops", [])[:15]:
            print(f"  lead {o['us']:9.1f} us at {o['at_us']:8.1f} {o['op']}", flush=True)
    with torch.no_grad():
        for name in args.stages:
            rows = results["stage_ops"][name] = stage_ops(pipe, name, args.batch[0], args.top)
            print(name, flush=True)
            for r in rows:
                print(f"  {r['device_us']:9.1f} us  x{r['calls']:<3} {r['op'][:40]:40} {r['shapes'][:110]}", flush=True)
    if args.out:
        atomic_write(args.out, lambda path: path.write_text(json.dumps(results, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
