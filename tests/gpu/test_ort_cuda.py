"""The exported graphs on ONNX Runtime's CUDA provider (`runtime.backends.ort_cuda`): the whole
graph on the GPU (no Memcpy node in any stage), the torch image on the default model, `auto`'s
per-stage choice by measurement, fp16 graphs at Karlo size against fp32 torch per stage, and ONNX
Runtime's CUDA-graph replay against an eager run. Skipped without a CUDA GPU or without onnxruntime-gpu.
Run this file serially (no `-n`): parallel workers each export the default model's graphs and open
ONNX Runtime sessions at once, which made it far slower (docs/results/gpu_suite_h100.txt, run 4)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.common import rel
from tests.metrics import psnr

pytestmark = pytest.mark.gpu
ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("onnxruntime without its CUDA provider (install onnxruntime-gpu)", allow_module_level=True)


@pytest.fixture(scope="module")
def default_engines(tmp_path_factory):
    """The shipped default model's graphs, fp32 and fp16."""
    from export.build_engines import build, load_model

    model = load_model("default")
    root = tmp_path_factory.mktemp("ort")
    build(model, root / "fp32", ["onnxruntime"], source="default")
    build(model, root / "fp16", ["onnxruntime"], fp16=True, source="default")
    return root


def memcpy_nodes(graph, batch: int, out) -> int:
    """Memcpy nodes in the graph ONNX Runtime runs at `batch` with its CUDA provider (CPU fallback allowed)."""
    import onnx

    from runtime.backends.ort_cuda import cuda_provider, fixed_batch_options

    options = fixed_batch_options(batch)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # ALL's layouts are not saved
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(graph), options, providers=[cuda_provider(torch.device("cuda"), False)])
    return sum(n.op_type.startswith("Memcpy") for n in onnx.load(str(out), load_external_data=False).graph.node)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_stage_runs_whole_on_the_gpu(default_engines, precision, tmp_path):
    counts = {g.stem: memcpy_nodes(g, 2, tmp_path / f"{g.stem}.opt.onnx")
              for g in sorted((default_engines / precision).glob("*.onnx"))}
    print(f"Memcpy nodes per stage ({precision}):", counts)
    assert counts and not any(counts.values()), counts


def test_the_cuda_provider_gives_the_torch_image_on_the_default_model(default_engines, no_tf32):
    from runtime import UnCLIP

    prompts = ["a red circle on a blue background", "a yellow star on a white background"]
    torch_images = UnCLIP(device="cuda", progress=False).generate(prompts, seed=3, output_type="pt").images
    pipe = UnCLIP(engine_dir=default_engines / "fp32", backend="onnxruntime", device="cuda", progress=False)
    assert all(type(e).__name__ == "OrtCudaEngine" for e in pipe.engines.values())
    images = pipe.generate(prompts, seed=3, output_type="pt").images
    values = [psnr(a, b) for a, b in zip(images, torch_images, strict=True)]
    print("ORT CUDA (fp32 graphs) against torch fp32, PSNR:", [round(v, 1) for v in values])
    assert min(values) >= 40


