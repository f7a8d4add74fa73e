"""`benchmarks/timeline.py`'s arithmetic on made-up profiler events: what counts as the device's
work (not the GPU-side ranges of annotations, which span the kernels inside them), busy time with
overlapping kernels counted once, and the idle gaps by size."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks.timeline import device_spans, host_lead_ops, idle_summary, kernel_table

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def event(name, start, end, device=CUDA, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           is_user_annotation=annotation)


def test_annotations_and_host_events_are_not_device_work():
    events = [
        event("generate_call", 0, 1000, CPU, annotation=True),
        event("generate_call", 10, 900, annotation=True),  # its GPU-side range: spans everything
        event("decoder", 100, 700),  # a GPU-side range of an annotation not flagged as one: by its name
        event("decoder", 90, 710, CPU, annotation=True),
        event("kernel_b", 300, 400),
        event("kernel_a", 10, 200),
        event("cudaLaunchKernel", 5, 8, CPU),
        event("empty", 500, 500),
    ]
    assert device_spans(events) == [(10, 200, "kernel_a"), (300, 400, "kernel_b")]


def test_busy_time_counts_overlaps_once_and_gaps_are_binned():
    spans = [(0.0, 10.0, "a"), (5.0, 12.0, "b (PDL, early)"), (13.0, 20.0, "c"), (23.5, 30.0, "d"),
             (40.0, 50.0, "e"), (40.0, 45.0, "f (side stream)"), (200.0, 210.0, "g")]
    s = idle_summary(spans, origin=0.0, gap_us=5.0, top=3)
    assert s["gpu_span_us"] == 210.0
    assert s["gpu_busy_us"] == pytest.approx(12 + 7 + 6.5 + 10 + 10)
    assert s["gpu_idle_us"] == pytest.approx(1 + 3.5 + 10 + 150)
    assert s["gaps"] == 4
    assert s["gaps_by_size"] == {"0-2us": {"gaps": 1, "us": 1.0}, "2-5us": {"gaps": 1, "us": 3.5},
                                 "5-20us": {"gaps": 1, "us": 10.0}, "20-100us": {"gaps": 0, "us": 0},
                                 "100-infus": {"gaps": 1, "us": 150.0}}
    assert [(g["us"], g["after"], g["before"]) for g in s["largest_gaps"]] == [(150.0, "e", "g"), (10.0, "d", "e")]
    assert s["largest_gaps"][0]["at_ms"] == pytest.approx(0.05)
    assert [e["name"] for e in s["longest_events"]] == ["a", "e", "g"]


def test_kernels_are_tabled_by_family_with_overlaps_counted_once():
    spans = [(0.0, 10.0, "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<A, B>>(Params)"),
             (8.0, 14.0, "void unclip_rt::(anonymous namespace)::normalize<__half, 8>(float const*, __half*)"),
             (20.0, 23.0, "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<C, D>>(Params)"),
             (30.0, 31.0, "void unclip_rt::(anonymous namespace)::normalize<float, 4>(float const*)")]
    rows = kernel_table(spans, top=5)
    # the norm launched early (at 8) waited for the product until 10: its own time is 4, not 6
    assert [(r["kernel"], r["launches"], r["us"]) for r in rows] == [("device_kernel", 2, 13.0), ("normalize", 2, 5.0)]
    assert rows[1]["mean_us"] == 2.5
    assert sum(r["us"] for r in rows) == idle_summary(spans, 0.0, 1.0, 1)["gpu_busy_us"]
    assert kernel_table(spans, top=1) == rows[:1]


def test_host_lead_lists_only_cpu_work_before_the_first_kernel():
    events = [event("tokenize", 10, 400, CPU), event("aten::randn", 450, 460, CPU),
              event("late_op", 900, 950, CPU), event("kernel", 500, 600)]
    rows = host_lead_ops(events, c0=0.0, first_kernel=500.0, top=5)
    assert [(r["op"], r["us"]) for r in rows] == [("tokenize", 390), ("aten::randn", 10)]


def test_unprofiled_calls_time_each_call_and_its_first_replay_from_its_start(monkeypatch):
    """`unprofiled_calls` times each call and stamps its first CUDA-graph replay (host time), and
    puts `CUDAGraph.replay` back after, also when the call raises."""
    import time

    from benchmarks.timeline import unprofiled_calls

    replays = []
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(graph))
    patched = torch.cuda.CUDAGraph.replay

    def call():
        time.sleep(0.02)
        torch.cuda.CUDAGraph.replay("first")
        time.sleep(0.05)
        torch.cuda.CUDAGraph.replay("second")

    walls, leads = unprofiled_calls(call, runs=3)
    assert len(walls) == 3 and all(70 <= ms for ms in walls), walls  # the whole call
    assert len(leads) == 3 and all(19 <= ms < 45 for ms in leads), leads  # the first replay's, not the second's
    assert replays == ["first", "second"] * 3 and torch.cuda.CUDAGraph.replay is patched
    assert unprofiled_calls(lambda: None, runs=2)[1] == []  # no replay: no lead to report

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        unprofiled_calls(failing, runs=1)
    assert torch.cuda.CUDAGraph.replay is patched
