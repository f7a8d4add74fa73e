"""`runtime.backends.ort_fused_norms`: ONNX Runtime's optimizer making the fused norms' float32
scale and shift from fp16 values, and the norms its CUDA kernel refuses (an odd number of channels
per group, or more than 512), on hand-built graphs."""

from __future__ import annotations

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


def _fp16_norm_pattern(channels: int = 64, groups: int = 32):
    """The exporter's group norm in fp16, as the optimizer's GroupNorm fusion matches it:
    x → Reshape(0, groups, -1) → InstanceNormalization(ones, zeros) → Reshape(Shape(x)) → Mul(gamma)
    → Add(beta), gamma and beta fp16 initializers of shape (channels, 1, 1)."""
    rng = np.random.default_rng(0)
    gamma = (rng.standard_normal((channels, 1, 1)) + 1).astype(np.float16)
    beta = rng.standard_normal((channels, 1, 1)).astype(np.float16)
    inits = [numpy_helper.from_array(np.array([0, groups, -1], np.int64), "groups_shape"),
             numpy_helper.from_array(np.ones(groups, np.float16), "ones"),
             numpy_helper.from_array(np.zeros(groups, np.float16), "zeros"),
             numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]
    nodes = [helper.make_node("Reshape", ["x", "groups_shape"], ["grouped"]),
             helper.make_node("InstanceNormalization", ["grouped", "ones", "zeros"], ["normed"], epsilon=1e-5),
             helper.make_node("Shape", ["x"], ["x_shape"]),
             helper.make_node("Reshape", ["normed", "x_shape"], ["back"]),
             helper.make_node("Mul", ["back", "gamma"], ["scaled"]),
             helper.make_node("Add", ["scaled", "beta"], ["y"])]
    shape = [1, channels, 8, 8]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, gamma, beta


def test_the_optimizers_group_norm_fusion_takes_fp16_affines_within_float32_initializers(tmp_path):
    """ONNX Runtime's UNet optimizer on an fp16 group norm: it declares the fused norm's scale
    and shift float32 but hands over the fp16 values, which `onnx.helper.make_tensor` refuses
    ("Raw data size does not match"); within `float32_initializers` the fused GroupNorm holds the
    graph's values as float32, and the optimizer's own method is back in place after."""
    pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.optimizer import optimize_model

    from runtime.backends.ort_fused_norms import _fusion_base_classes, float32_initializers

    model, gamma, beta = _fp16_norm_pattern()
    path = tmp_path / "norm.onnx"
    onnx.save(model, str(path))
    originals = [cls.__dict__["add_initializer"] for cls in _fusion_base_classes()]
    with pytest.raises(ValueError, match="Raw data size does not match"):
        optimize_model(str(path), model_type="unet", opt_level=0, use_gpu=True)
    with float32_initializers():
        fused = optimize_model(str(path), model_type="unet", opt_level=0, use_gpu=True).model
    assert [cls.__dict__["add_initializer"] for cls in _fusion_base_classes()] == originals
    norms = [n for n in fused.graph.node if n.op_type == "GroupNorm"]
    assert len(norms) == 1 and not any(n.op_type == "InstanceNormalization" for n in fused.graph.node)
    tensors = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    scale, shift = tensors[norms[0].input[1]], tensors[norms[0].input[2]]
    assert scale.dtype == np.float32 and np.array_equal(scale, gamma.reshape(-1).astype(np.float32))
    assert shift.dtype == np.float32 and np.array_equal(shift, beta.reshape(-1).astype(np.float32))


@pytest.mark.parametrize(("channels", "groups", "refused"),
                         [(64, 32, False), (320, 32, False), (1024, 2, False), (32, 32, True), (96, 32, True),
                          (2048, 2, True), (30, 4, True)])
def test_the_norms_the_cuda_kernel_refuses_are_named(channels, groups, refused):
    names = refused_norms(_norm_graph(channels, groups))
    assert names == ([f"norm: {channels} channels in {groups} groups"] if refused else [])
