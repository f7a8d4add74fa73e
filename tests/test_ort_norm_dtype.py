"""`runtime.backends.ort_norm_dtype`: ONNX Runtime's fused GroupNorm ops read the activations'
dtype instead of the export's float32 copy, only where every reader of the norm's output casts it
again; on hand-built graphs and on the shipped default model's fused UNet steps."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from runtime.backends.ort_norm_dtype import links, norms_in_activation_dtype  # noqa: E402


def _graph(extra_reader: bool):
    """x (fp16) → Cast float → Transpose → GroupNorm → Transpose → Cast fp16 → y, beside
    x → Cast float → GroupNorm → Mul (float32 arithmetic) → z; with `extra_reader` the first Cast's
    output is read by an Identity as well."""
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="up"),
        helper.make_node("Transpose", ["x32"], ["x32_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("GroupNorm", ["x32_nhwc", "gamma", "beta"], ["n_nhwc"], domain="com.microsoft",
                         groups=2, epsilon=1e-5, activation=1, name="norm"),
        helper.make_node("Transpose", ["n_nhwc"], ["n"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Cast", ["n"], ["y"], to=TensorProto.FLOAT16, name="down"),
        helper.make_node("Cast", ["x"], ["x32b"], to=TensorProto.FLOAT, name="up_b"),
        helper.make_node("GroupNorm", ["x32b", "gamma", "beta"], ["nb"], domain="com.microsoft",
                         groups=2, epsilon=1e-5, activation=0, name="norm_b"),
        helper.make_node("Mul", ["nb", "scale"], ["z"], name="scale_shift"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["x32"], ["w"], name="other"))
        outputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, None))
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [4], [1.0] * 4) for n in ("gamma", "beta")]
    inits.append(helper.make_tensor("scale", TensorProto.FLOAT, [1], [2.0]))
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, 2, 2])],
                             outputs, inits)


def test_a_norm_whose_output_is_cast_again_reads_the_fp16_input():
    graph = _graph(extra_reader=False)
    assert norms_in_activation_dtype(graph) == 1
    by_name = {n.name: n for n in graph.node}
    assert by_name["to_nhwc"].input[0] == "x"  # the Transpose into channels-last now moves fp16
    assert "up" not in by_name  # its Cast had no other reader: removed
    assert by_name["norm_b"].input[0] == "x32b" and "up_b" in by_name  # feeds float32 arithmetic: unchanged
    assert by_name["down"].input[0] == "n"


def test_a_cast_with_other_readers_stays_for_them():
    graph = _graph(extra_reader=True)
    assert norms_in_activation_dtype(graph) == 1
    by_name = {n.name: n for n in graph.node}
    assert by_name["to_nhwc"].input[0] == "x"
    assert by_name["up"].output[0] == "x32" and by_name["other"].input[0] == "x32"


def _reads_float32_copy(norm, producer: dict) -> bool:
    """Whether `norm` reads a Cast to float32 (directly or through a Transpose)."""
    feeder = producer.get(norm.input[0])
    if feeder is not None and feeder.op_type == "Transpose":
        feeder = producer.get(feeder.input[0])
    return feeder is not None and feeder.op_type == "Cast" and feeder.attribute[0].i == TensorProto.FLOAT


def _feeds_float32_arithmetic(norm, readers: dict) -> bool:
    """Whether a Mul reads `norm`'s output through the Transpose after it."""
    return any(r.op_type == "Mul" for t in readers[norm.output[0]] for r in readers[t.output[0]])


def test_the_default_models_fused_unet_steps_keep_float32_norms_only_before_float32_arithmetic(tmp_path):
    """In the default model's fp16 graphs after ONNX Runtime's UNet fusions: every super-res norm and
    every decoder norm not followed by the scale-and-shift (float32 `Mul`) reads fp16."""
    pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.optimizer import optimize_model

    from export.build_engines import main

    assert main(["--out", str(tmp_path), "--fp16", "--stages", "decoder_step,super_res_first"]) == 0
    for name in ("decoder_step", "super_res_first"):
        graph = optimize_model(str(tmp_path / f"{name}.onnx"), model_type="unet", opt_level=0, use_gpu=True).model.graph
        norms = [n for n in graph.node if n.op_type == "GroupNorm"]
        changed = norms_in_activation_dtype(graph)
        producer, readers = links(graph)
        kept = [n for n in norms if _reads_float32_copy(n, producer)]
        assert changed == len(norms) - len(kept) > 0, name
        assert all(_feeds_float32_arithmetic(n, readers) for n in kept), name
        if name == "super_res_first":
            assert not kept
