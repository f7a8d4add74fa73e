"""`models.race_timing`'s count of operand copies (how many sets a graph race cycles through so
that together they take twice the L2 cache); the timings themselves need a GPU
(tests/gpu/test_cutlass_conv.py)."""

from __future__ import annotations

import pytest
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
