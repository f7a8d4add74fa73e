"""Checks of public-API arguments: each returns the value in canonical form or raises a
`ValueError` that names the argument, the accepted range and what was given."""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def check_scale(name: str, value, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if value > high:
        raise ValueError(f"{name} must be at most {high:g} (larger guidance overflows the sampling math), "
                         f"got {value!r}")
    return float(value)


def check_seed(value) -> int:
    return check_int("seed", value, 0, 2**63 - 1)
