"""The fused path's orchestration (`models.fused`) on the CPU, with `cpp_ext`'s kernels emulated
in torch ops (`tests/kernel_emulation.py`): it must give the reference modules' outputs, with each
of its fusions on or off, and it must actually take the routes it claims (concatenation in the
norm, statistics handed from a join to the next norm, deferred biases, the widened input
convolution, the up blocks' folded convolutions, the time table, the skinny and staged linears).
The kernels themselves are checked against float64 on the GPU (`tests/gpu/`)."""

from __future__ import annotations

import pytest
import torch

import cpp_ext
from models import fused
from models.configs import PriorConfig, UNetConfig
from models.fused import FusedOptions, availability, linear_plan
from models.fused.derived import derived
from models.prior import Prior
from models.unet import ResBlock, UNet
from tests import kernel_emulation

DECODER_LIKE = UNetConfig(image_size=16, in_channels=3, out_channels=6, model_channels=64, channel_mult=(1, 2),
                          num_res_blocks=1, attention_ds=(2,), num_head_channels=32, use_scale_shift_norm=True,
                          middle_attention=True, context_width=48)
# a width of 512s, so that the staged linears' rule can take it
SMALL_PRIOR = PriorConfig(width=512, layers=2, heads=8, clip_dim=64, text_width=64)
SUPER_RES_LIKE = UNetConfig(image_size=32, in_channels=6, out_channels=3, model_channels=64, channel_mult=(1, 2, 2),
                            num_res_blocks=2)


