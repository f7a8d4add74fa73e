"""The GroupNorm ops of ONNX Runtime's fused UNet graphs (`ort_cuda.UNET_FUSIONS`): the two things
to settle before a CUDA session can run them.

- The optimizer declares each fused norm's scale and shift float32 (what the op takes) but
  stores the graph's own affine weights as they are; where those are fp16 it hands fp16 bytes to
  a float32 tensor, which `onnx.helper.make_tensor` refuses ("Raw data size does not match"),
  failing the whole optimisation. `float32_initializers` runs the optimizer with the values
  converted to the declared float32 first, the tensors it meant to make.
- The op's CUDA kernel takes only an even number of channels per group, at most 512 (two
  channels per thread, one group within a block of at most 512 channels); other norms fail when
  the session first runs. `refused_norms` names those of a graph, so that a model whose norms
  the kernel cannot take runs its unfused graph instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import numpy as np

from runtime.backends.ort_norm_dtype import FLOAT, int_attribute

NORM_OPS = ("GroupNorm", "SkipGroupNorm")
MAX_CHANNELS_PER_GROUP = 512


def _fusion_base_classes() -> list[type]:
    """Every loaded copy of the optimizer's `Fusion` base class. Its package puts its own folder
    on `sys.path` and its fusions import `fusion_base` by that bare name, so the class they derive
    from is not `onnxruntime.transformers.fusion_base.Fusion` but a second module's copy."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (loads the fusions, and with them their `fusion_base`)

    modules = (sys.modules.get(name) for name in ("fusion_base", "onnxruntime.transformers.fusion_base"))
    return list(dict.fromkeys(m.Fusion for m in modules if m is not None))


@contextlib.contextmanager
def float32_initializers() -> Iterator[None]:
    """Within the block, the optimizer's fusions convert an array they add as a float32
    initializer to float32 (`Fusion.add_initializer`, in every loaded copy of the class; not this
    process's other users of the optimizer: it is meant for one optimisation at a time, which is how
    `ort_cuda` calls it)."""
    patched = []
    for cls in _fusion_base_classes():
        original = cls.__dict__["add_initializer"]

        def add_initializer(self, name, data_type, dims, vals, raw=True, _original=original):
            if data_type == FLOAT and isinstance(vals, np.ndarray) and vals.dtype != np.float32:
                vals = vals.astype(np.float32)
            return _original(self, name, data_type, dims, vals, raw)

        cls.add_initializer = add_initializer
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.add_initializer = original


def refused_norms(graph) -> list[str]:
    """The norms of `graph` that ONNX Runtime's CUDA GroupNorm kernel refuses, as
    "name: C channels in G groups" (empty: it takes every one)."""
    tensors = {t.name: t for t in graph.initializer}
    refused = []
    for node in graph.node:
        if node.op_type not in NORM_OPS:
            continue
        groups = int_attribute(node, "groups") or 0
        gamma = tensors.get(node.input[1])
        channels = int(np.prod(gamma.dims)) if gamma is not None else 0
        per_group = channels // groups if groups and channels % groups == 0 else 0
        if per_group == 0 or per_group % 2 or per_group > MAX_CHANNELS_PER_GROUP:
            refused.append(f"{node.name}: {channels} channels in {groups} groups")
    return refused
