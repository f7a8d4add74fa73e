"""`models.race_timing`: the count of operand copies (how many sets a graph race cycles through
so that together they take twice the L2 cache), and the graph race's bookkeeping with the GPU's
graph and event calls stood in for (what it times, over which copies, in which order, what it
leaves out); its timings on a GPU: tests/gpu/test_cutlass_conv.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models.race_timing import copies_for

MIB = 2**20


def test_copies_cover_twice_the_l2_cache_within_their_bounds():
    assert copies_for(30 * MIB, 50 * MIB) == 4  # 120 MiB ≥ 100 MiB, 3 would be 90
    assert copies_for(100 * MIB, 50 * MIB) == 2  # one set fills the cache twice over: still two
    assert copies_for(1 * MIB, 50 * MIB) == 32  # would need 100: capped
    assert copies_for(1 * MIB, 50 * MIB, most=200) == 100
    assert copies_for(5 * MIB, 0) == 2


@given(st.integers(1, 2**34), st.integers(0, 2**28), st.integers(1, 8), st.integers(8, 256))
def test_copies_are_the_fewest_that_cover_the_cache_or_a_bound(operand_bytes, l2_bytes, least, most):
    n = copies_for(operand_bytes, l2_bytes, least, most)
    assert least <= n <= most
    if n < most:  # not capped: these cover twice the cache
        assert n * operand_bytes >= 2 * l2_bytes
    if n > least:  # not raised to the floor: one fewer would not
        assert (n - 1) * operand_bytes < 2 * l2_bytes


@pytest.mark.parametrize(("operand_bytes", "l2_bytes"), [(0, 50), (-1, 50), (10, -1)])
def test_nonsense_sizes_are_refused(operand_bytes, l2_bytes):
    with pytest.raises(ValueError, match="operand_bytes"):
        copies_for(operand_bytes, l2_bytes)


class FakeGpu:
    """torch.cuda's graph and event calls stood in for on the CPU: a launch advances a clock by its
    entry's cost, except inside a capture, where it is recorded into the graph and runs (advances
    the clock) at each replay; events read the clock."""

    def __init__(self, monkeypatch, l2_bytes: int) -> None:
        self.clock, self.capturing, self.replays = 0.0, None, []
        fake = self

        class Graph:
            def __init__(self):
                self.calls = []

            def replay(self):
                fake.replays.append(self)
                for run in self.calls:
                    run()

        class Capture:
            def __init__(self, graph, pool=None):
                self.graph, self.pool = graph, pool

            def __enter__(self):
                fake.capturing = self.graph

            def __exit__(self, *exc):
                fake.capturing = None
                return False

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = fake.clock

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return other.at - self.at

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: fake.capturing is not None)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=l2_bytes))

    def launch(self, entry_cost: float, on_capture=None):
        if self.capturing is not None:
            if on_capture is not None:
                on_capture()
            self.capturing.calls.append(lambda: self._advance(entry_cost))
        else:
            self._advance(entry_cost)

    def _advance(self, cost: float) -> None:
        self.clock += cost


def test_the_graph_race_times_one_launch_per_copy_in_interleaved_rounds(monkeypatch):
    """`graph_times` with the GPU's calls stood in for: each entry's time is one launch's (the
    replay's time over the copies it launched on), the copies are the operands first and then
    distinct clones of them (`copies_for` of their bytes), the rounds take the entries in turn, and
    an entry whose eager launch or whose capture raises RuntimeError is left out."""
    operands = (torch.zeros(64), torch.ones(32))  # 384 bytes
    gpu = FakeGpu(monkeypatch, l2_bytes=4 * 384)  # twice the cache: 8 copies
    costs = {"slow": 3.0, "fast": 1.0, "middle": 2.0, "refused": 1.0, "uncapturable": 0.5}
    seen: dict[str, list[tuple[int, ...]]] = {}

    def launch(entry, *ops):
        if entry == "refused":
            raise RuntimeError("this tile shape cannot implement the shape")
        if gpu.capturing is not None:
            seen.setdefault(entry, []).append(tuple(t.data_ptr() for t in ops))
            assert all(torch.equal(t, o) for t, o in zip(ops, operands, strict=True))  # copies of the operands

        def refuse_capture():
            if entry == "uncapturable":
                raise RuntimeError("operation not permitted when stream is capturing")
        gpu.launch(costs[entry], refuse_capture)

    from models import race_timing

    times = race_timing.graph_times(list(costs), launch, operands, rounds=3)
    assert times == {"slow": 3.0, "fast": 1.0, "middle": 2.0}
    sets = seen["fast"]
    assert len(sets) == 8 == race_timing.copies_for(384, 4 * 384)
    assert sets[0] == tuple(t.data_ptr() for t in operands) and len(set(sets)) == 8  # the operands, then clones
    assert len(gpu.replays) == 9 and gpu.replays[:3] == gpu.replays[3:6] == gpu.replays[6:]  # rounds in turn
    assert len({id(g) for g in gpu.replays[:3]}) == 3


def test_the_eager_race_times_its_launches_after_an_untimed_one(monkeypatch):
    """`eager_times`: each entry's time is its `launches` timed launches (the first, untimed one
    left out), and an entry whose first launch raises RuntimeError is left out."""
    gpu = FakeGpu(monkeypatch, l2_bytes=0)
    costs = {"slow": 3.0, "fast": 1.0, "refused": 1.0}
    calls = []

    def launch(entry, *ops):
        calls.append(entry)
        if entry == "refused":
            raise RuntimeError("this tile shape cannot implement the shape")
        gpu.launch(costs[entry])

    from models import race_timing

    assert race_timing.eager_times(list(costs), launch, (torch.zeros(4),), launches=5) == {"slow": 15.0, "fast": 5.0}
    assert calls == ["slow"] * 6 + ["fast"] * 6 + ["refused"]


def test_race_agreement_counts_the_fp16_shapes_two_races_of_one_timing_pick_differently():
    """`latency.py --race-again`'s summary: per timing, the fp16 shapes both rows raced and at how
    many they differ; e4m3 shapes (the FP8 rows' race) and shapes only one row raced are not
    counted, and a timing whose second row is missing is left out."""
    from benchmarks.latency import race_agreement

    first = {"f16 x[1] w[1]": "cudnn", "f16 x[2] w[2]": "f16_a", "f16 x[3] w[3]": "f16_b",
             "e4m3 x[1] w[1]": "e4m3_a"}
    again = {"f16 x[1] w[1]": "cudnn", "f16 x[2] w[2]": "f16_b", "e4m3 x[1] w[1]": "e4m3_b",
             "f16 x[9] w[9]": "f16_a"}
    results = {"ours": {"cutlass_choice": first}, "ours_graph_race_again": {"cutlass_choice": again},
               "ours_eager_race": {"cutlass_choice": first}}
    assert race_agreement(results) == {
        "graph": {"shapes": 2, "differ": 1, "rows": ["ours", "ours_graph_race_again"]}}
    results["ours_eager_race_again"] = {"cutlass_choice": dict(first)}
    assert race_agreement(results)["eager"] == {"shapes": 3, "differ": 0,
                                                "rows": ["ours_eager_race", "ours_eager_race_again"]}


def test_a_race_row_races_afresh_with_its_settings_and_puts_everything_back(monkeypatch):
    """`latency.py`'s race rows (`bench_with_race`): during the row the settings are in force and
    no earlier choice is kept; `race_s` counts only the races that chose a new shape; after it the
    settings, `_fastest` and the earlier choices are back."""
    from benchmarks import latency
    from models import implicit_conv

    monkeypatch.setattr(implicit_conv, "_best", {("f16", "earlier"): 1})
    seen = {}

    def fastest(kind, key, launch, operands, others=()):
        if (kind, key) not in implicit_conv._best:
            implicit_conv._best[(kind, key)] = 0
        return implicit_conv._best[(kind, key)]

    def bench(model, args, graphs):
        seen.update(timing=implicit_conv.RACE_TIMING, best=dict(implicit_conv._best))
        implicit_conv._fastest("f16", "new", None, ())
        implicit_conv._fastest("f16", "new", None, ())  # chosen already: not a race
        return {}

    monkeypatch.setattr(implicit_conv, "_fastest", fastest)
    monkeypatch.setattr(latency, "bench_ours", bench)
    monkeypatch.setattr(latency, "cutlass_choice", lambda: {"f16 new": "f16_a"})
    before = implicit_conv.RACE_TIMING
    other = "eager" if before == "graph" else "graph"
    result = latency.bench_with_race(None, None, RACE_TIMING=other)
    assert seen == {"timing": other, "best": {}}
    assert result["race_settings"] == {"RACE_TIMING": other} and result["cutlass_choice"] == {"f16 new": "f16_a"}
    assert result["race_s"] >= 0
    assert implicit_conv.RACE_TIMING == before and implicit_conv._fastest is fastest
    assert implicit_conv._best == {("f16", "earlier"): 1}