def test_auto_measures_each_stage_and_gives_the_torch_image(default_engines, no_tf32):
    """On a GPU with the CUDA provider, `auto` with an engine folder is `measured`: every stage is
    timed on both backends (every graph runs and is captured, so none is left out for failing),
    the engines are the ones it picked, and the loops, captured whole with whichever engines,
    give the torch image."""
    from runtime import UnCLIP

    prompts = ["a red circle on a blue background", "a yellow star on a white background"]
    torch_images = UnCLIP(device="cuda", progress=False).generate(prompts, seed=3, output_type="pt").images
    pipe = UnCLIP(engine_dir=default_engines / "fp32", device="cuda", progress=False)
    assert pipe.backend == "measured" and pipe.graphs is not None
    print("auto on this GPU (fp32 graphs):", *(c.describe() for c in pipe.backend_choice), sep="\n  ")
    for c in pipe.backend_choice:
        assert c.onnxruntime_ms is not None, c.note
        kind = "OrtCudaEngine" if c.backend == "onnxruntime" else "TorchEngine"
        assert type(pipe.engines[c.stage]).__name__ == kind
    values = [psnr(a, b) for a, b in zip(pipe.generate(prompts, seed=3, output_type="pt").images, torch_images,
                                         strict=True)]
    print("measured backend against torch fp32, PSNR:", [round(v, 1) for v in values])
    assert min(values) >= 40
    fp16 = UnCLIP(engine_dir=default_engines / "fp16", device="cuda", progress=False)
    print("auto on this GPU (fp16 graphs):", *(c.describe() for c in fp16.backend_choice), sep="\n  ")
    assert fp16.backend == "measured" and fp16.dtype == torch.float16
    assert all(c.onnxruntime_ms is not None for c in fp16.backend_choice), [c.note for c in fp16.backend_choice]


@pytest.mark.parametrize("graphs", ["onnxruntime", "torch"])
def test_a_cuda_graph_replay_equals_an_eager_run(default_engines, graphs):
    """ONNX Runtime's own graph ("onnxruntime": its first run captures, later runs replay) and a
    session captured inside a torch CUDA graph ("torch", as the runtime's loop graphs do) give
    the eager session's outputs on new inputs (to fp16 rounding: the two sessions time their
    own cuDNN algorithms), and a replay repeated on the same inputs gives the same bits."""
    from runtime.backends.engines import EngineFolder
    from runtime.backends.signatures import signatures
    from runtime.sampling.graphs import GraphCache

    folder = EngineFolder.open(default_engines / "fp16")
    device = torch.device("cuda")
    graphed = folder.onnxruntime_engines(["CUDAExecutionProvider"], device, graphs=graphs)
    eager = folder.onnxruntime_engines(["CUDAExecutionProvider"], device, graphs="none")
    cache = GraphCache(device) if graphs == "torch" else None

    def replay(name, inputs):
        return graphed[name](*inputs) if cache is None else cache.run((name,), graphed[name], inputs)

    for name in ("decoder_step", "prior_step", "super_res_first"):
        sig = signatures(folder.cfg)[name]
        for seed in (1, 2, 3):
            inputs = tuple(sig.sample_inputs(2, torch.float16, "cuda", torch.Generator().manual_seed(seed)).values())
            want, got, again = eager[name](*inputs), replay(name, inputs), replay(name, inputs)
            for a, b, c in zip(got, want, again, strict=True):
                assert rel(a.float(), b.float()) <= 2e-3, (name, seed)
                assert torch.equal(a, c), (name, seed)


def test_onnx_runtimes_unet_fusions_give_the_unfused_graphs_outputs(default_engines, tmp_path, monkeypatch):
    """With `ort_cuda.UNET_FUSIONS` the UNet steps of a model whose norms ONNX Runtime's CUDA
    GroupNorm takes (64-channel UNets) open from its fused graphs (its GroupNorm and NhwcConv ops,
    the whole graph on the GPU) and give the plain graphs' outputs to fp16 rounding; the shipped
    default model's (one channel per group) fall back to their plain graphs, saying so. Skipped
    where the onnxruntime install lacks its optimizer package."""
    import onnx

    pytest.importorskip("onnxruntime.transformers.optimizer")
    from export.build_engines import build, random_model
    from runtime.backends import ort_cuda
    from runtime.backends.engines import EngineFolder
    from runtime.backends.signatures import signatures
    from tests.model_configs import wide_default_config

    stages = ["decoder_step", "super_res_first"]
    build(random_model(wide_default_config()), tmp_path, ["onnxruntime"], fp16=True, stages=stages)
    device = torch.device("cuda")
    for root, fuses in ((tmp_path, True), (default_engines / "fp16", False)):
        folder = EngineFolder.open(root)
        monkeypatch.setattr(ort_cuda, "UNET_FUSIONS", False)
        plain = folder.onnxruntime_engines(["CUDAExecutionProvider"], device, graphs="none")
        monkeypatch.setattr(ort_cuda, "UNET_FUSIONS", True)
        fused = folder.onnxruntime_engines(["CUDAExecutionProvider"], device, graphs="none")
        for name in stages:
            sig = signatures(folder.cfg)[name]
            inputs = tuple(sig.sample_inputs(2, torch.float16, "cuda", torch.Generator().manual_seed(4)).values())
            want, got = plain[name](*inputs), fused[name](*inputs)
            if not fuses:
                assert fused[name].fusions.startswith("refused: ") and "channels per group" in fused[name].fusions
                assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
                continue
            assert fused[name].fusions == "on", name
            graph = ort_cuda.unet_fused_graph(fused[name].path)
            graph = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(graph)
            assert {"GroupNorm", "NhwcConv"} <= {n.op_type for n in graph.graph.node}
            for a, b in zip(got, want, strict=True):
                assert rel(a.float(), b.float()) <= 5e-3, name


