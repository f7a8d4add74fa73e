"""The `measured` backend (`runtime.backends.measured`): each stage on whichever of torch and ONNX
Runtime is faster on this machine. The rule, the mixing with a controlled timer, and the real
thing on the CPU through `UnCLIP`: every stage timed on both, the engines it picked, and the
torch image for the same seed. On a GPU `auto` resolves to it (tests/gpu/test_ort_cuda.py runs it
there)."""

from __future__ import annotations

import copy

import pytest
import torch

from runtime import UnCLIP
from runtime.backends import choose
from runtime.backends.engines import TorchEngine
from runtime.backends.measured import MARGIN, choose_stages, pick
from runtime.pipeline import DEFAULT_MODEL, load_folder
from tests.metrics import psnr

PROMPTS = ["a red circle on a blue background", "a small green square"]


@pytest.fixture(scope="module")
def default_model():
    return load_folder(DEFAULT_MODEL)


def test_onnxruntime_takes_a_stage_only_when_faster_by_more_than_the_margin():
    assert pick(10.0, 10.0 * (1 - MARGIN) - 1e-6) == "onnxruntime"
    assert pick(10.0, 10.0 * (1 - MARGIN) + 1e-6) == "torch"
    assert pick(10.0, 12.0) == "torch"
    assert pick(10.0, None) == "torch"  # the graph could not run


class _Stub:
    """An engine that only stands for itself (signature borrowed from a real one)."""

    def __init__(self, signature, label: str, fail: bool = False) -> None:
        self.signature, self.float_dtype, self.label, self.fail = signature, torch.float32, label, fail

    def __call__(self, *inputs):
        if self.fail:
            raise RuntimeError("CUDA provider cannot run node X\nmore detail")
        return ()


def test_each_stage_gets_the_faster_engine_and_a_failing_graph_leaves_torch(default_model):
    names = ["clip_text", "prior_step", "decoder_step", "super_res_first"]
    sigs = {n: TorchEngine(default_model, n).signature for n in names}
    torch_side = {n: _Stub(sigs[n], f"torch:{n}") for n in names}
    ort_side = {"clip_text": _Stub(sigs["clip_text"], "ort:clip_text"),
                "prior_step": _Stub(sigs["prior_step"], "ort:prior_step"),
                "decoder_step": _Stub(sigs["decoder_step"], "ort:decoder_step", fail=True)}
    ms = {"torch:clip_text": 2.0, "ort:clip_text": 1.0, "torch:prior_step": 1.0, "ort:prior_step": 1.5,
          "torch:decoder_step": 3.0, "torch:super_res_first": 9.0}
    seen_batches = {}

    def timer(engine, inputs):
        engine(*inputs)
        seen_batches[engine.label] = inputs[0].shape[0]
        return ms[engine.label]

    chosen, choices = choose_stages(torch_side, ort_side, torch.device("cpu"), timer)
    assert {n: chosen[n].label for n in names} == {
        "clip_text": "ort:clip_text", "prior_step": "torch:prior_step",
        "decoder_step": "torch:decoder_step", "super_res_first": "torch:super_res_first"}
    by = {c.stage: c for c in choices}
    assert by["decoder_step"].onnxruntime_ms is None and "CUDA provider cannot run node X" in by["decoder_step"].note
    assert "\n" not in by["decoder_step"].note
    assert by["super_res_first"].note == "no graph in the folder"
    # timed at the rows one image makes: the guided stages run two, the unguided super-res one
    assert (by["prior_step"].batch, by["decoder_step"].batch, by["super_res_first"].batch) == (2, 2, 1)
    assert seen_batches["ort:prior_step"] == 2
    assert "onnxruntime 1.000 ms" in by["clip_text"].describe()


def test_the_measured_backend_times_every_stage_and_gives_the_torch_image(default_engine_dir, default_model):
    folder, _ = default_engine_dir
    pipe = UnCLIP(copy.deepcopy(default_model), engine_dir=folder, backend="measured", device="cpu", progress=False)
    assert pipe.backend == "measured" and pipe.model is not None
    assert [c.stage for c in pipe.backend_choice] == list(pipe.engines)
    for c in pipe.backend_choice:
        assert c.torch_ms > 0 and c.onnxruntime_ms is not None and c.onnxruntime_ms > 0, c
        assert c.backend == pick(c.torch_ms, c.onnxruntime_ms)
        kind = "OnnxRuntimeEngine" if c.backend == "onnxruntime" else "TorchEngine"
        assert type(pipe.engines[c.stage]).__name__ == kind
    print("measured on this CPU:", *(c.describe() for c in pipe.backend_choice), sep="\n  ")
    on_torch = UnCLIP(copy.deepcopy(default_model), backend="torch", device="cpu", progress=False)
    kw = {"seed": 5, "decoder_steps": 6, "super_res_steps": 3, "output_type": "pt"}
    a, b = on_torch.generate(PROMPTS, **kw).images, pipe.generate(PROMPTS, **kw).images
    assert psnr(a, b) >= 40


def test_auto_resolves_to_measured_on_a_gpu_with_the_cuda_provider_in_the_folders_precision(
        default_engine_dir, monkeypatch):
    folder, _ = default_engine_dir  # fp32 graphs
    cuda = torch.device("cuda")
    monkeypatch.setattr(choose, "onnxruntime_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose.choose_backend("auto", folder, cuda) == "measured"
    assert choose.choose_backend("auto", folder, cuda, torch.float32) == "measured"
    assert choose.choose_backend("auto", folder, cuda, torch.float16) == "torch"  # the folder is fp32
    assert choose.choose_backend("auto", None, cuda) == "torch"
    monkeypatch.setattr(choose, "onnxruntime_providers", lambda: ["CPUExecutionProvider"])
    assert choose.choose_backend("auto", folder, cuda) == "torch"


def test_measured_arguments_are_checked(default_engine_dir, default_model):
    folder, _ = default_engine_dir
    with pytest.raises(ValueError, match="'measured' runs the engines of a folder"):
        UnCLIP(default_model, backend="measured", device="cpu")
    with pytest.raises(ValueError, match="prior_dtype is for the torch backend"):
        UnCLIP(default_model, engine_dir=folder, backend="measured", device="cpu", prior_dtype=torch.float32)
    with pytest.raises(ValueError, match="fp32 engines"):
        UnCLIP(default_model, engine_dir=folder, backend="measured", device="cpu", dtype=torch.float16)


def test_every_command_line_offers_the_api_backends():
    from runtime.cli.common import BACKEND_CHOICES
    from serve.options import BACKENDS

    assert set(BACKEND_CHOICES) == set(BACKENDS) == set(choose.CHOICES)
