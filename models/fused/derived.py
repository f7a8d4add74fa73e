"""Tensors the fused path derives from a module's weights (a stacked, widened or tabulated copy),
kept beside the module while the weights stay as they are."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class DerivedTensors:
    """What is derived from some tensors, kept while they stay as they are: the same storage
    (`data_ptr`), no in-place write (`_version`) and the same `extra` key (dtypes, devices). `get`
    returns the kept value, or builds it anew — except during a CUDA graph capture (its kernels
    would not run then) or from inference tensors (they keep no version counter), where it
    returns None and the caller takes its plain path."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, tensors: Iterable[torch.Tensor], extra: tuple, build: Callable[[], Any]) -> Any:
        tensors = tuple(tensors)
        try:
            key = extra + tuple((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors: no version counter
            return None
        if self.key != key:
            if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
                return None
            with torch.no_grad():
                self.value = build()
            self.key = key
        return self.value


# Kept outside the modules, so that the reference modules hold only their parameters and a
# module's derived copies go when it does.
_KEPT: weakref.WeakKeyDictionary[nn.Module, dict[str, DerivedTensors]] = weakref.WeakKeyDictionary()


def derived(module: nn.Module, name: str) -> DerivedTensors:
    """The `DerivedTensors` called `name` kept for `module` (made on first use)."""
    kept = _KEPT.setdefault(module, {})
    if name not in kept:
        kept[name] = DerivedTensors()
    return kept[name]


_STRUCTURE: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def structural(module: nn.Module, name: str, make: Callable[[], Any]) -> Any:
    """What `make` finds in `module`'s structure (e.g. a list of its submodules), found once: the
    fused path reads it every forward and the structure does not change after construction."""
    kept = _STRUCTURE.setdefault(module, {})
    if name not in kept:
        kept[name] = make()
    return kept[name]
