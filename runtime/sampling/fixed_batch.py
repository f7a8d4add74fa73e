"""Running a stage at one fixed batch size, whatever the batch of the call.

A GPU kernel's rounding can depend on the batch it runs at (the library picks another kernel, or
another split of a reduction, for another row count), while a stage's rows never mix: a matrix
product, a norm or an attention row depends only on its own inputs. So a stage that always runs at
the same row count gives each row the same numbers whatever shares its call. The runtime does that
for the cheap stages whose loops amplify rounding (the text encoder and the prior): a row's result
is then the same alone or joined with other requests, which a server that batches requests needs,
at the price of computing padding rows. Padding repeats the last real row, so it holds ordinary
values (never zeros a network has not seen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def pad_rows(t: torch.Tensor, rows: int, dim: int = 0, pinned: bool = False) -> torch.Tensor:
    """`t` with `rows` rows along `dim`: the last row repeated after its own (`t` itself if it has
    them already); `pinned`: the result in page-locked host memory."""
    have = t.shape[dim]
    if have == rows:
        return t
    if have == 0 or have > rows:
        raise ValueError(f"cannot pad {have} rows to {rows}")
    last = t.narrow(dim, have - 1, 1)
    shape = list(t.shape)
    shape[dim] = rows - have
    parts = [t, last.expand(shape)]
    if not pinned:
        return torch.cat(parts, dim)
    shape[dim] = rows
    out = torch.empty(shape, dtype=t.dtype, pin_memory=True)
    return torch.cat(parts, dim, out=out)


def _rows(part: Any, start: int, stop: int) -> Any:
    return part[start:stop] if isinstance(part, torch.Tensor) else part.rows(start, stop)


def _padded(part: Any, rows: int) -> Any:
    return pad_rows(part, rows) if isinstance(part, torch.Tensor) else part.padded(rows)


def _cut(out: Any, rows: int) -> Any:
    return out[:rows] if isinstance(out, torch.Tensor) else tuple(o[:rows] for o in out)


def _joined(outs: list[Any]) -> Any:
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return tuple(torch.cat(column) for column in zip(*outs, strict=True))


def in_fixed_batches(run: Callable[..., Any], batch: int, size: int | None, *parts: Any) -> Any:
    """`run(*parts)` for `batch` rows, each call on exactly `size` rows (the last chunk padded;
    None: one call on the rows as they are). A part is a tensor (rows on dim 0), an object with
    `rows(start, stop)` and `padded(rows)` (the loops' inputs), or None (passed as it is); `run`
    returns a tensor or a tuple of tensors, rows on dim 0, which come back cut to `batch` rows."""
    if size is None:
        return run(*parts)
    outs = []
    for start in range(0, batch, size):
        stop = min(batch, start + size)
        chunk = [None if p is None else _padded(_rows(p, start, stop), size) for p in parts]
        outs.append(_cut(run(*chunk), stop - start))
    return _joined(outs)
