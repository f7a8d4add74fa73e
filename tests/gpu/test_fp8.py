"""FP8 on the GPU (`models.fp8`, `UnCLIP(precision="fp8")`): the linear layers through the FP8
GEMM itself (`torch._scaled_mm`, not the read-back fallback) and the convolutions in both layouts
against the product of their e4m3 operands; the pipeline's CUDA-graph replay against its eager run;
and FP8 against fp16 on the default model (images) and at Karlo size (one forward per stage)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cpp_ext
from models import fused, implicit_conv
from models.fp8 import layers as fp8_layers
from models.fp8.e4m3 import quantize, tensor_scale
from tests.gpu.common import needs_kernel, rel
from tests.metrics import psnr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = ["a red circle on a blue background", "a yellow star on a white background"]


def _reference(layer, x):
    scale = tensor_scale(x).double()
    xr = quantize(x, scale.float()).double() * scale
    view = (-1,) + (1,) * (layer.weight_q.dim() - 1)
    w = layer.weight_q.double() * layer.weight_scale.double().view(view)
    b = None if layer.bias is None else layer.bias.double()
    if isinstance(layer, fp8_layers.Fp8Linear):
        return nn.functional.linear(xr, w, b)
    return nn.functional.conv2d(xr, w, b, layer.stride, layer.padding)


def test_an_fp8_linear_runs_the_fp8_gemm_and_gives_the_product_of_its_operands():
    torch.manual_seed(0)
    layer = fp8_layers.Fp8Linear.from_float(nn.Linear(1024, 2048)).cuda().half()
    x = torch.randn(2, 77, 1024, device="cuda", dtype=torch.float16)
    got = layer(x)
    how = fp8_layers._SCALED_MM_WORKS.get(("cuda", torch.float16))
    print("torch._scaled_mm with row-wise scales and an fp16 result:", how)
    assert how in (True, "bfloat16")  # the FP8 GEMM ran (directly, or with a bfloat16 result)
    assert rel(got, _reference(layer, x)) <= (2e-3 if how is True else 8e-3)  # fp16 (bf16) output rounding


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_fp8_convolution_gives_the_product_of_its_operands(channels_last):
    torch.manual_seed(0)
    layer = fp8_layers.Fp8Conv.from_float(nn.Conv2d(320, 320, 3, padding=1)).cuda().half()
    x = torch.randn(2, 320, 32, 32, device="cuda", dtype=torch.float16)
    if channels_last:
        layer.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    assert layer.gemm_shape()
    got = layer(x)  # "auto": CUTLASS's kernel where built, else the FP8 GEMM over gathered neighbourhoods
    auto = layer._auto_path(x)
    assert auto == ("cutlass" if implicit_conv.serves_e4m3(320, 320) else "gemm")
    torch.testing.assert_close(got, layer(x, auto), rtol=0, atol=0)
    # the GEMM way sums in fp32 (torch._scaled_mm); CUTLASS's convolution sums the FP8 products in
    # the tensor cores' own accumulator, which keeps fewer bits than fp32 over this K of 2880 —
    # still an order below FP8's own quantisation error (docs/fp8.md)
    assert rel(layer(x, "gemm"), _reference(layer, x)) <= 2e-3
    assert rel(got, _reference(layer, x)) <= (5e-3 if auto == "cutlass" else 2e-3)
    unbiased = layer(x, auto, with_bias=False)  # the fused path's call: the bias left to a later pass
    torch.testing.assert_close(unbiased.float() + layer.bias.float().view(1, -1, 1, 1), got.float(),
                               rtol=0, atol=2e-3 * got.abs().max().item())
    assert rel(layer(x, "readback"), _reference(layer, x)) <= 2e-3
    assert rel(layer(x, "implicit"), _reference(layer, x)) <= 2e-3  # the Triton implicit GEMM


def test_the_implicit_gemm_kernel_in_fp16_gives_cudnns_convolution():
    from models.fp8.implicit_gemm import conv2d_nhwc, tap_major

    torch.manual_seed(0)
    conv = nn.Conv2d(320, 320, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 320, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    got = conv2d_nhwc(x, tap_major(conv.weight.detach()), 3, conv.bias.detach(), out_dtype=torch.float16)
    assert rel(got, conv(x)) <= 2e-3


@pytest.mark.parametrize(("cin", "cout", "size", "splits"),
                         [(1280, 1280, 8, 16), (2560, 1280, 8, 8), (960, 960, 16, 4)])
def test_the_split_k_kernel_gives_cudnns_convolution_and_replays_from_a_cuda_graph(cin, cout, size, splits):
    """`conv2d_nhwc_split_k` on the decoder's small maps at its guided batch: within 2e-3 of cuDNN,
    the same bits on a second call (the slices meet in order), and a CUDA-graph replay (after the
    autotuning call) equal to the eager call."""
    from models.fp8.implicit_gemm import conv2d_nhwc_split_k, tap_major

    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(2, cin, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    weight, bias = tap_major(conv.weight.detach()), conv.bias.detach()
    got = conv2d_nhwc_split_k(x, weight, 3, bias, splits)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel(got, conv(x)) <= 2e-3
    assert torch.equal(conv2d_nhwc_split_k(x, weight, 3, bias, splits), got)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = conv2d_nhwc_split_k(x, weight, 3, bias, splits)
    replayed.fill_(0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, got)


def test_fp8_loops_replay_their_eager_run_and_stay_near_fp16(no_tf32):
    from runtime import UnCLIP

    kw = {"seed": 3, "output_type": "pt"}
    fp16 = UnCLIP(device="cuda", dtype=torch.float16, progress=False).generate(PROMPTS, **kw).images
    graphed = UnCLIP(device="cuda", dtype=torch.float16, progress=False, precision="fp8")
    assert graphed.graphs is not None and graphed.fp8_scales.startswith("calibrated")
    eager = UnCLIP(device="cuda", dtype=torch.float16, progress=False, precision="fp8", cuda_graphs=False)
    a, b = graphed.generate(PROMPTS, **kw).images, eager.generate(PROMPTS, **kw).images
    again = graphed.generate(PROMPTS, **kw).images
    assert torch.equal(a, again)  # a replay repeats itself
    replay = [psnr(x, y) for x, y in zip(a, b, strict=True)]
    against_fp16 = [psnr(x, y) for x, y in zip(a, fp16, strict=True)]
    print("FP8 replay against eager FP8, PSNR:", [round(v, 1) for v in replay])
    print("FP8 (calibrated) against fp16, PSNR:", [round(v, 1) for v in against_fp16])
    # an FP8 network turns any rounding difference into other e4m3 roundings downstream, so two
    # FP8 runs agree only as such (docs/fp8.md); a capture error would give unrelated images
    assert min(replay) >= 25
    assert min(against_fp16) >= 20


@needs_kernel
@pytest.mark.parametrize("stage", ["super_res", "decoder"])
def test_the_fused_unet_runs_fp8_layers_as_near_fp16_as_the_reference_forward(ours, stage, unbiased_fp8_calls):
    """A UNet holding FP8 layers on the fused path: its blocks run the layers' own e4m3 products
    without their biases (added by the fused joins), and the output is as near the fp16 network's
    as the reference forward with the same layers. The two FP8 outputs are compared through their
    error, not with each other: an FP8 network turns any rounding difference (here, the fused
    norms') into other e4m3 roundings downstream (docs/fp8.md)."""
    from models import fp8

    half = copy.deepcopy(ours).cuda().half().to(memory_format=torch.channels_last)
    converted = copy.deepcopy(half)
    fp8.convert(converted, groups=("decoder", "super_res"))
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([900, 10]).cuda()
    cl = torch.channels_last
    if stage == "super_res":
        x = torch.randn(2, 6, 64, 64, generator=g).cuda().half().to(memory_format=cl)

        def run(m, fast):
            unet = m.super_res[0].first_steps
            return fused.unet_forward(unet, x, t) if fast else unet(x, t)
    else:
        cfg = ours.cfg
        size = cfg.decoder.image_size
        x = torch.randn(2, 3, size, size, generator=g).cuda().half().to(memory_format=cl)
        mask = torch.ones(2, cfg.clip.context_length, dtype=torch.bool, device="cuda")
        mask[1, 5:] = False
        embeds = [torch.randn(2, cfg.prior.clip_dim, generator=g).cuda().half() for _ in range(2)]
        tokens = torch.randn(2, cfg.clip.context_length, cfg.clip.text_width, generator=g).cuda().half()

        def run(m, fast):
            if not fast:
                return m.decoder(x, t, *embeds, tokens, mask)
            context, bias, emb_add = m.decoder.text_proj(*embeds, tokens, mask)
            return fused.unet_forward(m.decoder.unet, x, t, emb_add, context, bias)
    with torch.no_grad():
        ref16 = run(half, fast=False).float()
        fused8 = run(converted, fast=True).float()
        assert unbiased_fp8_calls, "the fused path did not run the FP8 layers' products"
        plain8 = run(converted, fast=False).float()
    errors = {"fused FP8": rel(fused8, ref16), "reference FP8": rel(plain8, ref16)}
    print(stage, "against fp16:", {k: f"{v:.2e}" for k, v in errors.items()}, len(unbiased_fp8_calls), "unbiased calls")
    assert 0 < errors["fused FP8"] <= max(1.5 * errors["reference FP8"], 2e-2), errors


@pytest.mark.usefixtures("large_gpu_memory")
def test_fp8_stages_at_karlo_size_against_fp16():
    from export.build_engines import random_model
    from models import fp8
    from runtime.backends.signatures import signatures, stage_module

    model = random_model("karlo", device="cuda").half()
    sigs = signatures(model.cfg)
    errors = {}
    for stage, batch in (("decoder_step", 2), ("super_res_first", 1)):
        module = stage_module(model, stage)
        inputs = sigs[stage].sample_inputs(batch, torch.float16, "cuda", torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = module(*inputs.values())[0].float()
            converted = copy.deepcopy(model)
            fp8.convert(converted, groups=("decoder", "super_res"))
            got = stage_module(converted, stage)(*inputs.values())[0].float()
        errors[stage] = float((got - ref).norm() / ref.norm())
        del converted
    print("FP8 against fp16 at Karlo size, relative error:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert all(0 < e < 0.15 for e in errors.values()), errors  # CPU, fp32 reference: 9.4e-2 and 1.1e-1


def test_the_fused_quantisation_gives_torchs_bytes_on_the_gpu():
    """`models.fp8.quantize_kernel.quantize_fused` on the GPU against `quantize` on any values:
    rounding between e4m3 numbers, saturation and NaN are the hardware cast's, and must match."""
    from models.fp8.e4m3 import E4M3, quantize, tensor_scale
    from models.fp8.quantize_kernel import quantize_fused

    torch.manual_seed(0)
    x = torch.randn(2, 64, 33, 17, device="cuda") * 3
    x[0, 0, 0, :4] = torch.tensor([1e4, -1e4, float("nan"), 0.0])
    scale = tensor_scale(x[1])  # x[0] goes beyond it: saturation
    for t in (x, x.half(), x.to(memory_format=torch.channels_last).half()):
        got, want = quantize_fused(t, scale), quantize(t, scale)
        assert got.dtype == E4M3 and got.stride() == t.stride()
        g, w = got.float(), want.float()
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(0.0), w.nan_to_num(0.0))


def test_a_captured_graph_follows_a_new_calibrated_scale():
    """A calibrated FP8 convolution captured in a CUDA graph, then given another calibrated scale:
    the replay uses the new scale (the kept scale products are remade in place) and equals an
    eager call with it."""
    torch.manual_seed(0)
    layer = fp8_layers.Fp8Conv.from_float(nn.Conv2d(320, 320, 3, padding=1)).cuda().half()
    layer.to(memory_format=torch.channels_last)
    x = torch.randn(1, 320, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    layer.set_input_scale(float(tensor_scale(x)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        layer(x)  # warm-up: the kept products are made outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = layer(x)
    layer.set_input_scale(float(tensor_scale(x)) * 0.25)  # most values now saturate
    graph.replay()
    with torch.no_grad():
        want = layer(x)
    assert torch.equal(out, want)
    layer.set_input_scale(float(tensor_scale(x)))
    graph.replay()
    assert not torch.equal(out, want)


needs_cutlass = pytest.mark.skipif(cpp_ext.cutlass_conv is None,
                                   reason="CUTLASS's convolutions not built (UNCLIP_RT_CUTLASS)")


def _one_step_apart(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether two e4m3 tensors (read as floats) are at most one e4m3 step apart everywhere: an
    eighth of the value in the normal range, 2^-9 among the subnormals."""
    g, w = got.float(), want.float()
    return bool(((g - w).abs() <= (w.abs() / 8 + 2.0**-9) * 1.001).all())


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 320, 32, 32), (2, 64, 8, 8)])  # three passes; a one-pass size
def test_the_norm_writes_the_e4m3_input_its_convolution_would_quantise(shape):
    """`group_norm_e4m3` (`cpp_ext`'s coefficients pass, then the quantising normalisation) against
    the two-pass way, `quantize_fused` of the fp16 norm: the norm's value rounded once to e4m3
    where the two-pass way rounds it to fp16 first, so at most one e4m3 step apart and mostly
    equal — plain, with a FiLM scale/shift, SiLU and a bias added before the norm, with a
    per-sample row added, and written 2x up and 2x2 down as the up and down blocks' norms write."""
    from models.fp8.e4m3 import E4M3
    from models.fp8.quantize_kernel import quantize_fused
    from models.fused.norms import group_norm, group_norm_e4m3
    from models.layers import GroupNorm32

    torch.manual_seed(0)
    b, c = shape[:2]
    cl = torch.channels_last
    norm = GroupNorm32(c, silu=False).cuda().half()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).half().to(memory_format=cl)
    film = torch.randn(b, 2 * c, device="cuda").half() * 0.3
    cases = {"plain": {},
             "film": {"scale": film[:, :c], "shift": film[:, c:], "silu": True,
                      "add_bias": torch.randn(c, device="cuda").half()},
             "add": {"add": torch.randn(b, c, device="cuda").half()},
             "up": {"up": True, "silu": True}, "down": {"down": True, "silu": True}}
    for name, kw in cases.items():
        y16 = group_norm(norm, x, **kw)
        out_scale = tensor_scale(y16)
        q = group_norm_e4m3(norm, x, out_scale, **kw)
        assert q is not None and q.dtype == E4M3 and q.shape == y16.shape and q.is_contiguous(memory_format=cl), name
        two_pass = quantize_fused(y16, out_scale)
        same = float((q.float() == two_pass.float()).float().mean())
        print(name, shape, f"equal bytes {same:.4f}")
        assert _one_step_apart(q, two_pass) and same > 0.97, (name, same)


@needs_kernel
def test_the_concatenating_norm_writes_e4m3_and_the_same_concatenation():
    """`group_norm_concat_e4m3`: the concatenation `cpp_ext.kernels.group_norm_concat` writes (the
    first part's biases added), bit for bit, and its norm's e4m3 within one step of quantising
    that norm's fp16 output."""
    from models.fp8.quantize_kernel import quantize_fused
    from models.fused.norms import group_norm_concat_e4m3
    from models.layers import GroupNorm32

    torch.manual_seed(0)
    cl = torch.channels_last
    first = torch.randn(1, 320, 32, 32, device="cuda").half().to(memory_format=cl)
    second = torch.randn(1, 320, 32, 32, device="cuda").half().to(memory_format=cl)
    bias, bias2 = (torch.randn(320, device="cuda").half() * 0.1 for _ in range(2))
    norm = GroupNorm32(640, silu=True).cuda().half()
    y16, cat16 = cpp_ext.kernels.group_norm_concat(first, second, 32, norm.weight, norm.bias, norm.eps, True,
                                                   bias, bias2)
    out_scale = tensor_scale(y16)
    q, cat = group_norm_concat_e4m3(norm, first, second, out_scale, bias, bias2)
    assert torch.equal(cat, cat16)
    two_pass = quantize_fused(y16, out_scale)
    same = float((q.float() == two_pass.float()).float().mean())
    assert _one_step_apart(q, two_pass) and same > 0.97, same


@needs_kernel
@needs_cutlass
def test_the_fused_unet_with_e4m3_norms_stays_as_near_fp16(ours, monkeypatch):
    """The default model's super-res UNet in FP8 with calibrated scales on the fused path, with
    the norms writing e4m3 for the 3×3 convolutions (`FusedOptions(norm_writes_e4m3=True)`) and
    without: the option's path runs (the convolutions take quantised inputs), and its output is
    as near the fp16 network's as without it (FP8 turns the one-rounding-fewer into other e4m3
    roundings downstream, so the two FP8 outputs are compared through their error)."""
    from models import fp8
    from models.fp8.scales import observe
    from models.fused import FusedOptions

    half = copy.deepcopy(ours).cuda().half().to(memory_format=torch.channels_last)
    converted = copy.deepcopy(half)
    fp8.convert(converted, groups=("super_res",))
    unet16, unet8 = half.super_res[0].first_steps, converted.super_res[0].first_steps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 64, 64, generator=g).cuda().half().to(memory_format=torch.channels_last)
    t = torch.tensor([900, 10]).cuda()
    taken = []
    product = fp8_layers.Fp8Conv.product_of_quantized
    monkeypatch.setattr(fp8_layers.Fp8Conv, "product_of_quantized",
                        lambda self, q, with_bias=True: taken.append(self) or product(self, q, with_bias))
    with torch.no_grad():
        with observe(converted) as scales:
            unet8(x, t)
        layers = fp8.fp8_layers(converted)
        for name, scale in scales.items():
            layers[name].set_input_scale(scale)
        ref16 = fused.unet_forward(unet16, x, t).float()
        two_pass = fused.unet_forward(unet8, x, t, options=FusedOptions(norm_writes_e4m3=False)).float()
        assert not taken
        one_pass = fused.unet_forward(unet8, x, t).float()  # the default: the norms write e4m3
    assert taken, "no convolution took an e4m3 input from its norm"
    errors = {"two-pass": rel(two_pass, ref16), "e4m3 norms": rel(one_pass, ref16)}
    print("FP8 super-res against fp16:", {k: f"{v:.2e}" for k, v in errors.items()}, len(taken), "e4m3 inputs")
    assert 0 < errors["e4m3 norms"] <= max(1.5 * errors["two-pass"], 2e-2), errors


@needs_kernel
@needs_cutlass
def test_the_fused_unet_with_skips_in_fp16_stays_as_near_fp16(ours, monkeypatch):
    """The default model's super-res UNet in FP8 (calibrated scales, the default fused path) with
    its 1×1 skips kept in fp16 (`policy.SKIP_CONVS` off: accumulated into the block's last
    convolution) is at least as near the fp16 network as with the skips in FP8."""
    from models import fp8
    from models.fp8 import policy
    from models.fp8.scales import observe

    half = copy.deepcopy(ours).cuda().half().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 64, 64, generator=g).cuda().half().to(memory_format=torch.channels_last)
    t = torch.tensor([900, 10]).cuda()
    outputs = {}
    with torch.no_grad():
        ref16 = fused.unet_forward(half.super_res[0].first_steps, x, t).float()
        for skips_in_fp8 in (True, False):
            monkeypatch.setattr(policy, "SKIP_CONVS", skips_in_fp8)
            converted = copy.deepcopy(half)
            fp8.convert(converted, groups=("super_res",))
            unet8 = converted.super_res[0].first_steps
            skips = [m.skip_connection for m in unet8.modules() if hasattr(m, "skip_connection")
                     and not isinstance(m.skip_connection, torch.nn.Identity)]
            assert skips and all(isinstance(s, fp8_layers.Fp8Conv) == skips_in_fp8 for s in skips)
            with observe(converted) as scales:
                unet8(x, t)
            layers = fp8.fp8_layers(converted)
            for name, scale in scales.items():
                layers[name].set_input_scale(scale)
            outputs[skips_in_fp8] = fused.unet_forward(unet8, x, t).float()
    errors = {"FP8 skips": rel(outputs[True], ref16), "fp16 skips": rel(outputs[False], ref16)}
    print("FP8 super-res against fp16:", {k: f"{v:.2e}" for k, v in errors.items()})
    assert 0 < errors["fp16 skips"] <= max(1.5 * errors["FP8 skips"], 2e-2), errors
