"""FP8 (`models.fp8`, `UnCLIP(precision="fp8")`): the e4m3 format and its saturation, the FP8
layers against the product of their read-back operands, the conversion policy, the activation
scales file (calibrated once, refused when it is not for these weights or was changed), and the
pipeline end to end on the default model against fp32. The quality study is
`benchmarks/fp8_quality.py` (docs/fp8.md)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from export.build_engines import random_model
from models import fp8
from models.checkpoint import weights_sha256
from models.file_integrity import IntegrityError
from models.fp8.e4m3 import E4M3, E4M3_MAX, channel_scales, dequantize, quantize, tensor_scale
from models.fp8.layers import Fp8Conv, Fp8Linear
from models.fp8.scales import SCALES_FILE, load_scales, observe, save_scales
from runtime import UnCLIP
from runtime.pipeline import DEFAULT_MODEL, load_folder
from tests.metrics import psnr

PROMPTS = ["a red circle on a blue background", "a small green square on a yellow background"]


@pytest.fixture(scope="module")
def default_model():
    return load_folder(DEFAULT_MODEL)


def test_e4m3_round_trips_its_values_and_saturates_instead_of_overflowing():
    grid = torch.tensor([0.0, 1.0, -1.5, 0.875, 448.0, -448.0, 2.0**-9])  # e4m3 values
    assert torch.equal(quantize(grid, torch.tensor(1.0)).float(), grid)
    big = quantize(torch.tensor([1e4, -1e4, float("inf")]), torch.tensor(1.0))
    assert big.dtype == E4M3 and torch.equal(big.float(), torch.tensor([448.0, -448.0, 448.0]))
    w = torch.randn(6, 5, 3, 3)
    s = channel_scales(w)
    q = quantize(w, s.view(-1, 1, 1, 1))
    assert torch.equal(q.float().abs().flatten(1).amax(1), torch.full((6,), E4M3_MAX))  # each channel's max → 448
    back = dequantize(q, s.view(-1, 1, 1, 1), torch.float32)
    assert ((back - w).abs() <= w.abs() * 2**-4 + 1e-6 * s.view(-1, 1, 1, 1)).all()  # 3 mantissa bits: ≤ half an ulp
    x = torch.randn(4, 7) * 30
    assert tensor_scale(x) == x.abs().amax() / E4M3_MAX


def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's product from its read-back operands, in float64."""
    scale = layer.input_scale.double() if layer.calibrated else tensor_scale(x).double()
    xr = quantize(x, scale.float()).double() * scale
    view = (-1,) + (1,) * (layer.weight_q.dim() - 1)
    w = layer.weight_q.double() * layer.weight_scale.double().view(view)
    b = None if layer.bias is None else layer.bias.double()
    if isinstance(layer, Fp8Linear):
        return nn.functional.linear(xr, w, b)
    conv = nn.functional.conv2d if w.dim() == 4 else nn.functional.conv1d
    return conv(xr, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("features", [(64, 48), (20, 12)])  # a `_scaled_mm` shape, and one it does not take
def test_an_fp8_linear_is_the_product_of_its_e4m3_operands(features):
    torch.manual_seed(0)
    k, n = features
    dense = nn.Linear(k, n)
    layer = Fp8Linear.from_float(dense)
    x = torch.randn(3, 5, k)
    got = layer(x)
    assert got.shape == (3, 5, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    rel = ((got - dense(x)).norm() / dense(x).norm()).item()
    assert 1e-3 < rel < 0.1  # quantised (not the dense layer), and close to it
    layer.set_input_scale(float(x.abs().amax()) / E4M3_MAX / 4)  # a calibrated range four times too small
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(layer(x)).all()  # saturated, not overflowed


def test_fp8_convolutions_are_the_product_of_their_e4m3_operands_in_either_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    layer = Fp8Conv.from_float(conv)
    x = torch.randn(2, 16, 9, 9)
    torch.testing.assert_close(layer(x).double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    last = layer(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(last, layer(x), rtol=1e-5, atol=1e-5)
    pointwise = Fp8Conv.from_float(nn.Conv1d(32, 48, 1))
    t = torch.randn(2, 32, 10)
    torch.testing.assert_close(pointwise(t).double(), _reference(pointwise, t), rtol=1e-5, atol=1e-5)
    # the attention blocks' token-row form is the same map
    torch.testing.assert_close(pointwise.rows(t.transpose(1, 2)), pointwise(t).transpose(1, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        layer.rows(t)


@pytest.mark.parametrize(("kernel", "padding"), [(3, 1), (1, 0)])
def test_the_gemm_way_of_a_convolution_gives_the_read_back_way(kernel, padding):
    """The FP8 GEMM over gathered neighbourhoods (what CUDA runs) against the read-back
    convolution (the same quantised operands): fp32 rounding apart, in either input layout."""
    torch.manual_seed(0)
    layer = Fp8Conv.from_float(nn.Conv2d(32, 48, kernel, padding=padding))
    assert layer.gemm_shape()
    x = torch.randn(2, 32, 9, 7)
    want = layer(x, "readback")
    for inp in (x, x.to(memory_format=torch.channels_last)):
        got = layer(inp, "gemm")
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert layer(x).data_ptr() != got.data_ptr()  # "auto" on the CPU reads back
    torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    odd = Fp8Conv.from_float(nn.Conv2d(32, 48, 3, padding=1, stride=2))
    assert not odd.gemm_shape()
    with pytest.raises(ValueError, match="FP8 GEMM way takes"):
        odd(x, "gemm")


def test_without_a_row_wise_scaled_gemm_the_layers_read_their_operands_back(monkeypatch, caplog):
    from models.fp8 import layers

    torch.manual_seed(0)
    linear = Fp8Linear.from_float(nn.Linear(64, 48))
    conv = Fp8Conv.from_float(nn.Conv2d(32, 48, 3, padding=1))
    x, img = torch.randn(5, 64), torch.randn(2, 32, 6, 6)
    want_linear, want_conv = linear(x), conv(img, "readback")

    def missing(*args, **kwargs):
        raise RuntimeError("scaled_mm: row-wise scaling is not supported for this output type")

    monkeypatch.setattr(torch, "_scaled_mm", missing)
    monkeypatch.setattr(layers, "_SCALED_MM_WORKS", {})
    torch.testing.assert_close(linear(x), want_linear, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv(img, "gemm"), want_conv, rtol=0, atol=0)
    assert layers._SCALED_MM_WORKS == {("cpu", torch.float32): False}
    assert sum("unavailable" in r.message for r in caplog.records) == 1  # said once

    def no_gather(*args):
        raise AssertionError("gathered rows for a GEMM known to be absent")

    monkeypatch.setattr(layers, "_gathered_rows", no_gather)
    monkeypatch.setattr(layers, "CONV_PATH", "gemm")
    torch.testing.assert_close(conv(img), want_conv, rtol=0, atol=0)  # straight to the read-back way


def test_a_build_with_bfloat16_only_row_wise_results_still_runs_the_fp8_gemm(monkeypatch, caplog):
    """Some builds take row-wise scales only with a bfloat16 result: the GEMM still runs (its
    result cast), within bfloat16 rounding of the direct call."""
    from models.fp8 import layers

    torch.manual_seed(0)
    linear = Fp8Linear.from_float(nn.Linear(64, 48))
    x = torch.randn(5, 64)
    want = linear(x)
    real, calls = torch._scaled_mm, []

    def bf16_only(*args, out_dtype=None, **kwargs):
        calls.append(out_dtype)
        if out_dtype != torch.bfloat16:
            raise RuntimeError("Only bf16 high precision output types are supported for row-wise scaling.")
        return real(*args, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", bf16_only)
    monkeypatch.setattr(layers, "_SCALED_MM_WORKS", {})
    got = linear(x)
    assert got.dtype == torch.float32 and calls == [torch.float32, torch.bfloat16]
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    linear(x)
    assert calls[2:] == [torch.bfloat16]  # found once: later calls go straight to bfloat16
    assert layers._SCALED_MM_WORKS == {("cpu", torch.float32): "bfloat16"}
    assert sum("bfloat16 result only" in r.message for r in caplog.records) == 1


def test_a_calibrated_layer_makes_its_gemm_scales_once_and_remakes_them_for_a_new_scale(monkeypatch):
    """With a fixed input scale the GEMM's row scales are made once (no kernel per call in a
    graph); a new calibrated scale remakes them in place, and a measured scale is made per call."""
    torch.manual_seed(0)
    linear = Fp8Linear.from_float(nn.Linear(64, 48))
    x = torch.randn(5, 64)
    real, seen = torch._scaled_mm, []

    def recording(*args, scale_a=None, **kwargs):
        seen.append(scale_a)
        return real(*args, scale_a=scale_a, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    linear.set_input_scale(0.01)
    first, again = linear(x), linear(x)
    assert seen[0] is seen[1] and torch.equal(first, again)
    linear.set_input_scale(0.02)
    changed = linear(x)  # the same tensor, remade in place (a captured graph reads it by address)
    assert seen[2] is seen[1] and float(seen[2][0, 0]) == pytest.approx(0.02)
    fresh = Fp8Linear.from_float(nn.Linear(64, 48))
    fresh.load_state_dict(linear.state_dict())
    fresh.set_input_scale(0.02)
    torch.testing.assert_close(changed, fresh(x), rtol=0, atol=0)
    linear.set_input_scale(None)
    linear(x), linear(x)
    assert seen[3] is not seen[4]


def test_a_dtype_conversion_keeps_the_e4m3_weight_and_the_fp32_scales():
    layer = Fp8Linear.from_float(nn.Linear(32, 16))
    layer.half()
    assert layer.weight_q.dtype == E4M3 and layer.weight_scale.dtype == torch.float32
    assert layer.input_scale.dtype == torch.float32 and layer.bias.dtype == torch.float16


def test_a_layer_made_from_a_module_keeps_every_buffer_beside_its_weight():
    """A layer converted where its module lives (the pipeline converts modules already on the GPU)
    holds all its buffers there, the activation scale included: a scale left on the CPU cannot be
    read by the GPU's kernels inside a CUDA graph. The meta device stands in for the GPU here."""
    with torch.device("meta"):
        conv, linear = nn.Conv2d(16, 16, 3), nn.Linear(32, 16)
    for layer in (Fp8Conv.from_float(conv), Fp8Linear.from_float(linear)):
        assert {b.device.type for b in layer.buffers()} == {"meta"}


def test_the_policy_converts_the_large_maps_and_keeps_each_unets_first_and_last_convolution():
    from models.fp8.policy import GROUPS

    model = random_model("tiny")
    names = fp8.fp8_layer_names(model, GROUPS)
    assert fp8.fp8_layer_names(model) == [n for n in names if n.startswith("super_res.")]  # the default
    assert names and not any(n.startswith(("clip.", "decoder.text_proj", "ar_prior")) for n in names)
    assert "decoder.unet.input_blocks.0.0" not in names and "decoder.unet.out.2" not in names
    prior = [n for n in names if n.startswith("prior.")]
    assert prior and all(n.startswith("prior.transformer.resblocks.") for n in prior)
    assert any(".attn." in n for n in prior) and any(".mlp." in n for n in prior)
    assert any(n.endswith(".qkv") for n in names) and any(n.startswith("super_res.0.") for n in names)
    reference = copy.deepcopy(model)
    converted = fp8.convert(model, groups=("decoder", "super_res"))
    assert converted == [n for n in names if not n.startswith("prior.")]
    assert all(isinstance(model.get_submodule(n), (Fp8Linear, Fp8Conv)) for n in converted)
    assert fp8.holds_fp8(model.decoder.unet) and not fp8.holds_fp8(model.prior)
    # what is not converted is untouched
    assert torch.equal(model.decoder.unet.out[2].weight, reference.decoder.unet.out[2].weight)
    with pytest.raises(ValueError, match="unknown FP8 network"):
        fp8.convert(model, groups=("clip",))


def test_fp8_generation_stays_near_fp32_and_is_not_fp32(default_model):
    kw = {"seed": 3, "decoder_steps": 10, "super_res_steps": 3, "output_type": "pt", "return_image_embeds": True,
          "return_decoder_images": True}
    ref = UnCLIP(copy.deepcopy(default_model), device="cpu", progress=False).generate(PROMPTS, **kw)
    pipe = UnCLIP(copy.deepcopy(default_model), device="cpu", progress=False, precision="fp8", fp8_scales="dynamic")
    assert pipe.precision == "fp8" and pipe.fp8_scales == "dynamic"
    out = pipe.generate(PROMPTS, **kw)
    values = [psnr(a, b) for a, b in zip(ref.images, out.images, strict=True)]
    print("FP8 (dynamic) against fp32, PSNR:", [round(v, 1) for v in values])
    assert min(values) >= 35 and max(values) < 60, values  # near, and quantised
    # the default policy converts the super-res chain only: the same embeddings and 64² images
    torch.testing.assert_close(out.image_embeds, ref.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(out.decoder_images, ref.decoder_images, rtol=0, atol=0)


def test_the_gemm_way_through_whole_unets_gives_the_read_back_images(default_model, monkeypatch):
    """What CUDA runs (every fitting convolution as the FP8 GEMM, channels-last UNets) against the
    read-back convolutions, on the CPU. Layer by layer they agree to fp32 rounding (the tests
    above), but an FP8 network turns any rounding difference into other e4m3 roundings
    downstream (a 1e-7 change of a decoder step's input moves its FP8 output by 8.7e-2, its
    fp32 output by 8e-7; docs/fp8.md), so whole images agree as two FP8 runs do; a layout or
    gather error would give unrelated images (below 15 dB)."""
    from models.fp8 import layers

    kw = {"seed": 4, "decoder_steps": 8, "super_res_steps": 3, "output_type": "pt"}
    pipe = UnCLIP(copy.deepcopy(default_model), device="cpu", progress=False, precision="fp8", channels_last=True,
                  fp8_networks=["decoder", "super_res"])
    convs = [m for m in pipe.model.modules() if isinstance(m, Fp8Conv)]
    assert sum(m.gemm_shape() for m in convs) > len(convs) // 2
    want = pipe.generate(PROMPTS, **kw).images
    monkeypatch.setattr(layers, "CONV_PATH", "gemm")
    got = pipe.generate(PROMPTS, **kw).images
    values = [psnr(a, b) for a, b in zip(want, got, strict=True)]
    print("FP8 GEMM way against read-back, whole pipeline, PSNR:", [round(v, 1) for v in values])
    assert min(values) >= 25


def test_the_scales_file_round_trips_and_is_refused_for_other_weights_or_edits(default_model, tmp_path):
    model = copy.deepcopy(default_model)
    names = fp8.fp8_layer_names(model)
    scales = {n: 0.01 * (i + 1) for i, n in enumerate(names)}
    sha = weights_sha256(model)
    path = tmp_path / SCALES_FILE
    save_scales(path, scales, sha, note="test")
    assert load_scales(path, sha, names) == pytest.approx(scales, rel=1e-6)
    with pytest.raises(IntegrityError, match="other weights"):
        load_scales(path, "0" * 64, names)
    with pytest.raises(IntegrityError, match="no scale for 1"):
        load_scales(path, sha, [*names, "decoder.unet.extra"])
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[names[0]] = tensors[names[0]] * 2
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(IntegrityError, match="differ from what was written"):
        load_scales(path, sha, names)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(IntegrityError, match="unreadable"):
        load_scales(path, sha, names)


def test_calibration_gives_every_layer_a_scale_and_the_folder_records_the_file(tmp_path):
    from models.checkpoint import save_model
    from runtime.fp8_calibration import calibrate_folder

    model = random_model("tiny")
    folder = tmp_path / "model"
    save_model(model, model.cfg, folder)
    path = calibrate_folder(folder, PROMPTS, batch=1)
    assert json.loads((folder / "checksums.json").read_text())["sha256"].keys() >= {SCALES_FILE}
    pipe = UnCLIP(folder, device="cpu", progress=False, precision="fp8")  # finds the file by itself
    assert pipe.fp8_scales == f"calibrated ({path})"
    layers = {n: m for n, m in pipe.model.named_modules() if isinstance(m, (Fp8Linear, Fp8Conv))}
    assert layers and all(m.calibrated for m in layers.values())
    kw = {"seed": 3, "output_type": "pt"}
    dynamic = UnCLIP(folder, device="cpu", progress=False, precision="fp8", fp8_scales="dynamic")
    values = [psnr(a, b) for a, b in zip(dynamic.generate(PROMPTS, **kw).images, pipe.generate(PROMPTS, **kw).images,
                                          strict=True)]
    print("tiny model, calibrated against dynamic FP8 scales, PSNR:", [round(v, 1) for v in values])
    assert min(values) >= 20
    # the folder's checksums now guard the scales file as well
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(IntegrityError, match=SCALES_FILE):
        UnCLIP(folder, device="cpu", progress=False, precision="fp8")


def test_the_latency_benchmarks_in_process_calibration_covers_every_fp8_layer():
    """`benchmarks/latency.py --fp8-scales calibrated`: the scales it calibrates in process name every
    FP8 layer the timed pipeline holds (none left measuring its inputs) and are the scales
    `runtime.fp8_calibration` would give for the same prompts."""
    from benchmarks.latency import calibrated_scales
    from runtime.fp8_calibration import GENERIC_PROMPTS, calibrate

    model = random_model("tiny")
    scales = calibrated_scales(model, None, device="cpu")
    timed = UnCLIP(model, device="cpu", progress=False, precision="fp8", fp8_scales="dynamic")
    assert set(fp8.fp8_layers(timed.model)) == set(scales) and all(v > 0 for v in scales.values())
    again = calibrate(UnCLIP(model, device="cpu", progress=False, cuda_graphs=False, precision="fp8",
                             fp8_scales="dynamic"), list(GENERIC_PROMPTS[:2]), batch=2, full_chain_prompts=1)
    assert again == pytest.approx(scales)


def test_observe_records_the_largest_input_of_every_layer_that_ran():
    torch.manual_seed(0)
    net = nn.Sequential(Fp8Linear.from_float(nn.Linear(16, 16)), Fp8Linear.from_float(nn.Linear(16, 16)))
    x = torch.randn(4, 16) * 3
    with observe(net) as scales:
        net[0](x)
        net[0](x / 2)
    assert scales == {"0": pytest.approx(float(x.abs().amax()) / E4M3_MAX)}  # the second layer never ran


def test_precision_arguments_are_checked(default_model, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        UnCLIP(default_model, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="fp8_scales is for precision='fp8'"):
        UnCLIP(default_model, device="cpu", fp8_scales="dynamic")
    with pytest.raises(ValueError, match="unknown FP8 network"):
        UnCLIP(default_model, device="cpu", precision="fp8", fp8_networks=["unet"])
    with pytest.raises(ValueError, match="non-empty list"):
        UnCLIP(default_model, device="cpu", precision="fp8", fp8_networks="decoder")
    # the shipped scales cover the default networks only: the prior needs its own calibration
    with pytest.raises(IntegrityError, match="no scale for 16"):
        UnCLIP(default_model, device="cpu", precision="fp8", fp8_networks=["prior", "decoder"],
               fp8_scales=DEFAULT_MODEL / SCALES_FILE)
    only_sr = UnCLIP(default_model, device="cpu", progress=False, precision="fp8", fp8_networks=["super_res"],
                     fp8_scales=DEFAULT_MODEL / SCALES_FILE)
    assert not fp8.holds_fp8(only_sr.model.decoder.unet) and fp8.holds_fp8(only_sr.model.super_res[0].first_steps)
    with pytest.raises(ValueError, match="leave engine_dir unset"):
        UnCLIP(default_model, device="cpu", precision="fp8", engine_dir=tmp_path)
    with pytest.raises(ValueError, match="leave engine_dir unset"):
        UnCLIP(default_model, device="cpu", precision="fp8", backend="onnxruntime")
    with pytest.raises(ValueError, match="float64"):
        UnCLIP(default_model, device="cpu", precision="fp8", dtype=torch.float64)
    with pytest.raises(FileNotFoundError, match="fp8_calibration"):
        UnCLIP(default_model, device="cpu", precision="fp8", fp8_scales=tmp_path / "absent.safetensors")
    before = weights_sha256(default_model)
    UnCLIP(default_model, device="cpu", progress=False, precision="fp8", fp8_scales="dynamic")
    assert weights_sha256(default_model) == before  # the caller's model is not converted
    assert not any(isinstance(m, (Fp8Linear, Fp8Conv)) for m in default_model.modules())


def test_the_command_line_generates_in_fp8_and_names_its_flags_in_errors(tmp_path, capsys):
    from PIL import Image

    from runtime.__main__ import main

    out = tmp_path / "fp8.png"
    assert main(["a red circle on a blue background", "--precision", "fp8", "--fp8-scales", "dynamic",
                 "--decoder-steps", "3", "--super-res-steps", "2", "--no-progress", "--device", "cpu",
                 "-o", str(out)]) == 0
    assert Image.open(out).size == (256, 256)
    assert main(["a red circle", "--fp8-scales", "dynamic", "-o", str(tmp_path / "x.png")]) == 2
    assert "--fp8-scales is for" in capsys.readouterr().err


IMPLICIT_CHECK = """
import torch
from torch import nn
from models.fp8.e4m3 import quantize
from models.fp8.layers import Fp8Conv
from models.fp8.implicit_gemm import conv2d_nhwc, tap_major
torch.manual_seed(0)
for kernel, padding in ((3, 1), (1, 0)):
    layer = Fp8Conv.from_float(nn.Conv2d(48, 32, kernel, padding=padding))
    # inputs on the e4m3 grid of a power-of-two scale, a few far beyond its range: the kernel's own
    # quantisation (divide, saturate, cast) must give the read-back way's operands exactly; how
    # a value between two e4m3 numbers rounds is the hardware's cast (the interpreter's cast
    # mis-rounds values just below a power of two, so rounding is left to the GPU test)
    scale = 2.0**-6
    x = quantize(torch.randn(2, 48, 7, 9), torch.tensor(scale)).float() * scale
    x[0, 0, 0, :3] = torch.tensor([1e3, -1e3, 50.0])
    x = x.to(memory_format=torch.channels_last)
    layer.set_input_scale(scale)
    want, got = layer(x, "readback"), layer(x, "implicit")
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    q, s = layer._input(torch.randn(2, 48, 7, 9).to(memory_format=torch.channels_last))
    pre = conv2d_nhwc(q, tap_major(layer.weight_q), kernel, layer.bias, a_scale=s, b_scale=layer.weight_scale,
                      out_dtype=torch.float32, tuned=False)  # e4m3 input given: no quantisation in the kernel
    ref = nn.functional.conv2d(q.float() * s, layer.dequantized_weight(torch.float32), layer.bias, padding=padding)
    torch.testing.assert_close(pre, ref, rtol=1e-5, atol=1e-4)
    w = torch.randn(32, 48, kernel, kernel).half()
    half = conv2d_nhwc(x.half(), tap_major(w), kernel, out_dtype=torch.float32, tuned=False)
    torch.testing.assert_close(half, nn.functional.conv2d(x.half().float(), w.float(), padding=padding),
                               rtol=1e-4, atol=1e-3)
print("ok")
"""


def run_interpreted(script: str) -> None:
    """Run `script` in a fresh Python under Triton's CPU interpreter; it must print "ok"."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_implicit_gemm_kernel_gives_the_read_back_convolution_in_e4m3_and_fp16():
    """The Triton kernel (`models.fp8.implicit_gemm`) in Triton's interpreter on the CPU: the input
    quantised inside the kernel, and given already quantised, against the read-back convolution;
    fp16 operands against torch's."""
    run_interpreted(IMPLICIT_CHECK)


SPLIT_CHECK = """
import torch
from torch import nn
from models.fp8.implicit_gemm import conv2d_nhwc, conv2d_nhwc_split_k, tap_major
torch.manual_seed(0)
for kernel, padding in ((3, 1), (1, 0)):
    x = torch.randn(2, 48, 5, 7).to(memory_format=torch.channels_last)
    w = torch.randn(40, 48, kernel, kernel)
    bias = torch.randn(40)
    want = nn.functional.conv2d(x.double(), w.double(), bias.double(), padding=padding)
    for splits in (1, 2, 3, 5, 64):
        got = conv2d_nhwc_split_k(x, tap_major(w), kernel, bias, splits, tuned=False)
        assert got.dtype == x.dtype and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        assert torch.equal(conv2d_nhwc_split_k(x, tap_major(w), kernel, bias, splits, tuned=False), got)
    half = conv2d_nhwc_split_k(x.half(), tap_major(w.half()), kernel, None, 3, tuned=False)
    assert half.dtype == torch.float16
    ref = nn.functional.conv2d(x.half().float(), w.half().float(), padding=padding)
    torch.testing.assert_close(half.float(), ref, rtol=2e-3, atol=2e-3)
    plain = conv2d_nhwc(x, tap_major(w), kernel, bias, out_dtype=torch.float32, tuned=False)
    torch.testing.assert_close(plain.double(), want, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_the_split_k_kernel_gives_torchs_convolution_for_every_split_count():
    """`conv2d_nhwc_split_k` in Triton's interpreter on the CPU: 3×3 and 1×1, float32 operands against
    float64's convolution for 1 to 64 slices (more slices than 32-index steps: the extra ones
    empty), the same bits on a second call, fp16 operands within fp16 tolerance, and the plain
    kernel (one slice column) unchanged."""
    run_interpreted(SPLIT_CHECK)


def test_the_cutlass_way_reads_back_where_its_kernel_does_not_serve(monkeypatch):
    """`Fp8Conv(x, "cutlass")` and `CONV_PATH = "cutlass"` on the CPU (no CUTLASS kernel here):
    the read-back convolution, exactly."""
    torch.manual_seed(0)
    from models.fp8 import layers

    layer = Fp8Conv.from_float(nn.Conv2d(32, 16, 3, padding=1))
    x = torch.randn(2, 32, 8, 8)
    want = layer(x, "readback")
    assert torch.equal(layer(x, "cutlass"), want)
    monkeypatch.setattr(layers, "CONV_PATH", "cutlass")
    assert torch.equal(layer(x), want)


QUANTIZE_CHECK = """
import torch
from models.fp8.e4m3 import E4M3, quantize
from models.fp8.quantize_kernel import quantize_fused
torch.manual_seed(0)
scale = torch.tensor(2.0**-4)
# on the e4m3 grid of a power-of-two scale, a few far beyond its range: division and saturation
# exact, so the kernel must give torch's bytes (rounding between grid points and NaN are the
# hardware cast's: the interpreter's own cast mis-rounds and drops NaN, so both are the GPU test's)
x = quantize(torch.randn(2, 16, 5, 7), scale).float() * scale
x[0, 0, 0, :2] = torch.tensor([1e3, -1e3])
for t in (x, x.half(), x.to(memory_format=torch.channels_last), x[:, :, 0]):  # the last not dense: torch's way
    got, want = quantize_fused(t, scale), quantize(t, scale)
    assert got.dtype == E4M3 and (got.stride() == t.stride() or not t.is_contiguous())
    assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
print("ok")
"""


def test_the_fused_quantisation_gives_torchs_bytes():
    """`models.fp8.quantize_kernel` in Triton's interpreter on the CPU against `quantize`: fp32,
    fp16 and channels-last inputs keep their layout and get the same e4m3 bytes."""
    run_interpreted(QUANTIZE_CHECK)
