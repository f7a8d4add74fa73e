"""The GPU fast path: the fused update kernel against its torch reference, CUDA-graph replay
against eager loops, fp16 against fp32 (Karlo-size stages and the trained default model).
Skipped without a CUDA GPU; the kernel tests also need `cpp_ext` built (python setup.py build_ext --inplace)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from models.configs import DiffusionConfig, UNetConfig
from runtime import UnCLIP
from runtime.sampling import make_step_table
from runtime.update import UpdateSpec, guided_update, implementation, packed_coefficients
from tests.metrics import psnr

pytestmark = pytest.mark.gpu
needs_kernel = pytest.mark.skipif(cpp_ext.kernels is None, reason=f"cpp_ext not built: {cpp_ext.IMPORT_ERROR}")
CASES = {
    "prior": (DiffusionConfig("sample", "fixed_small_log", 5.0), (2, 768), 768),
    "decoder": (DiffusionConfig("epsilon", "learned_range", 1.0), (2, 3, 64, 64), 6),
    "super_res": (DiffusionConfig("epsilon", "fixed_small_log", 1.0), (1, 3, 256, 256), 3),
    "unaligned": (DiffusionConfig("epsilon", "learned_range", 1.0), (3, 3, 5, 5), 6),  # the scalar path
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_fused_kernel_matches_the_reference_and_repeats_exactly(case, out_dtype, guided):
    config, shape, out_channels = CASES[case]
    learned = config.variance == "learned_range"
    spec = UpdateSpec(config.prediction, config.clip_range, learned, guided)
    coefs = packed_coefficients(make_step_table(config, 25), torch.float32, "cuda")
    g = torch.Generator(device="cuda").manual_seed(hash((case, guided)) % 2**31)
    b = shape[0]
    for i in (0, 12, 24):
        x = torch.randn(shape, generator=g, device="cuda")
        noise = torch.randn(shape, generator=g, device="cuda")
        out = torch.randn((spec.copies * b, out_channels, *shape[2:]), generator=g, device="cuda")
        if learned:
            out[:, shape[1]:] = out[:, shape[1]:].tanh()
        out = out.to(out_dtype)
        scale = torch.full((1,), 4.0, device="cuda")
        results = []
        for use_kernel in (False, True, True):
            first_bad = torch.full((1,), -1, dtype=torch.int32, device="cuda")
            x_new, x_in = guided_update(out, x, noise, coefs[i], scale, first_bad, i, spec, torch.float16,
                                        use_kernel=use_kernel)
            results.append((x_new, x_in, int(first_bad)))
        (ref, ref_in, _), (got, got_in, bad), (again, again_in, _) = results
        assert _rel(got, ref) <= 1e-3 and _rel(got_in, ref_in) <= 1e-3, (case, i)
        assert torch.equal(got, again) and torch.equal(got_in, again_in)  # deterministic
        assert bad == -1 and got_in.shape == (spec.copies * b, *shape[1:])


@needs_kernel
def test_fused_kernel_records_the_first_non_finite_step():
    config, shape, _ = CASES["decoder"]
    spec = UpdateSpec("epsilon", 1.0, True, True)
    coefs = packed_coefficients(make_step_table(config, 25), torch.float32, "cuda")
    x, noise = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    out = torch.zeros((4, 6, 64, 64), device="cuda", dtype=torch.float16)
    first_bad = torch.full((1,), -1, dtype=torch.int32, device="cuda")
    scale = torch.ones(1, device="cuda")
    guided_update(out, x, noise, coefs[3], scale, first_bad, 3, spec, torch.float16, use_kernel=True)
    assert int(first_bad) == -1
    out[1, 0, 5, 5] = float("nan")
    guided_update(out, x, noise, coefs[4], scale, first_bad, 4, spec, torch.float16, use_kernel=True)
    out[0, 0, 0, 0] = float("inf")
    guided_update(out, x, noise, coefs[9], scale, first_bad, 9, spec, torch.float16, use_kernel=True)
    assert int(first_bad) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_gives_the_eager_images(ours, dtype):
    steps = {"prior_steps": 10, "decoder_steps": 4, "super_res_steps": 3}
    eager = UnCLIP(copy.deepcopy(ours), device="cuda", dtype=dtype, progress=False, cuda_graphs=False)
    graphed = UnCLIP(copy.deepcopy(ours), device="cuda", dtype=dtype, progress=False)
    assert eager.graphs is None and graphed.graphs is not None
    calls = (("a red circle", 1, 0), ("a green square", 1, 1), (["a", "b"], 2, 2), ("a red circle", 1, 0))
    for prompt, n, seed in calls:
        kw = {"num_images_per_prompt": n, "seed": seed, "output_type": "pt", "return_image_embeds": True, **steps}
        want, got = eager.generate(prompt, **kw), graphed.generate(prompt, **kw)
        assert torch.allclose(got.images, want.images, atol=1e-6), prompt
        assert torch.allclose(got.image_embeds, want.image_embeds, atol=1e-6)
    # the prior (10 steps: graphs of steps [0, 3) with the context, [3, 8) and [8, 10)), decoder
    # and super-res at batch 1 and at batch 4, and the text encoder at 1 and 2 prompts
    assert len(graphed.graphs) == 12


def test_fp16_default_model_matches_fp32_on_the_same_noise():
    prompts = ["a red circle on a blue background", "a yellow triangle on a white background",
               "a green square on a black background", "a blue star on a red background"]
    fp32 = UnCLIP(device="cuda", progress=False).generate(prompts, seed=3, output_type="pt").images
    fp16 = UnCLIP(device="cuda", dtype=torch.float16, progress=False).generate(prompts, seed=3, output_type="pt").images
    values = [psnr(a, b) for a, b in zip(fp16, fp32, strict=True)]
    print("fp16 vs fp32 PSNR per image (dB):", [round(v, 1) for v in values])
    assert min(values) >= 35.0


@pytest.mark.slow
@torch.no_grad()
def test_karlo_size_stages_in_fp16_stay_within_1e2_of_fp32():
    from export.build_engines import random_model
    from runtime.engines import TorchEngine
    from runtime.signatures import signatures

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = random_model("karlo", device="cuda")
        half = copy.deepcopy(model).half()
        sigs = signatures(model.cfg)
        errors = {}
        for name in ("clip_text", "prior_context", "prior_step", "decoder_context", "decoder_step", "super_res_first",
                     "super_res_last"):
            inputs = sigs[name].sample_inputs(2, device="cuda", generator=torch.Generator().manual_seed(0))
            ref = TorchEngine(model, name)(*inputs.values())
            got = TorchEngine(half, name)(*inputs.values())
            errors[name] = max(_rel(g.float(), r) for g, r in zip(got, ref, strict=True) if r.is_floating_point())
        print("Karlo-size fp16 vs fp32 max relative error per stage:", {k: f"{v:.1e}" for k, v in errors.items()})
        assert all(e <= 1e-2 for e in errors.values()), errors
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_runtime_says_which_update_runs():
    assert implementation("cuda") == ("cpp_ext" if cpp_ext.kernels is not None else "torch")


GN_SHAPES = [(1, 320, 256, 256), (2, 1280, 8, 8), (4, 960, 16, 16), (2, 2240, 32, 32), (3, 64, 5, 7), (2, 32, 16, 16)]


@needs_kernel
@pytest.mark.parametrize("shape", GN_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("one_pass_mode", [0, 1])
def test_fused_group_norm_matches_float32_torch(shape, layout, dtype, one_pass_mode):
    """Both kernels (three passes for large maps, one launch for small ones) against torch in float32."""
    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    b, c = shape[:2]
    x = (torch.randn(shape, generator=g, device="cuda") * 3 + 2).to(dtype)  # a mean far from 0
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    weight = (1 + 0.1 * torch.randn(c, generator=g, device="cuda")).to(dtype)
    bias = (0.1 * torch.randn(c, generator=g, device="cuda")).to(dtype)
    scale = (0.2 * torch.randn(b, c, generator=g, device="cuda")).to(dtype)
    shift = (0.2 * torch.randn(b, c, generator=g, device="cuda")).to(dtype)
    add = torch.randn(b, c, generator=g, device="cuda").to(dtype)
    add_bias = torch.randn(c, generator=g, device="cuda").to(dtype)
    # scale/shift as the two halves of one [B, 2C] projection (strided rows, as the ResBlocks pass them)
    film_rows = torch.cat([scale, shift], dim=1)
    strided_scale, strided_shift = film_rows.chunk(2, dim=1)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    cases = ((False, False, False, False), (False, True, False, False), (True, True, False, False),
             (False, True, True, False), (True, True, False, True), (False, True, True, True))
    for film, silu, with_add, with_bias in cases:
        x_in = x.float() + add.float()[:, :, None, None] if with_add else x.float()
        if with_bias:
            x_in = x_in + add_bias.float()[None, :, None, None]
        ref = F.group_norm(x_in, 32, weight.float(), bias.float(), 1e-5)
        if film:
            ref = ref * (1 + scale.float()[:, :, None, None]) + shift.float()[:, :, None, None]
        if silu:
            ref = F.silu(ref)
        kw = {"scale": strided_scale if film else None, "shift": strided_shift if film else None,
              "add": add if with_add else None, "eps": 1e-5, "silu": silu, "add_bias": add_bias if with_bias else None,
              "one_pass_mode": one_pass_mode}
        got = cpp_ext.kernels.group_norm(x, 32, weight, bias, **kw)
        again = cpp_ext.kernels.group_norm(x, 32, weight, bias, **kw)
        assert got.dtype == dtype and got.shape == x.shape
        assert got.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
        assert _rel(got.float(), ref) <= tol, (shape, layout, film, silu, _rel(got.float(), ref))
        assert torch.equal(got, again)  # deterministic: no float atomics


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 320, 32, 32), (2, 1280, 8, 8), (3, 64, 6, 10)])
@pytest.mark.parametrize("one_pass_mode", [0, 1])
@pytest.mark.parametrize("resize", ["up", "down"])
def test_fused_group_norm_resized_output_and_residual(shape, one_pass_mode, resize):
    """The up/down ResBlocks' fusions: the norm writing its output nearest-upsampled 2x or 2x2
    average-pooled, and the residual join reading its skip resized the same way, against torch's
    norm/add + F.interpolate / F.avg_pool2d."""
    import torch.nn.functional as F

    def resized(t):
        return F.interpolate(t, scale_factor=2, mode="nearest") if resize == "up" else F.avg_pool2d(t, 2, 2)

    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    b, c, hgt, wid = shape
    x = torch.randn(shape, generator=g, device="cuda").half().to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c, generator=g, device="cuda").half() for _ in range(2))
    add = torch.randn(b, c, generator=g, device="cuda").half()
    ref = resized(F.silu(F.group_norm(x.float() + add.float()[:, :, None, None], 32, weight.float(), bias.float(),
                                      1e-5)))
    flags = {"up": resize == "up", "down": resize == "down"}
    got = cpp_ext.kernels.group_norm(x, 32, weight, bias, None, None, add, 1e-5, True, None, one_pass_mode, **flags)
    assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert _rel(got.float(), ref) <= 4e-3
    out_h, out_w = ref.shape[2:]
    h = torch.randn(b, c, out_h, out_w, generator=g, device="cuda").half().to(memory_format=torch.channels_last)
    joined = h.clone()
    cpp_ext.kernels.bias_residual_(joined, x, bias)
    expect = h.double() + resized(x.double()) + bias.double()[None, :, None, None]
    assert _rel(joined, expect) <= 1e-3
    with pytest.raises(RuntimeError, match="needs channels_last"):
        cpp_ext.kernels.group_norm(x.contiguous(), 32, weight, bias, **flags)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 320, 64, 64), (2, 640, 8, 8), (3, 6, 5, 7), (2, 12, 3, 3)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_bias_residual_matches_torch(shape, layout, dtype):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    h, skip = (torch.randn(shape, generator=g, device="cuda").to(dtype).to(memory_format=fmt) for _ in range(2))
    bias, bias2 = (torch.randn(shape[1], generator=g, device="cuda").to(dtype) for _ in range(2))
    for second in (None, bias2):
        ref = h.double() + skip.double() + bias.double()[None, :, None, None]
        if second is not None:
            ref = ref + second.double()[None, :, None, None]
        got, again = h.clone(), h.clone()
        cpp_ext.kernels.bias_residual_(got, skip, bias, second)
        cpp_ext.kernels.bias_residual_(again, skip, bias, second)
        assert got.is_contiguous(memory_format=fmt)
        assert _rel(got, ref) <= {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        assert torch.equal(got, again)
    other = torch.contiguous_format if layout == "nhwc" else torch.channels_last
    with pytest.raises(RuntimeError, match="contiguous or both channels_last"):
        cpp_ext.kernels.bias_residual_(h.clone(), skip.to(memory_format=other), bias)


@needs_kernel
@pytest.mark.parametrize("stage", ["super_res", "decoder"])
def test_unet_with_the_fused_norm_matches_torch_norms(ours, stage):
    """The decoder and super-res UNets in fp16 give the same outputs with cpp_ext's kernels (group
    norm with the folded convolution bias, the bias + residual join, the attention's token-major
    projection) as with torch's ops (both against the fp32 forward), NCHW and channels-last."""
    import models.layers as layers

    model = copy.deepcopy(ours).cuda()
    half = copy.deepcopy(model).half()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([900, 10]).cuda()
    if stage == "super_res":
        x = torch.randn(2, 6, 64, 64, generator=g).cuda()
        cond: tuple[torch.Tensor, ...] = ()

        def run(m, x_in, *_):
            return m.super_res.first_steps(x_in, t)
    else:
        size, cfg = ours.cfg.decoder.image_size, ours.cfg
        x = torch.randn(2, 3, size, size, generator=g).cuda()
        mask = torch.ones(2, cfg.clip.context_length, dtype=torch.bool)
        mask[1, 5:] = False  # padded text keys: the context bias matters
        embeds = [torch.randn(2, cfg.prior.clip_dim, generator=g).cuda() for _ in range(2)]
        tokens = torch.randn(2, cfg.clip.context_length, cfg.clip.text_width, generator=g).cuda()
        cond = (*embeds, tokens, mask.cuda())

        def run(m, x_in, *c):
            dtype = next(m.parameters()).dtype
            return m.decoder(x_in, t, *(v.to(dtype) if v.is_floating_point() else v for v in c))
    with torch.no_grad():
        ref = run(model, x, *cond)
        fused = run(half, x.half(), *cond).float()
        half.to(memory_format=torch.channels_last)
        fused_cl = run(half, x.half().to(memory_format=torch.channels_last), *cond).float()
        saved = layers.cpp_ext.kernels
        layers.cpp_ext.kernels = None
        try:
            plain = run(half, x.half(), *cond).float()
        finally:
            layers.cpp_ext.kernels = saved
    errors = {"fused": _rel(fused, ref), "fused_cl": _rel(fused_cl, ref), "plain": _rel(plain, ref)}
    print(stage, "fp16 vs fp32:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= 1e-2 for e in errors.values()), errors
    assert _rel(fused, plain) <= 1e-2


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_first_convolution_adds_its_bias_inside_the_gemm(ours, dtype, monkeypatch):
    """`UNet._input_conv` (the bias as the centre tap of an extra input channel of ones, zero
    channels up to a multiple of 8) gives the
    convolution with its bias against float64 within rounding, the whole super-res UNet the same
    as without it (both against fp32), and its widened weight follows changes to the
    convolution's weight and is never made inside a graph capture (the plain block runs then)."""
    import models.unet as unet_module

    unet = copy.deepcopy(ours.super_res.first_steps).cuda()
    ref_unet = copy.deepcopy(unet)
    unet = unet.to(dtype).to(memory_format=torch.channels_last)
    conv = unet.input_blocks[0][0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, conv.in_channels, 64, 64, generator=g).cuda()
    x_in = x.to(dtype).to(memory_format=torch.channels_last)
    got = unet._input_conv(x_in)
    ref = F.conv2d(x_in.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert got is not None and got.is_contiguous(memory_format=torch.channels_last)
    assert _rel(got, ref) <= (2e-3 if dtype == torch.float16 else 1.6e-2), _rel(got, ref)
    assert unet._input_weight.value[0].shape[1] == (conv.in_channels + 1 + 7) // 8 * 8  # ones, zeros to 8s
    assert unet._input_conv(x_in.contiguous()) is None  # NCHW: the plain block
    t = torch.tensor([900, 10]).cuda()
    full = ref_unet(x, t)
    widened = unet(x_in, t).float()
    monkeypatch.setattr(unet_module, "INPUT_BIAS_IN_CONV", False)
    plain = unet(x_in, t).float()
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert _rel(widened, full) <= tol and _rel(plain, full) <= tol and _rel(widened, plain) <= tol
    monkeypatch.setattr(unet_module, "INPUT_BIAS_IN_CONV", True)
    conv.bias.add_(1.0)  # in place: the widened weight is made again
    ref = F.conv2d(x_in.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert _rel(unet._input_conv(x_in), ref) <= (2e-3 if dtype == torch.float16 else 1.6e-2)
    conv.weight.mul_(0.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert unet._input_conv(x_in) is None
        x_in.mul(2.0)


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize(
    "batch,variant", [(1, "all"), (2, "all"), (2, "narrow"), (2, "wide_blocks"), (8, "wide_blocks"), (22, "all"),
                      (2, "no_table"), (8, "all"), (2, "sixteen"), (4, "all"), (2, "register"), (4, "register")]
)
def test_fused_prior_step_matches_the_torch_step(ours, batch, variant, monkeypatch):
    """Prior.step with cpp_ext's attention over the cache (masks built in) gives what the torch
    ops give, in fp16 against the fp32 step, with captions of different lengths; batch 22 (66
    rows) runs cuBLAS's GEMMs, the others `skinny_linear` — "narrow" only for the layers of the
    model's width (the MLP's output projection on cuBLAS), "wide_blocks" at 6 and 24 rows with
    32-feature blocks wherever the layer's features allow (the rest on cuBLAS), "sixteen" with
    16-feature blocks where the model's rule picks 8 (every layer of the tiny model). The time token
    comes from the time table ("no_table": computed per step). On Hopper the layers `staged_plan`
    picks stream their weights through shared memory ("register": `skinny_linear` only)."""
    import models.layers as layers
    import models.prior as prior_module

    if variant == "no_table":
        monkeypatch.setattr(prior_module, "TIME_TABLE", False)
    if variant == "register":
        monkeypatch.setattr(prior_module, "STAGED_WEIGHTS", False)
    if variant == "narrow":
        width, real = ours.cfg.prior.width, prior_module.skinny_block
        monkeypatch.setattr(prior_module, "skinny_block", lambda rows, w, f: real(rows, w, f) if w <= width else None)
    if variant == "sixteen":
        real = prior_module.skinny_block
        monkeypatch.setattr(prior_module, "skinny_block", lambda rows, w, f: None if real(rows, w, f) is None else 16)
    if variant == "wide_blocks":
        monkeypatch.setattr(prior_module, "skinny_block", lambda rows, w, f: 32 if (f % 32, w % 32) == (0, 0) else None)

    model = copy.deepcopy(ours.prior).cuda()
    half = copy.deepcopy(model).half()
    cfg = ours.cfg
    g = torch.Generator().manual_seed(batch)
    embed = torch.randn(batch, cfg.prior.clip_dim, generator=g).cuda()
    tokens = torch.randn(batch, cfg.clip.context_length, cfg.clip.text_width, generator=g).cuda()
    mask = torch.zeros(batch, cfg.clip.context_length, dtype=torch.bool)
    for i in range(batch):
        mask[i, : 4 + (9 * i) % 70] = True  # different caption lengths: the padding mask matters
    mask = mask.cuda()
    x_t = torch.randn(batch, cfg.prior.clip_dim, generator=g).cuda()
    t = torch.tensor([999, 400, 20][:batch] + [500] * (batch - 3)).cuda()
    ref = model.step(x_t, t, model.context_kv(embed, tokens, mask), mask)
    assert torch.allclose(ref, model(x_t, t, embed, tokens, mask), atol=1e-4)
    kv = half.context_kv(embed.half(), tokens.half(), mask)
    fused = half.step(x_t.half(), t, kv, mask).float()
    saved = layers.cpp_ext.kernels
    layers.cpp_ext.kernels = None  # the same module object models.prior reads
    try:
        plain = half.step(x_t.half(), t, kv, mask).float()
    finally:
        layers.cpp_ext.kernels = saved
    errors = {"fused": _rel(fused, ref), "plain": _rel(plain, ref), "fused_vs_plain": _rel(fused, plain)}
    print("prior step fp16:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= 1e-2 for e in errors.values()), errors


SKINNY_SHAPES = [(1, 32, 16), (6, 2048, 6144), (6, 8192, 2048), (24, 2048, 8192), (40, 768, 2048), (64, 96, 48),
                 (6, 256, 16384), (3, 2080, 4128)]


def _skinny_inputs(rows: int, width: int, features: int, dtype: torch.dtype, seed: int,
                   device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """x [rows, width], weight [features, width] (scaled by width^-1/2), bias [features] and an
    output to accumulate into [rows, features], drawn in that order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    weight = torch.randn(features, width, generator=g) / width**0.5
    bias = torch.randn(features, generator=g)
    out = torch.randn(rows, features, generator=g)
    return tuple(t.to(dtype).to(device) for t in (x, weight, bias, out))


@needs_kernel
@pytest.mark.parametrize("rows,width,features", SKINNY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("accumulate", [False, True])
def test_skinny_linear_matches_float64(rows, width, features, dtype, activation, accumulate):
    """act(x·Wᵀ + b) (and out += it) for few rows against float64 torch; repeated runs identical."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * width + activation)
    act = {0: lambda v: v, 1: F.gelu, 2: F.silu}[activation]
    ref = act(x.double() @ weight.double().t() + bias.double())
    if accumulate:
        ref = ref + out.double()
        start = out.clone()
        got = cpp_ext.kernels.skinny_linear(x, weight, bias, activation, out)
        assert got.data_ptr() == out.data_ptr()
        again = cpp_ext.kernels.skinny_linear(x, weight, bias, activation, start)
    else:
        got = cpp_ext.kernels.skinny_linear(x, weight, bias, activation)
        again = cpp_ext.kernels.skinny_linear(x, weight, bias, activation)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert _rel(got, ref) <= tol, _rel(got, ref)
    assert torch.equal(got, again)
    if not accumulate:
        assert torch.equal(cpp_ext.kernels.skinny_linear(x, weight, None, activation),
                           cpp_ext.kernels.skinny_linear(x, weight, None, activation))


@needs_kernel
@pytest.mark.parametrize("rows,width,features", SKINNY_SHAPES)
def test_skinny_linear_with_four_warps_matches_eight(rows, width, features):
    """The 4-warp blocks (a benchmark option) give the 8-warp result within fp16 rounding."""
    g = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, width, generator=g).half().cuda()
    weight = (torch.randn(features, width, generator=g) / width**0.5).half().cuda()
    bias = torch.randn(features, generator=g).half().cuda()
    ref = F.gelu(x.double() @ weight.double().t() + bias.double())
    four = cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 4)
    assert _rel(four, ref) <= 2e-3
    assert _rel(four, cpp_ext.kernels.skinny_linear(x, weight, bias, 1)) <= 2e-3


@needs_kernel
@pytest.mark.parametrize("rows,width,features", [(1, 64, 32), (6, 2048, 96), (13, 160, 64), (24, 2048, 6144),
                                                  (24, 8192, 2048), (32, 4096, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("warps", [4, 8])
def test_skinny_linear_with_32_feature_blocks_matches_float64(rows, width, features, dtype, warps):
    """32 output features per block (two weight tiles per loaded input pack): GELU(x·Wᵀ + b) and
    out += x·Wᵀ + b against float64 torch, repeatable; refused beyond 32 rows or for a feature
    count that is not a multiple of 32."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * 7 + width)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    got = cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, warps, 32)
    ref = F.gelu(x.double() @ weight.double().t() + bias.double())
    assert _rel(got, ref) <= tol, _rel(got, ref)
    assert torch.equal(got, cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, warps, 32))
    ref_acc = out.double() + x.double() @ weight.double().t() + bias.double()
    acc = cpp_ext.kernels.skinny_linear(x, weight, bias, 0, out, warps, 32)
    assert acc.data_ptr() == out.data_ptr() and _rel(acc, ref_acc) <= tol
    with pytest.raises(RuntimeError, match="block_features"):
        cpp_ext.kernels.skinny_linear(torch.zeros(33, width, dtype=dtype, device="cuda"), weight, bias, 0, None, warps,
                                      32)
    with pytest.raises(RuntimeError, match="block_features"):
        cpp_ext.kernels.skinny_linear(x, weight[:16], bias[:16], 0, None, warps, 32)


@needs_kernel
@pytest.mark.parametrize("rows,width,features", SKINNY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_linear_with_8_feature_blocks_matches_float64(rows, width, features, dtype):
    """8 output features per block (the mma's other 8 rows repeat them): GELU(x·Wᵀ + b) and
    out += x·Wᵀ + b against float64 torch, repeatable, and the same bits as 16-feature blocks
    (each feature's sums run in the same order)."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * 5 + width)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    got = cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 8, 8)
    ref = F.gelu(x.double() @ weight.double().t() + bias.double())
    assert _rel(got, ref) <= tol, _rel(got, ref)
    assert torch.equal(got, cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 8, 8))
    assert torch.equal(got, cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 8, 16))
    ref_acc = out.double() + x.double() @ weight.double().t() + bias.double()
    acc = cpp_ext.kernels.skinny_linear(x, weight, bias, 0, out, 8, 8)
    assert acc.data_ptr() == out.data_ptr() and _rel(acc, ref_acc) <= tol


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                  reason="skinny_linear_staged needs a Hopper (sm_90) GPU")
STAGED_SHAPES = [(1, 512, 16), (6, 2048, 6144), (12, 2048, 8192), (3, 8192, 2048), (16, 1024, 96), (6, 8192, 2048),
                 (9, 1536, 64), (24, 2048, 6144), (20, 8192, 2048)]


@needs_kernel
@needs_hopper
@pytest.mark.parametrize("rows,width,features,block,stages",
                         [(*shape, block, stages) for shape in STAGED_SHAPES
                          for block, stages in [(8, 1), (8, 8), (16, 2), (16, 4), (32, 2), (32, 3)]
                          if shape[2] % block == 0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_linear_staged_matches_float64(rows, width, features, block, stages, dtype):
    """The weights through a ring of shared-memory stages (bulk copies, mbarriers): act(x·Wᵀ + b)
    for every activation and out += x·Wᵀ + b against float64 torch, repeated runs identical, from
    one stage (each chunk waits for the one before to be consumed) to more stages than chunks."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * 11 + width + block)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    run = cpp_ext.kernels.skinny_linear_staged
    for activation, act in ((0, lambda v: v), (1, F.gelu), (2, F.silu)):
        ref = act(x.double() @ weight.double().t() + bias.double())
        got = run(x, weight, bias, activation, None, block, stages)
        assert _rel(got, ref) <= tol, (activation, _rel(got, ref))
        assert torch.equal(got, run(x, weight, bias, activation, None, block, stages))
    ref_acc = out.double() + x.double() @ weight.double().t() + bias.double()
    acc = run(x, weight, bias, 0, out, block, stages)
    assert acc.data_ptr() == out.data_ptr() and _rel(acc, ref_acc) <= tol
    no_bias = run(x, weight, None, 0, None, block, stages)
    assert _rel(no_bias, x.double() @ weight.double().t()) <= tol


@needs_kernel
@needs_hopper
def test_skinny_linear_staged_chain_replays_from_a_cuda_graph():
    """Staged linears launched overlapped after one another (the second reading the first's
    output, the third accumulating into the stream), captured and replayed: the eager bits."""
    x, w1, b1, _ = _skinny_inputs(6, 2048, 8192, torch.float16, seed=21)
    _, w2, b2, _ = _skinny_inputs(6, 8192, 2048, torch.float16, seed=22)
    stream_rows = torch.randn(6, 2048, dtype=torch.float16, device="cuda")
    start = stream_rows.clone()
    run = cpp_ext.kernels.skinny_linear_staged

    def chain():
        hidden = run(x, w1, b1, 1, None, 32, 2)
        run(hidden, w2, b2, 0, stream_rows, 16, 4)
        return hidden

    eager_hidden = chain().clone()
    eager = stream_rows.clone()
    stream_rows.copy_(start)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_hidden = chain()
    stream_rows.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_hidden, eager_hidden) and torch.equal(stream_rows, eager)


@needs_kernel
@needs_hopper
def test_skinny_linear_staged_refuses_what_it_cannot_run():
    """Widths not a multiple of 512, more than 24 rows, block sizes other than 8/16/32 or not
    dividing the features, 0 or 9 stages, a ring larger than the GPU's shared memory, mismatched
    tensors: a clear error before any launch."""
    x, w, b, _ = _skinny_inputs(6, 1024, 64, torch.float16, seed=3)
    run = cpp_ext.kernels.skinny_linear_staged
    with pytest.raises(RuntimeError, match="multiple of 512"):
        run(x[:, :256].contiguous(), w[:, :256].contiguous(), b)
    with pytest.raises(RuntimeError, match="24 rows"):
        run(torch.zeros(25, 1024, dtype=torch.float16, device="cuda"), w, b)
    with pytest.raises(RuntimeError, match="block_features"):
        run(x, w, b, 0, None, 24, 2)
    with pytest.raises(RuntimeError, match="block_features"):
        run(x, w[:48].contiguous(), b[:48].contiguous(), 0, None, 32, 2)
    with pytest.raises(RuntimeError, match="stages"):
        run(x, w, b, 0, None, 16, 0)
    with pytest.raises(RuntimeError, match="stages"):
        run(x, w, b, 0, None, 16, 9)
    with pytest.raises(RuntimeError, match="shared memory"):
        run(x, w, b, 0, None, 32, 8)
    with pytest.raises(RuntimeError, match="weight"):
        run(x, w.bfloat16(), b)
    with pytest.raises(RuntimeError, match="out"):
        run(x, w, b, 0, torch.zeros(6, 32, dtype=torch.float16, device="cuda"))


@needs_kernel
@torch.no_grad()
def test_the_prior_time_table_is_not_built_inside_a_graph_capture(ours):
    """A capture that finds no current time table computes the time token in the graph instead
    of building the table there; the replayed step equals the eager step with the table."""
    half = copy.deepcopy(ours.prior).cuda().half()
    cfg = ours.cfg
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(2, cfg.prior.clip_dim, generator=g).cuda().half()
    tokens = torch.randn(2, cfg.clip.context_length, cfg.clip.text_width, generator=g).cuda().half()
    mask = torch.ones(2, cfg.clip.context_length, dtype=torch.bool).cuda()
    x_t = torch.randn(2, cfg.prior.clip_dim, generator=g).cuda().half()
    t = torch.tensor([999, 40]).cuda()
    kv = half.context_kv(embed, tokens, mask)
    half._step_tokens(x_t, t)  # cuBLAS's handle for the time MLP, outside the capture; no table
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert half._time_table() is None
        captured = half.step(x_t, t, kv, mask)
    assert half._time_table_cache.value is None
    graph.replay()
    eager = half.step(x_t, t, kv, mask)  # builds the table
    assert half._time_table() is not None
    assert _rel(captured, eager) <= 2e-3, _rel(captured, eager)


@needs_kernel
def test_skinny_linear_chain_replays_from_a_cuda_graph():
    """The overlapped launches (programmatic dependent launch) of a chain of layer norms and
    skinny linears, captured in a CUDA graph and replayed, give the eager chain's result exactly."""
    g = torch.Generator().manual_seed(5)
    width = 256
    rows = torch.randn(6, width, generator=g).half().cuda()

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).half().cuda()

    layers = [(rand(3 * width, width, scale=1 / 16), rand(3 * width), rand(width, 3 * width, scale=1 / 28), rand(width))
              for _ in range(4)]
    ones, zeros = torch.ones(width).half().cuda(), torch.zeros(width).half().cuda()

    def chain(stream_rows: torch.Tensor) -> None:
        for w1, b1, w2, b2 in layers:
            h = cpp_ext.kernels.residual_layer_norm(stream_rows, None, ones, zeros, 1e-5)
            hidden = cpp_ext.kernels.skinny_linear(h, w1, b1, 1)
            cpp_ext.kernels.skinny_linear(hidden, w2, b2, 0, stream_rows)

    eager = rows.clone()
    chain(eager)
    static = rows.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(static.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(static)
    for _ in range(3):
        static.copy_(rows)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, eager)
    assert not torch.equal(eager, rows)


@needs_kernel
def test_skinny_linear_refuses_what_it_cannot_run():
    """Shapes outside the kernel's reach get a clear error, not a wrong answer."""
    x = torch.randn(65, 64).half().cuda()
    w = torch.randn(32, 64).half().cuda()
    with pytest.raises(RuntimeError, match="1 to 64 rows"):
        cpp_ext.kernels.skinny_linear(x, w)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpp_ext.kernels.skinny_linear(x[:4, :40].contiguous(), w[:, :40].contiguous())
    with pytest.raises(RuntimeError, match="activation"):
        cpp_ext.kernels.skinny_linear(x[:4], w, None, 3)
    square = torch.randn(4, 64).half().cuda()
    with pytest.raises(RuntimeError, match="must not overlap"):
        cpp_ext.kernels.skinny_linear(square, torch.randn(64, 64).half().cuda(), None, 0, square)
    with pytest.raises(RuntimeError, match="warps"):
        cpp_ext.kernels.skinny_linear(x[:4], w, None, 0, None, 6)


def _step_attention_float64(qkv, past, keep, heads):
    """The prior's cached-step attention in float64: each sample's T step tokens attend to the P
    cached keys (padding masked by `keep`) and, causally, to the step tokens."""
    batch, p_len, ch = past.shape[0], past.shape[3], past.shape[4]
    tokens = qkv.shape[0] // batch
    q, k, v = qkv.double().view(batch, tokens, heads, 3, ch).unbind(3)  # [B, T, H, ch] each
    keys = torch.cat([past[:, 0].double(), k.transpose(1, 2)], dim=2)  # [B, H, P + T, ch]
    values = torch.cat([past[:, 1].double(), v.transpose(1, 2)], dim=2)
    visible = torch.ones(batch, tokens, p_len + tokens, dtype=torch.bool, device=qkv.device)
    visible[:, :, : keep.shape[1]] = keep[:, None, :]
    visible[:, :, p_len:] = torch.ones(tokens, tokens, dtype=torch.bool, device=qkv.device).tril()
    scores = q.transpose(1, 2) @ keys.transpose(-1, -2) / ch**0.5  # [B, H, T, P + T]
    weights = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return (weights @ values).transpose(1, 2).reshape(batch * tokens, heads * ch)


@needs_kernel
@pytest.mark.parametrize(
    "batch,tokens,heads,ch,past_len,mask_len",
    [(2, 3, 32, 64, 78, 77), (1, 3, 4, 64, 78, 77), (2, 4, 8, 128, 20, 10), (3, 1, 4, 32, 9, 9), (1, 2, 2, 8, 40, 40),
     (2, 3, 2, 16, 33, 0), (1, 3, 2, 256, 30, 30), (1, 4, 2, 128, 300, 200)],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prior_step_attention_matches_float64(batch, tokens, heads, ch, past_len, mask_len, dtype):
    """The cached-step attention kernel against float64 at every head size it takes (8 to 256),
    1 to 4 step tokens, with caption padding (some samples' keys mostly masked), a strided view
    of the cache as the prior passes it, and a cache long enough to need more than 48 KB of shared
    memory (300 keys of 128); the same bits on a second run."""
    g = torch.Generator(device="cuda").manual_seed(ch + past_len)
    qkv = torch.randn(batch * tokens, heads * 3 * ch, device="cuda", generator=g).to(dtype)
    layers = torch.randn(batch, 3, 2, heads, past_len, ch, device="cuda", generator=g).to(dtype)
    past = layers[:, 1]  # [B, 2, heads, P, ch], strided like the prior's context_kv[:, i]
    keep = torch.rand(batch, mask_len, device="cuda", generator=g) > 0.4
    if mask_len:
        keep[0, 1:] = False  # one sample sees a single cached key
    out = cpp_ext.kernels.prior_step_attention(qkv, past, keep, heads)
    ref = _step_attention_float64(qkv, past, keep, heads)
    tol = 4e-3 if dtype == torch.float16 else 2e-2
    assert out.shape == ref.shape and out.dtype == dtype
    assert float((out.double() - ref).abs().max()) <= tol * float(ref.abs().max())
    assert torch.equal(out, cpp_ext.kernels.prior_step_attention(qkv, past, keep, heads))


@needs_kernel
def test_prior_step_attention_refuses_what_it_cannot_run():
    """Head sizes that are not a power of two from 8 to 256, more than 4 step tokens, or a cache
    longer than one block's shared memory get a clear error."""
    def run(tokens, ch, past_len, heads=2):
        qkv = torch.randn(tokens, heads * 3 * ch, device="cuda").half()
        past = torch.randn(1, 2, heads, past_len, ch, device="cuda").half()
        keep = torch.ones(1, past_len, dtype=torch.bool, device="cuda")
        return cpp_ext.kernels.prior_step_attention(qkv, past, keep, heads)

    with pytest.raises(RuntimeError, match="power of two"):
        run(3, 72, 10)
    with pytest.raises(RuntimeError, match="power of two"):
        run(3, 512, 10)
    with pytest.raises(RuntimeError, match="step tokens"):
        run(5, 64, 10)
    with pytest.raises(RuntimeError, match="shared memory"):
        run(3, 256, 4000)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 320, 320, 32, 32), (1, 640, 320, 64, 64), (2, 256, 256, 32, 32),
                                   (2, 640, 640, 8, 8), (3, 8, 56, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_concat_matches_torch(shape, dtype, silu):
    """The output blocks' norm of cat(h, skip) with the concatenation written by its statistics
    pass (three-pass shapes) or by torch (one-pass shapes): the concatenation exact, the norm
    against float32 torch."""
    b, c1, c2, hgt, wid = shape
    g = torch.Generator().manual_seed(c1 + hgt)
    h = (torch.randn(b, c1, hgt, wid, generator=g) * 2 + 1).to(dtype).cuda().to(memory_format=torch.channels_last)
    skip = torch.randn(b, c2, hgt, wid, generator=g).to(dtype).cuda().to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c1 + c2, generator=g).to(dtype).cuda() for _ in range(2))
    y, cat = cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, silu)
    assert torch.equal(cat, torch.cat([h, skip], dim=1))
    assert cat.is_contiguous(memory_format=torch.channels_last)
    ref = F.group_norm(cat.float(), 32, weight.float(), bias.float(), 1e-5)
    ref = F.silu(ref) if silu else ref
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert _rel(y, ref) <= tol, _rel(y, ref)
    again, _ = cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, silu)
    assert torch.equal(y, again)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 320, 320, 32, 32), (1, 640, 320, 64, 64), (2, 640, 640, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("two_biases", [False, True])
def test_group_norm_concat_adds_the_deferred_biases_to_the_first_part(shape, dtype, two_biases):
    """An output block that left its biases to the next one's concatenation: the concatenation
    holds h + bias (+ bias2), summed in float32 and rounded once (exact against that), in the
    fused pass (three-pass shapes) and in torch's (one-pass shapes); its norm against float32."""
    b, c1, c2, hgt, wid = shape
    g = torch.Generator().manual_seed(c2 + wid)
    h = (torch.randn(b, c1, hgt, wid, generator=g) * 2 + 1).to(dtype).cuda().to(memory_format=torch.channels_last)
    skip = torch.randn(b, c2, hgt, wid, generator=g).to(dtype).cuda().to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c1 + c2, generator=g).to(dtype).cuda() for _ in range(2))
    h_bias = (torch.randn(c1, generator=g) * 3).to(dtype).cuda()
    h_bias2 = torch.randn(c1, generator=g).to(dtype).cuda() if two_biases else None
    y, cat = cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, True, h_bias, h_bias2)
    total = h_bias.float() + (h_bias2.float() if two_biases else 0.0)
    want_h = (h.float() + total.view(1, -1, 1, 1)).to(dtype)
    assert torch.equal(cat, torch.cat([want_h, skip], dim=1))
    from models.unet import SkipConcat
    assert torch.equal(SkipConcat(h, skip, h_bias, h_bias2).tensor(), cat)  # the torch fallback agrees
    ref = F.silu(F.group_norm(cat.float(), 32, weight.float(), bias.float(), 1e-5))
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert _rel(y, ref) <= tol, _rel(y, ref)
    with pytest.raises(RuntimeError, match="first_bias"):
        cpp_ext.kernels.group_norm_concat(h, skip, 32, weight, bias, 1e-5, True, h_bias[:-8], None)


@needs_kernel
def test_output_blocks_defer_their_biases_to_the_next_concatenation():
    """A UNet on the fused path: each output block whose result goes straight into the next one's
    concatenation hands a `DeferredBias` on (its skip convolution accumulated into the last
    convolution's output by one GEMM); the forward is repeatable and matches the one whose blocks
    join their residuals themselves (≤ 4e-3) and float32 (≤ 1e-2, as the stages' fp16 forwards)."""
    from models import unet as unet_module

    cfg = UNetConfig(image_size=64, in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2),
                     num_res_blocks=2)
    torch.manual_seed(0)
    net = unet_module.UNet(cfg).cuda().eval()
    for name, p in net.named_parameters():  # zero-initialised layers and biases would hide the joins
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.1)
        elif p.dim() > 1:  # convolutions and linears; the norms keep weight 1
            torch.nn.init.normal_(p, std=0.03)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    t = torch.tensor([10, 900], device="cuda")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    real_fused, real_sequential = unet_module.ResBlock._forward_fused, unet_module.TimestepSequential.forward
    seen = []

    def spy(self, *args, **kwargs):
        out = real_fused(self, *args, **kwargs)
        seen.append(isinstance(out, unet_module.DeferredBias))
        return out

    try:
        with torch.no_grad():
            ref = net(x, t).float()
            half = net.half().to(memory_format=torch.channels_last)
            xh = x.half().to(memory_format=torch.channels_last)
            unet_module.ResBlock._forward_fused = spy
            deferred = half(xh, t)
            unet_module.ResBlock._forward_fused = real_fused
            again = half(xh, t)
            unet_module.TimestepSequential.forward = (
                lambda self, *a, defer_bias=False, **k: real_sequential(self, *a, **k))
            plain = half(xh, t)
    finally:
        unet_module.ResBlock._forward_fused, unet_module.TimestepSequential.forward = real_fused, real_sequential
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert sum(seen) == sum(len(block) == 1 for block in net.output_blocks[:-1]) >= 3
    assert torch.equal(deferred, again)
    assert _rel(deferred.float(), ref) <= 1e-2 and _rel(plain.float(), ref) <= 1e-2
    assert _rel(deferred.float(), plain.float()) <= 4e-3


