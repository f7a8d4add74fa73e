"""`runtime.backends.ort_fused_norms`: ONNX Runtime's optimizer making the fused norms' float32
scale and shift from fp16 values, and the norms its CUDA kernel refuses (an odd number of channels
per group, or more than 512), on hand-built graphs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from runtime.backends.ort_fused_norms import refused_norms  # noqa: E402


def _norm_graph(channels: int, groups: int):
    """x → GroupNorm(gamma, beta; `groups`) → y over `channels` channels."""
    gamma = numpy_helper.from_array(np.arange(channels, dtype=np.float32) + 0.5, "gamma")
    beta = numpy_helper.from_array(np.zeros(channels, np.float32), "beta")
    node = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], domain="com.microsoft", groups=groups,
                            epsilon=1e-5, activation=0, channels_last=1, name="norm")
    return helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, None)],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [gamma, beta])


def test_the_optimizers_float32_initializers_take_fp16_values_converted():
    """A fusion adding a float32 initializer from fp16 values (the fused norms' scale and shift
    where the graph's own are fp16): within `float32_initializers` the tensor holds those values
    as float32, and the optimizer's own method is back in place after."""
    pytest.importorskip("onnxruntime.transformers.fusion_base")
    from onnxruntime.transformers.fusion_base import Fusion

    from runtime.backends.ort_fused_norms import float32_initializers

    added = []
    fusion = SimpleNamespace(model=SimpleNamespace(add_initializer=lambda t, graph: added.append(t)),
                             this_graph_name=None)
    values = np.arange(320, dtype=np.float16) / 8
    original = Fusion.add_initializer
    with float32_initializers():
        Fusion.add_initializer(fusion, "gamma", TensorProto.FLOAT, [320], values)
        Fusion.add_initializer(fusion, "kept", TensorProto.FLOAT16, [320], values)  # declared fp16: as it is
    assert Fusion.add_initializer is original
    gamma, kept = (numpy_helper.to_array(t) for t in added)
    assert gamma.dtype == np.float32 and np.array_equal(gamma, values.astype(np.float32))
    assert kept.dtype == np.float16 and np.array_equal(kept, values)


@pytest.mark.parametrize(("channels", "groups", "refused"),
                         [(64, 32, False), (320, 32, False), (1024, 2, False), (32, 32, True), (96, 32, True),
                          (2048, 2, True), (30, 4, True)])
def test_the_norms_the_cuda_kernel_refuses_are_named(channels, groups, refused):
    names = refused_norms(_norm_graph(channels, groups))
    assert names == ([f"norm: {channels} channels in {groups} groups"] if refused else [])