@pytest.mark.usefixtures("large_gpu_memory")
def test_fp16_graphs_at_karlo_size_stay_within_2e2_of_fp32_torch(tmp_path, no_tf32):
    from export.build_engines import build, random_model
    from runtime.backends.engines import EngineFolder, TorchEngine
    from runtime.backends.signatures import signatures

    model = random_model("karlo", device="cuda")
    stages = ["prior_step", "decoder_step", "super_res_first"]
    build(model, tmp_path, ["onnxruntime"], fp16=True, stages=stages, source="random:karlo")
    folder = EngineFolder.open(tmp_path)
    engines = folder.onnxruntime_engines(["CUDAExecutionProvider"], torch.device("cuda"))
    errors = {}
    for name in stages:
        sig = signatures(model.cfg)[name]
        inputs = sig.sample_inputs(2, torch.float32, "cuda", torch.Generator().manual_seed(0))
        ref = TorchEngine(model, name)(*inputs.values())
        got = engines[name](*inputs.values())
        errors[name] = max(rel(a.float(), b) for a, b in zip(got, ref, strict=True))
    print("fp16 ORT CUDA against fp32 torch at Karlo size:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= 2e-2 for e in errors.values()), errors


def test_the_tensorrt_provider_matches_the_cuda_provider_where_it_runs(default_engines):
    """The wheel lists TensorrtExecutionProvider, which needs TensorRT's own libraries at run time:
    where it keeps the session, its decoder step equals the CUDA provider's within fp16
    tolerance; where it does not, the test is skipped with what happened (docs/engines.md)."""
    from runtime.backends.ort_cuda import cuda_provider, fixed_batch_options, tensorrt_provider_status
    from runtime.backends.signatures import signatures

    graph = default_engines / "fp16" / "decoder_step.onnx"
    status = tensorrt_provider_status(graph, torch.device("cuda"))
    print("ONNX Runtime's TensorRT provider:", status)
    if status != "runs":
        pytest.skip(f"ONNX Runtime's TensorRT provider: {status}")
    from runtime.backends.engines import EngineFolder

    sig = signatures(EngineFolder.open(default_engines / "fp16").cfg)["decoder_step"]
    feed = {k: (v.half() if v.is_floating_point() else v).numpy()
            for k, v in sig.sample_inputs(1, generator=torch.Generator().manual_seed(0)).items()}
    outs = []
    tensorrt = ("TensorrtExecutionProvider", {"trt_fp16_enable": "1"})
    for provider in (tensorrt, cuda_provider(torch.device("cuda"), False)):
        session = ort.InferenceSession(str(graph), fixed_batch_options(1), providers=[provider])
        outs.append(torch.from_numpy(session.run(None, feed)[0]).float())
    assert rel(outs[0], outs[1]) <= 2e-2