@needs_kernel
def test_pack_attention_kv_puts_the_kept_context_tokens_first():
    """The decoder attention's key/value pack: image keys/values straight from the projection,
    then the context tokens with the kept ones first (in order), and the used-key counts — exact."""
    b, hw, heads, ch, n = 3, 20, 4, 16, 9
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b * hw, heads * 3 * ch, generator=g).half().cuda()
    context = torch.randn(b, 2, heads + 2, n, ch, generator=g).half().cuda()[:, :, 1 : heads + 1]  # strided
    keep = torch.rand(b, n, generator=g) < 0.5
    keep[0], keep[2] = True, False
    keep = keep.cuda()
    kv, used = cpp_ext.kernels.pack_attention_kv(qkv, context, keep)
    assert kv.shape == (b, hw + n, heads, 2, ch) and used.dtype == torch.int32
    for i in range(b):
        order = torch.cat([keep[i].nonzero()[:, 0], (~keep[i]).nonzero()[:, 0]])
        assert torch.equal(kv[i, :hw], qkv.view(b, hw, heads, 3, ch)[i, :, :, 1:])
        assert torch.equal(kv[i, hw:], context[i].permute(2, 1, 0, 3)[order])
    assert used.tolist() == (hw + keep.sum(1)).tolist()


@needs_kernel
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 640, 32, 32), (3, 128, 8, 8), (3, 64, 5, 7)])
def test_varlen_flash_attention_block_matches_sdpa(dtype, shape):
    """An attention block with context through flash attention's varlen form (cpp_ext's pack,
    padding left out by key counts) against SDPA with the additive mask, both against fp32 — with
    a mask that is not a prefix, a sample that keeps every context token and one that keeps none,
    given the context or the packed context keys/values."""
    import models.layers as layers
    from models.unet import _FLASH_VARLEN, AttentionBlock

    if not _FLASH_VARLEN:
        pytest.skip("this torch has no flash attention varlen form with seqused_k")
    b, c, hgt, wid = shape
    n, width = 81, 96
    g = torch.Generator().manual_seed(c)
    block = AttentionBlock(c, 64, width)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p is block.norm.weight else 0.0)
    block = block.cuda()
    x = torch.randn(shape, generator=g).cuda()
    context = torch.randn(b, n, width, generator=g).cuda()
    keep = torch.rand(b, n, generator=g) < 0.6
    keep[0] = True
    keep[-1] = False
    bias = torch.zeros(b, n).masked_fill(~keep, float("-inf")).cuda()
    ref = block(x, context, bias).double()
    half = copy.deepcopy(block).to(dtype)
    xh = x.to(dtype).to(memory_format=torch.channels_last)
    packed = torch.stack(half.context_kv(context.to(dtype)), dim=1)
    fused = half(xh, context.to(dtype), bias).double()
    fused_kv = half(xh, None, bias, packed).double()
    saved = layers.cpp_ext.kernels
    layers.cpp_ext.kernels = None
    try:
        plain = half(xh, context.to(dtype), bias).double()
    finally:
        layers.cpp_ext.kernels = saved
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    errors = {"fused": _rel(fused, ref), "fused_kv": _rel(fused_kv, ref), "plain": _rel(plain, ref),
              "fused_vs_plain": _rel(fused, plain)}
    print(shape, dtype, {k: f"{v:.1e}" for k, v in errors.items()})
    assert all(e <= tol for e in errors.values()), errors
    assert torch.equal(fused, fused_kv)


@needs_kernel
@pytest.mark.parametrize("width", [8, 96, 2048, 2056, 8192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_pending", [False, True])
def test_residual_layer_norm_matches_torch(width, dtype, with_pending):
    """The prior's layer norm with the pending bias folded in: x += bias in place (as torch's
    add rounds it), then the float32 layer norm — against torch in float32."""
    g = torch.Generator().manual_seed(width)
    x = (torch.randn(6, width, generator=g) * 3 + 1).to(dtype).cuda()
    weight, beta, pending = (torch.randn(width, generator=g).to(dtype).cuda() for _ in range(3))
    expected_x = x + pending if with_pending else x.clone()
    ref = F.layer_norm(expected_x.float(), (width,), weight.float(), beta.float(), 1e-5)
    y = cpp_ext.kernels.residual_layer_norm(x, pending if with_pending else None, weight, beta, 1e-5)
    assert torch.equal(x, expected_x)
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    assert _rel(y, ref) <= tol, _rel(y, ref)
    assert torch.equal(y, cpp_ext.kernels.residual_layer_norm(x.clone(), None, weight, beta, 1e-5))
