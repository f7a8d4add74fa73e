"""export/: stage signatures, ONNX export of every stage, the ONNX Runtime check against torch,
external data, the manifest and rebuild rules, and the build command's errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export import onnx_export
from export.build_engines import TOLERANCE, BuildError, build, main
from export.check import check_graph
from export.manifest import weights_sha256
from runtime.backends.signatures import BATCH, available_stages, signatures, stage_module


@pytest.fixture(scope="module")
def random_model(ours):
    """The tiny converted model with its zero-initialised layers made non-zero (so every output
    depends on every weight and relative errors are meaningful)."""
    model = copy.deepcopy(ours)  # not from_state: that assigns, and would share tensors with `ours`
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def test_every_stage_module_matches_its_declared_signature(random_model):
    for name in available_stages(random_model):
        sig = signatures(random_model.cfg)[name]
        for batch in (1, 3):
            inputs = sig.sample_inputs(batch, generator=torch.Generator().manual_seed(batch))
            assert list(inputs) == sig.input_names
            with torch.no_grad():
                outputs = stage_module(random_model, name)(*inputs.values())
            assert [tuple(o.shape) for o in outputs] == [s.concrete(batch) for s in sig.outputs], name
    # the batch axis is the only dynamic one, and CFG-doubled stages say so
    sigs = signatures(random_model.cfg)
    assert all(d == BATCH or isinstance(d, int) for s in sigs.values() for t in s.inputs for d in t.shape)
    assert sigs["decoder"].max_batch(4) == 8 and sigs["super_res_first"].max_batch(4) == 4


def test_the_unet_and_prior_step_stages_hand_their_fused_options_on(random_model, monkeypatch):
    """`stage_module(..., options)` passes the fused path's switches to the forward of every stage
    that runs it (the decoder step, each super-res UNet, the prior step): a switch such as
    `cutlass_convs` given to `UnCLIP(fused=...)` reaches the UNets it is for."""
    from models import fused
    from models.fused import FusedOptions

    options = FusedOptions(cutlass_convs=True, defer_bias=False)
    seen = {}
    unet_forward, prior_step = fused.unet_forward, fused.prior_step

    def spy(real, key):
        def call(*args, **kwargs):
            seen[key] = kwargs.get("options", args[-1] if key == "prior" else None)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(fused, "unet_forward", spy(unet_forward, "unet"))
    monkeypatch.setattr(fused, "prior_step", spy(prior_step, "prior"))
    for name in ("decoder_step", "super_res_first", "super_res_last", "prior_step"):
        seen.clear()
        inputs = signatures(random_model.cfg)[name].sample_inputs(1, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            stage_module(random_model, name, options)(*inputs.values())
        assert seen == {"prior" if name == "prior_step" else "unet": options}, name


def test_build_exports_and_checks_every_stage_then_skips_an_unchanged_model(random_model, tmp_path, caplog):
    out = tmp_path / "engines"
    manifest = build(random_model, out, ["onnxruntime"])
    assert set(manifest["stages"]) == set(available_stages(random_model)) >= {
        "clip_text", "prior_context", "prior_step", "decoder_context", "decoder_step", "super_res_first",
        "super_res_last"}
    for name, entry in manifest["stages"].items():
        assert entry["max_relative_error"] <= TOLERANCE["fp32"], name
        assert all((out / f).is_file() for f in entry["files"])
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["weights_sha256"] == weights_sha256(random_model) and on_disk["opset"] == 17
    assert on_disk["signatures"]["decoder_step"]["inputs"][0]["name"] == "x_t"
    assert "onnxruntime" in on_disk["versions"] and on_disk["compute_capability"] is None

    stamp = (out / "decoder_step.onnx").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="export"):
        build(random_model, out, ["onnxruntime"])
    assert "up to date" in caplog.text and (out / "decoder_step.onnx").stat().st_mtime_ns == stamp
    build(random_model, out, ["onnxruntime"], force=True, stages=["decoder_step"])
    assert (out / "decoder_step.onnx").stat().st_mtime_ns != stamp

    changed = copy.deepcopy(random_model)
    with torch.no_grad():
        changed.prior.clip_std.mul_(1.01)
    assert weights_sha256(changed) != weights_sha256(random_model)
    caplog.clear()
    with caplog.at_level("INFO", logger="export"):
        build(changed, out, ["onnxruntime"], stages=["prior"])
    assert "up to date" not in caplog.text


def test_large_graphs_keep_weights_in_external_data(random_model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    sig = signatures(random_model.cfg)["prior"]
    path = onnx_export.export_stage(random_model, sig, tmp_path)
    assert (tmp_path / "prior.onnx.data").stat().st_size > path.stat().st_size
    assert check_graph(random_model, sig, path) <= TOLERANCE["fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.onnx", "prior.onnx.data"]  # no temporaries left


def test_fp16_graphs_stay_within_the_stated_tolerance(random_model, tmp_path):
    manifest = build(random_model, tmp_path, ["onnxruntime"], fp16=True, stages=["prior", "decoder", "clip_text"])
    assert manifest["precision"] == "fp16"
    for entry in manifest["stages"].values():
        assert 0 < entry["max_relative_error"] <= TOLERANCE["fp16"]


def test_a_model_held_in_fp16_exports_and_checks_against_itself(random_model, tmp_path):
    """A model whose weights are fp16 already (as a benchmark's model shared with an fp16 peer
    is) exports fp16 graphs, each checked against the module in fp16: the check feeds the module
    inputs in the dtype it is held in."""
    held = copy.deepcopy(random_model).half()
    manifest = build(held, tmp_path, ["onnxruntime"], fp16=True, stages=["prior", "clip_text"])
    for entry in manifest["stages"].values():
        assert 0 < entry["max_relative_error"] <= TOLERANCE["fp16"]


def test_every_argmax_in_the_graphs_takes_floats(random_model, tmp_path):
    """ONNX Runtime's CUDA provider has ArgMax for floating-point inputs only; an ArgMax over the
    token ids (CLIP's EOT pooling) would run on the CPU between two copies. Every ArgMax of
    every graph reads a float tensor (the ids cast to float32: exact below 2^24)."""
    import onnx

    build(random_model, tmp_path, ["onnxruntime"], stages=["clip_text"])
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "clip_text.onnx"))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    argmax = [n for n in graph.node if n.op_type == "ArgMax"]
    assert argmax and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in argmax)


def test_build_command_errors_are_clear(tmp_path, capsys):
    assert main(["--model", "random:tiny", "--out", str(tmp_path), "--backends", "tensorrt"]) == 2 or \
        __import__("export.tensorrt_build").tensorrt_build.available()
    assert "TensorRT" in capsys.readouterr().err
    assert main(["--model", "nonsense:", "--out", str(tmp_path)]) == 2
    assert main(["--model", "random:tiny", "--out", str(tmp_path), "--stages", "nope"]) == 2
    with pytest.raises(BuildError, match="unknown backend"):
        build(None, tmp_path, ["openvino"])


def test_the_shipped_default_model_exports_and_every_graph_checks(default_engine_dir):
    folder, table = default_engine_dir
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"clip_text", "clip_image", "prior_context", "prior_step", "decoder_context",
                                       "decoder_step", "super_res_first", "super_res_last", "super_res_2_first",
                                       "ar_prior_context", "ar_prior_step"}
    assert all(e["max_relative_error"] <= 1e-4 for e in manifest["stages"].values())
    assert all(name in table for name in manifest["stages"]) and "tolerance 1e-04" in table
    assert manifest["source"] == "default" and (folder / "constants.safetensors").is_file()


def test_onnxruntime_engines_match_torch_engines_and_refuse_other_weights(random_model, tmp_path):
    from runtime.backends.engines import EngineError, TorchEngine, load_onnxruntime_engines

    stages = ["prior", "decoder", "super_res_last"]
    build(random_model, tmp_path, ["onnxruntime"], stages=stages)
    engines = load_onnxruntime_engines(tmp_path, random_model)
    assert sorted(engines) == sorted(stages)
    for name in stages:
        sig = signatures(random_model.cfg)[name]
        inputs = sig.sample_inputs(2, generator=torch.Generator().manual_seed(7))
        got, ref = engines[name](*inputs.values()), TorchEngine(random_model, name)(*inputs.values())
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape and (g - r).abs().max() <= 1e-4 * r.abs().max()
    other = copy.deepcopy(random_model)
    with torch.no_grad():
        other.decoder.text_proj.cf_param.add_(1.0)
    with pytest.raises(EngineError, match="other weights.*build_engines"):
        load_onnxruntime_engines(tmp_path, other)
    (tmp_path / "decoder.onnx").write_bytes(b"truncated")
    with pytest.raises(EngineError, match="decoder.onnx"):
        load_onnxruntime_engines(tmp_path, random_model)
    with pytest.raises(EngineError, match="no manifest"):
        load_onnxruntime_engines(tmp_path / "absent", random_model)


SHAPE_ARITHMETIC = {"Shape", "ConstantOfShape", "Expand", "Range", "NonZero", "Size"}


def test_a_fixed_batch_session_folds_every_shape_computation_and_gives_the_dynamic_graphs_outputs(
        default_engine_dir, tmp_path):
    """`runtime.backends.ort_cuda.fixed_batch_options`: with the batch fixed, ONNX Runtime's
    optimised graph of every stage holds none of the shape arithmetic the exported graph has
    (what its CUDA provider would leave on the CPU behind Memcpy nodes), and runs to the outputs
    of the batch-dynamic session."""
    import onnx
    import onnxruntime as ort

    from runtime.backends.engines import EngineFolder
    from runtime.backends.ort_cuda import fixed_batch_options

    folder, _ = default_engine_dir
    sigs = signatures(EngineFolder.open(folder).cfg)
    for name, sig in sigs.items():
        graph = folder / f"{name}.onnx"
        if not graph.is_file():
            continue
        exported = {n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node}
        options = fixed_batch_options(3)
        options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        fixed = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        folded = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
        assert "Shape" in exported and not folded & SHAPE_ARITHMETIC, (name, folded & SHAPE_ARITHMETIC)
        feed = {k: v.numpy() for k, v in sig.sample_inputs(3, generator=torch.Generator().manual_seed(1)).items()}
        dynamic = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        for a, b in zip(fixed.run(None, feed), dynamic.run(None, feed), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)  # fused ops round apart


def test_a_cuda_device_with_the_cuda_provider_gets_fixed_batch_engines_in_the_asked_replay_mode(
        default_engine_dir, monkeypatch):
    """`EngineFolder.onnxruntime_engines` hands each stage's graph, the folder's precision and the
    replay mode to `OrtCudaEngine` on a CUDA device with the CUDA provider (stood in for here:
    it needs a GPU), and CPU-provider sessions otherwise."""
    from runtime.backends import engines as engines_module
    from runtime.backends.engines import EngineFolder, OnnxRuntimeEngine

    made = []
    monkeypatch.setattr(engines_module, "OrtCudaEngine", lambda *args: made.append(args) or args)
    folder = EngineFolder.open(default_engine_dir[0])
    cuda = folder.onnxruntime_engines(["CUDAExecutionProvider", "CPUExecutionProvider"], torch.device("cuda"),
                                      graphs="torch")
    assert set(cuda) == set(folder.stages) and len(made) == len(folder.stages)
    for path, sig, device, dtype, _, graphs in made:
        assert path.name == f"{sig.name}.onnx" and device == torch.device("cuda")
        assert (dtype, graphs) == (torch.float32, "torch")
    cpu = folder.onnxruntime_engines(["CPUExecutionProvider"], torch.device("cpu"))
    assert all(isinstance(e, OnnxRuntimeEngine) for e in cpu.values()) and len(made) == len(folder.stages)


def test_the_cuda_provider_options_follow_the_asked_convolution_layout(monkeypatch):
    """`ort_cuda.CONV_LAYOUT` reaches the CUDA provider as its `prefer_nhwc` option (NCHW by
    default), with the caller's stream and the replay mode; an unknown layout is refused."""
    from types import SimpleNamespace

    from runtime.backends import ort_cuda

    stream = SimpleNamespace(cuda_stream=1234)
    name, options = ort_cuda.cuda_provider(torch.device("cuda", 1), cuda_graph=True, stream=stream)
    assert name == "CUDAExecutionProvider" and options["prefer_nhwc"] == "0"
    assert options["user_compute_stream"] == "1234" and options["enable_cuda_graph"] == "1"
    assert options["device_id"] == "1"
    monkeypatch.setattr(ort_cuda, "CONV_LAYOUT", "nhwc")
    assert ort_cuda.cuda_provider(torch.device("cuda"), cuda_graph=False, stream=stream)[1]["prefer_nhwc"] == "1"
    monkeypatch.setattr(ort_cuda, "CONV_LAYOUT", "chwn")
    with pytest.raises(ValueError, match="CONV_LAYOUT must be 'nchw' or 'nhwc', got 'chwn'"):
        ort_cuda.cuda_provider(torch.device("cuda"), cuda_graph=False, stream=stream)


def test_onnx_runtimes_unet_fusions_turn_the_unet_steps_norms_and_convolutions_into_its_cuda_ops(tmp_path,
                                                                                                monkeypatch):
    """`ort_cuda.unet_fused_graph` (the option `UNET_FUSIONS`): ONNX Runtime's UNet optimizer on the
    fp16 decoder step and super-res step of a model whose norms its CUDA GroupNorm takes gives a
    graph with the same inputs and outputs whose group norms and convolutions are its CUDA ops —
    serialised, or past protobuf's limit a copy with external weights; the stages it applies to are
    the UNets' steps. The shipped default model's norms (one channel per group) it refuses, saying why."""
    import onnx

    from export.build_engines import random_model
    from runtime.backends import ort_cuda
    from runtime.backends.ort_fused_norms import refused_norms
    from runtime.backends.signatures import is_unet_stage
    from tests.model_configs import wide_default_config

    def load(graph):
        return onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(graph)

    stages = ["decoder_step", "super_res_first"]
    build(random_model(wide_default_config()), tmp_path, ["onnxruntime"], fp16=True, stages=stages)
    for name in stages:
        original = onnx.load(str(tmp_path / f"{name}.onnx"))
        made = ort_cuda.unet_fused_graph(tmp_path / f"{name}.onnx")
        assert isinstance(made, bytes)
        if name == "decoder_step":
            made_decoder = made
        fused = load(made)
        ops = {n.op_type for n in fused.graph.node}
        assert {"GroupNorm", "NhwcConv"} <= ops, (name, sorted(ops))
        assert not refused_norms(fused.graph)
        assert len(fused.graph.node) < len(original.graph.node), name
        assert [i.name for i in fused.graph.input] == [i.name for i in original.graph.input]
        assert [o.name for o in fused.graph.output] == [o.name for o in original.graph.output]
    ort_cuda.unet_fused_graph.cache_clear()
    limit = ort_cuda.PROTOBUF_BYTES
    monkeypatch.setattr(ort_cuda, "PROTOBUF_BYTES", 1000)  # as if the graph were past protobuf's limit
    big = ort_cuda.unet_fused_graph(tmp_path / "super_res_first.onnx")
    ort_cuda.unet_fused_graph.cache_clear()
    monkeypatch.setattr(ort_cuda, "PROTOBUF_BYTES", limit)
    assert isinstance(big, str) and (Path(big).parent / "super_res_first.onnx.data").stat().st_size > 1_000_000
    assert [n.op_type for n in load(big).graph.node] == [n.op_type for n in fused.graph.node]
    assert [s for s in ("decoder_step", "super_res_first", "super_res_last", "prior_step", "clip_text")
            if is_unet_stage(s)] == ["decoder_step", "super_res_first", "super_res_last"]

    shipped = tmp_path / "shipped"
    assert main(["--out", str(shipped), "--fp16", "--stages", "decoder_step"]) == 0
    with pytest.raises(ort_cuda.FusionsRefused, match=r"even number of channels per group.*32 channels in 32 groups"):
        ort_cuda.unet_fused_graph(shipped / "decoder_step.onnx")
    # what a session opens: the fused graph, the plain one where the norms are refused, the plain one
    # for a stage the fusions are not for or with the option off
    monkeypatch.setattr(ort_cuda, "UNET_FUSIONS", True)
    assert ort_cuda.session_graph(tmp_path / "decoder_step.onnx", "decoder_step") == (made_decoder, "on")
    graph, fusions = ort_cuda.session_graph(shipped / "decoder_step.onnx", "decoder_step")
    assert graph == str(shipped / "decoder_step.onnx") and fusions.startswith("refused: ")
    assert "32 channels in 32 groups" in fusions
    assert ort_cuda.session_graph(tmp_path / "x.onnx", "prior_step") == (str(tmp_path / "x.onnx"), "off")
    monkeypatch.setattr(ort_cuda, "UNET_FUSIONS", False)
    assert ort_cuda.session_graph(tmp_path / "decoder_step.onnx", "decoder_step")[1] == "off"


def test_unet_fusions_without_onnx_runtimes_optimizer_say_what_is_missing(tmp_path, monkeypatch):
    """An onnxruntime install without its `transformers` package (a trimmed copy) cannot make the
    fused graphs: `UNET_FUSIONS` then fails with an EngineError naming the package and the way
    out, not as a graph the CUDA provider "cannot run whole"."""
    import sys

    from runtime.backends import ort_cuda
    from runtime.backends.engine import EngineError

    monkeypatch.setitem(sys.modules, "onnxruntime.transformers.optimizer", None)  # import raises ImportError
    ort_cuda.unet_fused_graph.cache_clear()
    with pytest.raises(EngineError, match=r"UNET_FUSIONS needs .*onnxruntime\.transformers.*leave UNET_FUSIONS off"):
        ort_cuda.unet_fused_graph(tmp_path / "decoder_step.onnx")
