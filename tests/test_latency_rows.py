"""`benchmarks/latency.py`'s extra fp16 rows, one per fused-path option a flag changes."""

from __future__ import annotations

from models.fused import FusedOptions


def test_latency_rows_name_each_option_once_and_set_it():
    """`benchmarks/latency.py`'s extra fp16 rows (`FP16_OPTION_ROWS`): each flag asked gives its
    row with its options changed from the defaults, the fold's two among them."""
    import argparse
    import dataclasses

    from benchmarks import latency

    rows = latency.FP16_OPTION_ROWS
    assert len({r[0] for r in rows}) == len({r[1] for r in rows}) == len(rows)
    fields = {f.name for f in dataclasses.fields(FusedOptions)}
    assert all(set(changes) <= fields for _, _, changes, _ in rows)
    asked = {flag[2:].replace("-", "_"): flag in ("--no-fold-upsampling", "--fold-race") for flag, *_ in rows}
    got = dict(latency.fp16_option_rows(argparse.Namespace(**asked)))
    assert set(got) == {"ours_no_fold_upsampling", "ours_fold_race"}
    assert got["ours_no_fold_upsampling"] == FusedOptions(fold_upsampling=False)
    assert got["ours_fold_race"] == FusedOptions(fold_race=True)
