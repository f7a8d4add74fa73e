"""Checks of public-API arguments: each returns the value in canonical form or raises a
`ValueError` that names the argument, the accepted range and what was given."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.configs import UnCLIPConfig


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


def check_chain(size, super_res_steps, cfg: UnCLIPConfig) -> tuple[int, ...]:
    """The steps of each super-res stage that runs for images of `size` (None: the model's default
    size; the decoder's: none runs), `super_res_steps` as `check_super_res_steps` takes it against
    those stages' own steps."""
    stages = check_size(size, cfg.image_sizes, cfg.default_image_size)
    return check_super_res_steps(super_res_steps, tuple(stage.steps for stage in cfg.super_res[:stages]))


def check_size(size, sizes: tuple[int, ...], default: int | None = None) -> int:
    """How many super-res stages run for output images of `size` (None: `default`, else the whole
    chain): `sizes` are the decoder's size, then each stage's (0 stages for the decoder's own)."""
    if size is None:
        size = sizes[-1] if default is None else default
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size not in sizes:
        raise ValueError(f"size must be one of this model's image sizes {list(sizes)} (the decoder's, then each "
                         f"super-res stage's), got {size!r}")
    return sizes.index(size)


def check_super_res_steps(value, defaults: tuple[int, ...]) -> tuple[int, ...]:
    """The steps of each super-res stage that runs (`defaults`: each one's own): None for the
    defaults, one integer for every stage, or one integer per stage."""
    if value is None:
        return tuple(defaults)
    if isinstance(value, list | tuple):
        if len(value) != len(defaults):
            raise ValueError(f"super_res_steps must give one value per super-res stage that runs ({len(defaults)}), "
                             f"got {len(value)}: {list(value)!r}")
        return tuple(check_int(f"super_res_steps[{i}]", v, 2, 1000) for i, v in enumerate(value))
    if not defaults:
        raise ValueError(f"super_res_steps was given ({value!r}) but no super-res stage runs")
    steps = check_int("super_res_steps", value, 2, 1000)
    return (steps,) * len(defaults)