@pytest.fixture
def emulated(monkeypatch):
    """`cpp_ext.kernels` emulated, serving float32/float64 CPU tensors; yields the call counts."""
    monkeypatch.setattr(cpp_ext, "kernels", kernel_emulation)
    monkeypatch.setattr(availability, "device_serves", lambda x: x.dtype in (torch.float32, torch.float64))
    kernel_emulation.calls.clear()
    return kernel_emulation.calls


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random: zero-initialised layers and biases would hide a lost one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.1 if name.endswith("bias") or p.dim() == 1 else 1.0 / max(1, p[0].numel()) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def _unet_inputs(cfg: UNetConfig, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([7, 930, 415, 2][:batch])
    kw = {}
    if cfg.context_width:
        kw["emb_add"] = torch.randn(batch, cfg.time_embed_dim, generator=g) * 0.1
        kw["context"] = torch.randn(batch, 9, cfg.context_width, generator=g)
        bias = torch.zeros(batch, 9)
        bias[0, 5:] = float("-inf")  # padded context keys: the mask matters
        kw["context_bias"] = bias
    return x, t, kw


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
@pytest.mark.parametrize("cfg", [DECODER_LIKE, SUPER_RES_LIKE], ids=["decoder_like", "super_res_like"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_the_fused_unet_gives_the_reference_output(emulated, cfg, layout):
    unet = _randomised(UNet(cfg), 0)
    x, t, kw = _unet_inputs(cfg)
    ref = unet(x, t, **kw)
    if layout == "channels_last":
        unet = unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    got = fused.unet_forward(unet, x, t, **kw)
    assert _rel(got, ref) <= 1e-5, _rel(got, ref)
    assert emulated["group_norm"] > 0 and emulated["bias_residual_"] + emulated["bias_residual_stats"] > 0
    assert derived(unet, "time_table").value is not None  # the time embedding was looked up
    if layout == "channels_last":  # the routes that need channels-last maps were taken
        assert emulated["group_norm_concat"] > 0
        assert emulated["bias_residual_stats"] > 0 and emulated["group_norm_partial"] > 0
        assert derived(unet, "input_conv").value is not None
    else:
        assert emulated["group_norm_concat"] == emulated["bias_residual_stats"] == 0


def _fp8_without_rounding(monkeypatch) -> None:
    """FP8 layers made and run with e4m3's rounding switched off (quantise = divide by the scale,
    products read back in float32): the same operations, exact, for comparing two paths."""
    from models.fp8 import layers as fp8_layers

    monkeypatch.setattr(fp8_layers, "quantize", lambda x, scale: x.float() / scale)
    monkeypatch.setattr(fp8_layers, "dequantize", lambda q, scale, dtype: (q.float() * scale).to(dtype))
    monkeypatch.setattr(fp8_layers, "channel_scales", lambda w: w.detach().abs().flatten(1).amax(1) / 448)
    monkeypatch.setitem(fp8_layers._SCALED_MM_WORKS, ("cpu", torch.float32), False)  # products read back


@torch.no_grad()
@pytest.mark.parametrize("skips_in_fp8", [True, False], ids=["fp8_skips", "skips_in_dtype"])
@pytest.mark.parametrize("cfg", [DECODER_LIKE, SUPER_RES_LIKE], ids=["decoder_like", "super_res_like"])
def test_the_fused_unet_runs_fp8_layers_with_the_reference_products(emulated, cfg, skips_in_fp8, monkeypatch,
                                                                    unbiased_fp8_calls):
    """A UNet holding FP8 layers (`models.fp8`; residual 3×3 convolutions, 1×1 skips unless
    `policy.SKIP_CONVS` keeps them in dtype, attention projections) takes the fused path, each
    layer running its own product — bias-free where a fused join adds the bias — and gives the
    reference forward's output. The e4m3 rounding is switched off here (quantise = divide by the
    scale) so that the comparison is exact: with it, any fp32 rounding difference moves values
    across e4m3 steps, noise that would hide a lost bias (the GPU test compares errors against
    fp16 instead)."""
    from models.fp8 import layers as fp8_layers
    from models.fp8 import policy
    from models.fp8.policy import _eligible

    _fp8_without_rounding(monkeypatch)
    monkeypatch.setattr(policy, "SKIP_CONVS", skips_in_fp8)
    unet = _randomised(UNet(cfg), 0)
    x, t, kw = _unet_inputs(cfg)
    for name, module in list(unet.named_modules()):
        if _eligible("decoder.unet", name, module):  # the layers `models.fp8.convert` turns into FP8
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, fp8_layers.Fp8Conv.from_float(module))
    ref = unet(x, t, **kw)
    unet = unet.to(memory_format=torch.channels_last)
    got = fused.unet_forward(unet, x.contiguous(memory_format=torch.channels_last), t, **kw)
    assert _rel(got, ref) <= 1e-5, _rel(got, ref)
    assert emulated["group_norm"] > 0 and emulated["group_norm_concat"] > 0  # the fused blocks ran
    convs = [m for m in unet.modules() if isinstance(m, fp8_layers.Fp8Conv) and m.weight_q.dim() == 4]
    assert {id(m) for m in convs} <= {id(m) for m in unbiased_fp8_calls}  # every residual/skip conv ran bias-free
    if cfg.attention_ds:
        assert any(m.weight_q.dim() == 3 for m in unbiased_fp8_calls)  # the attention's output projection
    skips = [m.skip_connection for m in unet.modules() if isinstance(m, ResBlock)
             and not isinstance(m.skip_connection, torch.nn.Identity)]
    assert skips and all(isinstance(m, fp8_layers.Fp8Conv) == skips_in_fp8 for m in skips)


@torch.no_grad()
def test_the_packed_context_keys_give_the_projected_context(emulated):
    """The decoder step's form: context keys/values computed once (`UNet.context_kv`) and read per
    block from the packed tensor, as the reference projecting the context in every block."""
    unet = _randomised(UNet(DECODER_LIKE), 3).to(memory_format=torch.channels_last)
    x, t, kw = _unet_inputs(DECODER_LIKE)
    ref = unet(x, t, **kw)
    kv = unet.context_kv(kw.pop("context"))
    got = fused.unet_forward(unet, x.contiguous(memory_format=torch.channels_last), t, context_kv=kv, **kw)
    assert _rel(got, ref) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("switch", ["join_stats", "defer_bias", "input_bias_in_conv", "unet_time_table",
                                    "fold_upsampling"])
def test_each_unet_fusion_switched_off_gives_the_same_output(emulated, switch):
    unet = _randomised(UNet(SUPER_RES_LIKE), 1).to(memory_format=torch.channels_last)
    x, t, _ = _unet_inputs(SUPER_RES_LIKE)
    x = x.contiguous(memory_format=torch.channels_last)
    on = fused.unet_forward(unet, x, t)
    counts_on = dict(emulated)
    emulated.clear()
    off = fused.unet_forward(unet, x, t, options=FusedOptions(**{switch: False}))
    assert _rel(off, on) <= 1e-5
    if switch == "join_stats":
        assert counts_on["bias_residual_stats"] > 0 and emulated["bias_residual_stats"] == 0
    if switch == "defer_bias":  # deferred joins ran no join pass of their own
        assert emulated["bias_residual_"] + emulated["bias_residual_stats"] > (
            counts_on["bias_residual_"] + counts_on["bias_residual_stats"])


@torch.no_grad()
@pytest.mark.parametrize("cutlass_convs", [True, False])
def test_the_fused_unet_with_folded_up_convolutions_gives_the_reference_output(emulated, cutlass_convs):
    unet = _randomised(UNet(SUPER_RES_LIKE), 2)
    x, t, _ = _unet_inputs(SUPER_RES_LIKE)
    ref = unet(x, t)
    unet = unet.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    for interleave_in_norm in (True, False):
        emulated.clear()
        options = FusedOptions(fold_upsampling=True, cutlass_convs=cutlass_convs, interleave_in_norm=interleave_in_norm)
        got = fused.unet_forward(unet, x, t, options=options)
        assert _rel(got, ref) <= 1e-5, _rel(got, ref)
        assert emulated["group_norm_phased"] == (2 if interleave_in_norm else 0)  # each up block's second norm
    ups = [m for m in unet.modules() if isinstance(m, ResBlock) and m.up]
    assert len(ups) == 2
    assert all(derived(m.in_layers[2], "folded_weights").value is not None for m in ups)  # the route was taken
    assert _rel(fused.unet_forward(unet, x, t, options=FusedOptions(fold_upsampling=False)), ref) <= 1e-5


@torch.no_grad()
def test_the_unet_time_table_holds_every_timesteps_embedding_and_follows_the_weights(emulated):
    """`unet_forward.time_table` holds `time_embedding(t)` for every training timestep, is kept
    while the time MLP stays as it is and rebuilt when it changes; fractional timesteps, which have
    no row, run the time MLP and still give the reference output."""
    from models.fused.unet_forward import time_table

    unet = _randomised(UNet(DECODER_LIKE), 3)
    table = time_table(unet)
    steps = DECODER_LIKE.diffusion.num_train_timesteps
    assert table.shape == (steps, DECODER_LIKE.time_embed_dim)
    t = torch.tensor([0, 1, 420, steps - 1])
    torch.testing.assert_close(table[t], unet.time_embedding(t), rtol=1e-5, atol=1e-6)
    assert time_table(unet) is table
    unet.time_embed[2].bias.add_(1.0)
    changed = time_table(unet)
    assert changed is not table
    torch.testing.assert_close(changed[t], unet.time_embedding(t), rtol=1e-5, atol=1e-6)
    x, _, kw = _unet_inputs(DECODER_LIKE)
    fractional = torch.tensor([7.5, 930.25])
    got = fused.unet_forward(unet, x, fractional, **kw)
    assert _rel(got, unet(x, fractional, **kw)) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("cfg", [DECODER_LIKE, SUPER_RES_LIKE], ids=["decoder_like", "super_res_like"])
def test_a_loops_projections_made_at_once_give_each_steps_forward(emulated, cfg):
    """`loop_projections` makes every step's ResBlock projections in one product; a forward given
    step i's gives the forward that makes its own at timesteps[i] (to float32 rounding), and
    reads no time embedding of its own."""
    from models.fused.unet_forward import loop_projections

    unet = _randomised(UNet(cfg), 5).to(memory_format=torch.channels_last)
    x, _, kw = _unet_inputs(cfg)
    x = x.contiguous(memory_format=torch.channels_last)
    timesteps = torch.tensor([999, 958, 500, 41, 0])
    steps = loop_projections(unet, timesteps, x.shape[0], kw.get("emb_add"))
    assert steps is not None and len(steps) == len(timesteps)
    for i in (0, 2, 4):
        t = timesteps[i].expand(x.shape[0])
        want = fused.unet_forward(unet, x, t, **kw)
        got = fused.unet_forward(unet, x, torch.full_like(t, 123), **kw, projections=steps[i])  # t unread
        assert _rel(got, want) <= 1e-5, (i, _rel(got, want))
    assert loop_projections(unet, timesteps, 2, kw.get("emb_add"), FusedOptions(loop_projections=False)) is None
    assert loop_projections(unet, timesteps.float() + 0.5, 2, kw.get("emb_add")) is None


def test_the_runtime_loops_make_their_unets_projections_once_per_loop(emulated, monkeypatch):
    """The decoder's and the super-res stage's loops run their steps from `loop_projections` (one
    call per loop, one entry per step), and the images are those of steps making their own."""
    from runtime import UnCLIP
    from runtime.backends import signatures

    made = []
    real = signatures.fused.loop_projections

    def spy(unet, timesteps, *args, **kwargs):
        steps = real(unet, timesteps, *args, **kwargs)
        made.append((len(timesteps), None if steps is None else len(steps)))
        return steps

    monkeypatch.setattr(signatures.fused, "loop_projections", spy)
    kw = {"seed": 5, "output_type": "pt", "prior_steps": 3, "decoder_steps": 4, "super_res_steps": 3}
    got = UnCLIP(progress=False).generate("a green square", **kw).images
    assert (4, 4) in made and (3, 3) in made, made  # the decoder's loop; the super-res stage's first steps
    assert all(n == steps for n, steps in made), made  # every loop prepared, none fell back
    want = UnCLIP(progress=False, fused=FusedOptions(loop_projections=False)).generate("a green square", **kw).images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_fused_unet_leaves_the_reference_alone_without_kernels(monkeypatch):
    """Without `cpp_ext` (or on the CPU) `unet_forward` is the module's forward, bit for bit."""
    monkeypatch.setattr(cpp_ext, "kernels", None)
    unet = _randomised(UNet(DECODER_LIKE), 2)
    x, t, kw = _unet_inputs(DECODER_LIKE)
    with torch.no_grad():
        assert torch.equal(fused.unet_forward(unet, x, t, **kw), unet(x, t, **kw))


def _prior_inputs(prior, batch: int):
    g = torch.Generator().manual_seed(batch)
    cfg = prior.cfg
    lengths = torch.randint(2, cfg.text_ctx + 1, (batch,), generator=g)
    mask = torch.arange(cfg.text_ctx)[None] < lengths[:, None]
    embed = torch.randn(batch, cfg.clip_dim, generator=g)
    tokens = torch.randn(batch, cfg.text_ctx, cfg.text_width, generator=g)
    x_t = torch.randn(batch, cfg.clip_dim, generator=g)
    t = torch.randint(0, cfg.diffusion.num_train_timesteps, (batch,), generator=g)
    return x_t, t, prior.context_kv(embed, tokens, mask), mask


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("variant", ["default", "staged", "no_time_table", "cublas", "float_timesteps"])
def test_the_fused_prior_step_gives_the_reference_step(emulated, monkeypatch, batch, variant):
    prior = _randomised(Prior(SMALL_PRIOR), 4)
    x_t, t, kv, mask = _prior_inputs(prior, batch)
    options = FusedOptions()
    if variant == "staged":  # as on Hopper: weights streamed through shared memory
        monkeypatch.setattr(linear_plan, "staged_capable", lambda: True)
    elif variant == "no_time_table":
        options = FusedOptions(time_table=False)
    elif variant == "cublas":
        monkeypatch.setattr(linear_plan, "skinny_block", lambda *plan: None)
    elif variant == "float_timesteps":
        t = t.float() + 0.5  # no table row for these: the time MLP runs
    ref = prior.step(x_t, t, kv, mask)
    got = fused.prior_step(prior, x_t, t, kv, mask, options)
    assert _rel(got, ref) <= 1e-5, _rel(got, ref)
    layers = prior.cfg.layers
    assert emulated["prior_step_attention"] == layers and emulated["residual_layer_norm"] >= 2 * layers
    skinny, staged = emulated["skinny_linear"], emulated["skinny_linear_staged"]
    if variant == "staged":
        assert staged >= 4 * layers
    elif variant == "cublas":
        assert staged == 0 and skinny <= 2  # the image token and the output projection only
    else:
        assert skinny >= 4 * layers and staged == 0


def test_the_runtime_stages_run_the_fused_path_end_to_end(emulated):
    """The runtime's step stages (`runtime.backends.signatures`) call the fused path: with the kernels
    emulated, the default model's images are the reference's to float32 rounding, and the
    kernels were called."""
    from runtime import UnCLIP
    from tests.metrics import psnr

    model = UnCLIP(progress=False)
    kw = {"seed": 3, "output_type": "pt", "prior_steps": 4, "decoder_steps": 4, "super_res_steps": 3}
    got = model.generate("a red circle on a blue background", **kw).images
    assert emulated["prior_step_attention"] > 0 and emulated["group_norm"] > 0
    cpp_ext.kernels = None  # restored by the fixture's monkeypatch
    want = model.generate("a red circle on a blue background", **kw).images
    assert psnr(got[0], want[0]) >= 80.0, psnr(got[0], want[0])


def test_an_fp8_pipeline_runs_its_unets_on_the_fused_path(emulated, monkeypatch, unbiased_fp8_calls):
    """`UnCLIP(precision="fp8")` with the kernels emulated: its super-res UNet's FP8 layers run inside
    the fused blocks, and the images are the reference path's with the same FP8 layers (e4m3
    rounding switched off, as above, so that the comparison is to float32 rounding)."""
    from runtime import UnCLIP
    from tests.metrics import psnr

    _fp8_without_rounding(monkeypatch)
    pipe = UnCLIP(progress=False, precision="fp8", fp8_scales="dynamic")
    kw = {"seed": 3, "output_type": "pt", "prior_steps": 4, "decoder_steps": 4, "super_res_steps": 3}
    got = pipe.generate("a red circle on a blue background", **kw).images
    assert unbiased_fp8_calls and emulated["group_norm"] > 0
    cpp_ext.kernels = None  # the reference forward, restored by the fixture's monkeypatch
    want = pipe.generate("a red circle on a blue background", **kw).images
    assert psnr(got[0], want[0]) >= 80.0, psnr(got[0], want[0])


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k):
    """Flash attention's variable-length op in torch: each sample's query run over its key run."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[int(s[b]):int(s[b + 1])].transpose(0, 1) for t, s in ((q, cu_q), (k, cu_k), (v, cu_k)))
        assert ks.shape[1] <= max_k and qs.shape[1] <= max_q
        attended = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
        out[int(cu_q[b]):int(cu_q[b + 1])] = attended.transpose(0, 1)
    return out


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 2])
def test_context_keys_laid_out_around_the_image_rows_give_the_reference_attention(emulated, monkeypatch, batch,
                                                                                   keys_around_made):
    """`FusedOptions(keys_around_images=True)`: the decoder's attention blocks over context keys laid
    out around the QKV projection's image rows (`models.fused.keys_around`; flash attention's
    variable-length op emulated by per-run SDPA) give the reference UNet's output, with a mask that
    keeps no prefix; the layouts are made once per context cache and again after it changes in place."""
    from models.fused import keys_around, unet_blocks

    monkeypatch.setattr(unet_blocks, "_flash_varlen_serves", lambda qkv, ch: True)
    monkeypatch.setattr(keys_around, "varlen_attention", _varlen_reference)
    made = keys_around_made
    unet = _randomised(UNet(DECODER_LIKE), 4).to(memory_format=torch.channels_last)
    x, t, kw = _unet_inputs(DECODER_LIKE, batch)
    bias = torch.zeros(batch, 9)
    bias[0, [1, 4, 5, 8]] = float("-inf")  # kept tokens 0, 2, 3, 6, 7: not a prefix
    kw["context_bias"] = bias
    ref = unet(x, t, **kw)
    kv = unet.context_kv(kw.pop("context"))
    x = x.contiguous(memory_format=torch.channels_last)
    options = FusedOptions(keys_around_images=True)
    attention_blocks = sum(isinstance(m, unet_blocks.AttentionBlock) for m in unet.modules())
    for _ in range(2):  # the second forward of the loop reuses the layouts
        got = fused.unet_forward(unet, x, t, context_kv=kv, options=options, **kw)
        assert _rel(got, ref) <= 1e-5, _rel(got, ref)
    assert len(made) == attention_blocks > 0
    kv.mul_(1.0)  # changed in place: the layouts are made again
    assert _rel(fused.unet_forward(unet, x, t, context_kv=kv, options=options, **kw), ref) <= 1e-5
    assert len(made) == 2 * attention_blocks
