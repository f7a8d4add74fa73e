"""Fused CUDA kernels of unclip-rt, compiled by `setup.py` when CUDA torch and nvcc are present
(`python setup.py build_ext --inplace`, or `pip install --no-build-isolation -e .`).

`kernels` is the compiled module, or None when it was not built (a CPU-only install, or no nvcc):
then `runtime.sampling.update` runs its torch reference instead, and `runtime.sampling.update.implementation()` says
which one runs. `cutlass_conv` is the CUTLASS Hopper convolution (`cpp_ext/cutlass/`,
`models.implicit_conv`), or None: it is built only on request (UNCLIP_RT_CUTLASS=1).
"""

from __future__ import annotations

import torch  # noqa: F401  (the extensions link to torch's libraries, which importing torch loads)

try:
    from cpp_ext import _C as kernels
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built here: the torch reference runs instead
    kernels = None
    IMPORT_ERROR = str(exc)

try:  # the CUTLASS Hopper convolution: built only with UNCLIP_RT_CUTLASS=1 (setup.py)
    from cpp_ext import _cutlass_conv as cutlass_conv
except ImportError:
    cutlass_conv = None
