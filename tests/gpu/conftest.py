"""Fixtures the GPU tests share: TF32 off on demand; the memory a test cached given back after
it; and one lock that keeps the Karlo- and paper-size tests from running at once when
pytest-xdist runs the suite in several processes (each such test holds tens of GiB, and several
at once overflow an 80 GB card)."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch
from filelock import FileLock  # a dependency of torch itself

_LARGE_LOCK = Path(tempfile.gettempdir()) / "unclip-rt-gpu-tests-large.lock"


@pytest.fixture
def no_tf32():
    """TF32 off for cuDNN and cuBLAS during the test (fp32 comparisons against the CPU), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def give_back_cached_memory():
    """After each test, what torch's caching allocator kept for it goes back to the card, so a
    worker process does not sit on memory the other workers' tests need."""
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture
def large_gpu_memory():
    """Held by a test that needs Karlo- or paper-size networks on the card: one such test at a
    time across all the worker processes of this machine."""
    with FileLock(str(_LARGE_LOCK)):
        yield
