"""One call at a time per `UnCLIP` instance.

An instance owns engines with state between calls (ONNX Runtime I/O bindings, TensorRT execution
contexts, and with CUDA graphs their static buffers), so concurrent calls from several threads
are serialised by a re-entrant lock: each returns exactly what it would have returned alone, and
none sees another's tensors. For parallel throughput, create one instance per thread (or batch
the prompts into one call, which is faster on a GPU anyway).
"""

from __future__ import annotations

import functools
import threading


def serialised(method):
    """Run `method` holding the instance's lock (created on first use)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with lock_of(self):
            return method(self, *args, **kwargs)

    return wrapper


_CREATE = threading.Lock()


def lock_of(obj) -> threading.RLock:
    lock = obj.__dict__.get("_call_lock")
    if lock is None:
        with _CREATE:
            lock = obj.__dict__.setdefault("_call_lock", threading.RLock())
    return lock
