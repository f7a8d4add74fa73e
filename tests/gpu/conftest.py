"""Fixtures the GPU tests share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def no_tf32():
    """TF32 off for cuDNN and cuBLAS during the test (fp32 comparisons against the CPU), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
