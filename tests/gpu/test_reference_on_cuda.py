"""The reference path on CUDA: same images as on the CPU for the same seed (fp32, TF32 off),
and fp16/bf16 networks run end to end with finite outputs. Skipped without a CUDA GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from runtime import UnCLIP

pytestmark = pytest.mark.gpu
STEPS = {"prior_steps": 6, "decoder_steps": 5, "super_res_steps": 3}


def test_cuda_fp32_matches_cpu_for_the_same_seed(ours, no_tf32):
    prompts = ["a red circle on a blue background", "a green square"]
    kw = {"num_images_per_prompt": 2, "seed": 5, "output_type": "np", **STEPS}
    cpu = UnCLIP(copy.deepcopy(ours), device="cpu", progress=False).generate(prompts, **kw).images
    gpu = UnCLIP(copy.deepcopy(ours), device="cuda", progress=False).generate(prompts, **kw).images
    err = np.abs(cpu - gpu)
    # Different kernels round differently; see test_parity_diffusers for why a few pixels may not.
    assert (err <= 1e-3).mean() >= 0.999 and float(np.median(err)) <= 1e-5


def test_noise_for_a_gpu_run_is_drawn_into_page_locked_memory_with_the_cpu_values(ours):
    """A CUDA pipeline draws its noise straight into pinned memory (uploads without a staging
    copy): the values a CPU pipeline draws for the seed; a chunk's rows are copies (not pinned,
    uploaded through a staging buffer), all rows the tensors themselves; uploads give the values."""
    drawn = {}
    for device in ("cuda", "cpu"):
        pipe = UnCLIP(copy.deepcopy(ours), device=device, progress=False)
        drawn[device] = pipe.draw_noise(3, 4, 3, 2, torch.Generator().manual_seed(7))
    stages = [(drawn["cuda"].prior, drawn["cpu"].prior), (drawn["cuda"].decoder, drawn["cpu"].decoder),
              *zip(drawn["cuda"].super_res, drawn["cpu"].super_res, strict=True)]  # one per super-res stage
    assert len(stages) == 2 + len(ours.cfg.super_res)
    for pinned, plain in stages:
        assert pinned.pinned and pinned.init.is_pinned() and pinned.steps.is_pinned()
        assert not plain.pinned and not plain.steps.is_pinned()
        assert torch.equal(pinned.init, plain.init) and torch.equal(pinned.steps, plain.steps)
        assert pinned.rows(0, 3).pinned and not pinned.rows(1, 2).pinned
        whole, part = pinned.to("cuda"), pinned.rows(1, 2).to("cuda")
        assert torch.equal(whole.steps.cpu(), plain.steps) and torch.equal(whole.init.cpu(), plain.init)
        assert torch.equal(part.steps.cpu(), plain.steps[:, 1:2]) and torch.equal(part.init.cpu(), plain.init[1:2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_networks_run_end_to_end(ours, dtype):
    pipe = UnCLIP(copy.deepcopy(ours), device="cuda", dtype=dtype, progress=False)
    out = pipe.generate("a red circle", seed=0, output_type="pt", return_image_embeds=True, **STEPS)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert torch.isfinite(out.image_embeds).all()


@pytest.mark.slow
@pytest.mark.usefixtures("large_gpu_memory")
def test_karlo_sized_stages_match_diffusers(no_tf32):
    """At Karlo's real shapes (random weights), each converted stage matches diffusers' forward."""
    import torch.nn.functional as F

    from models.checkpoint import load_strict
    from models.configs import KARLO
    from models.convert.diffusers_unet import prior_from_diffusers, text_proj_from_diffusers, unet_from_diffusers
    from models.decoder import Decoder
    from models.prior import Prior
    from models.super_res import SuperRes
    from tests.diffusers_reference import (
        build_decoder,
        build_prior,
        build_super_res,
        build_text_proj,
        max_rel_err,
    )

    dev, g = "cuda", torch.Generator().manual_seed(0)
    b, d = 2, KARLO.clip.embed_dim
    embed, tokens = torch.randn(b, d, generator=g).to(dev), torch.randn(b, 77, 768, generator=g).to(dev)
    mask = torch.zeros(b, 77, dtype=torch.bool, device=dev)
    mask[0, :9], mask[1, :77] = True, True
    ts = torch.tensor([999, 420], device=dev)

    def ours_from(module_cls, args, state):
        with torch.device("meta"):
            m = module_cls(*args)
        load_strict(m, state, module_cls.__name__)
        if isinstance(m, Prior):
            m.causal_bias = torch.full((81, 81), float("-inf")).triu_(1)
        return m.to(dev).eval()

    with torch.no_grad():
        ref = build_prior(KARLO, 1).to(dev)
        prior = ours_from(Prior, (KARLO.prior,), prior_from_diffusers(ref.state_dict(), KARLO.prior))
        x = torch.randn(b, d, generator=g).to(dev)
        want = ref(x, timestep=ts, proj_embedding=embed, encoder_hidden_states=tokens,
                   attention_mask=mask).predicted_image_embedding
        assert max_rel_err(prior(x, ts, embed, tokens, mask), want) <= 1e-4
        del ref, prior

        ref_unet, ref_proj = build_decoder(KARLO, 2).to(dev), build_text_proj(KARLO, 3).to(dev)
        state = {f"unet.{k}": v for k, v in unet_from_diffusers(ref_unet.state_dict(), KARLO.decoder).items()}
        state.update({f"text_proj.{k}": v for k, v in text_proj_from_diffusers(ref_proj.state_dict()).items()})
        decoder = ours_from(Decoder, (KARLO.decoder, KARLO.text_proj), state)
        img = torch.randn(b, d, generator=g).to(dev)
        xs = torch.randn(b, 3, 64, 64, generator=g).to(dev)
        hidden, add = ref_proj(image_embeddings=img, prompt_embeds=embed, text_encoder_hidden_states=tokens,
                               do_classifier_free_guidance=False)
        want = ref_unet(sample=xs, timestep=ts, encoder_hidden_states=hidden, class_labels=add,
                        attention_mask=F.pad(mask, (4, 0), value=True)).sample
        assert max_rel_err(decoder(xs, ts, img, embed, tokens, mask), want) <= 1e-4
        del ref_unet, ref_proj, decoder

        ref_sr = build_super_res(KARLO, 4).to(dev)
        sr_state = unet_from_diffusers(ref_sr.state_dict(), KARLO.super_res[0].unet)
        state = {f"{p}.{k}": v for p in ("first_steps", "last_step") for k, v in sr_state.items()}
        sr = ours_from(SuperRes, (KARLO.super_res[0],), state)
        xl, low = torch.randn(1, 3, 256, 256, generator=g).to(dev), torch.randn(1, 3, 256, 256, generator=g).to(dev)
        want = ref_sr(sample=torch.cat([xl, low], 1), timestep=ts[:1]).sample
        assert max_rel_err(sr(xl, ts[:1], low, last=False), want) <= 1e-4


def test_outputs_copied_from_the_gpu_equal_the_cpu_conversion_and_stay_put():
    """`to_output` copies through page-locked memory that torch reuses once a result is dropped:
    each type equals the CPU conversion of the same images, and a result the caller still holds is
    not overwritten by the next call."""
    from runtime.outputs import to_output

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 24, generator=g) * 2.4 - 1.2  # some outside [-1, 1]: the clamp matters
    first = to_output(images.cuda(), "np")
    assert first.dtype == np.float32 and np.array_equal(first, to_output(images, "np"))
    kept = first.copy()
    for _ in range(3):
        to_output(-images.cuda(), "np")
    assert np.array_equal(first, kept)
    assert torch.equal(to_output(images.cuda(), "pt"), to_output(images, "pt"))
    for ours, cpu in zip(to_output(images.cuda(), "pil"), to_output(images, "pil"), strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(cpu)) and ours.size == (24, 16)


def test_an_output_queued_behind_slow_gpu_work_is_read_once_it_has_landed():
    """`queue_output` and `queue_host_copy` return before the GPU has made their tensors (no host
    wait); `result` waits for the copy: the values are the last kernel's, not what the page-locked
    buffer held before."""
    from runtime.outputs import queue_host_copy, queue_output, to_output

    torch.cuda.synchronize()
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # tens of milliseconds of work queued ahead of the images
        a = torch.tanh(a @ a / 64)
    images = a.flatten()[: 2 * 3 * 64 * 64].reshape(2, 3, 64, 64) * 2
    queued = queue_output(images, "np")
    rows = queue_host_copy(images[:, 0, 0] * 3)  # queued after the images: waited for on its own
    got, got_rows = queued.result(), rows.result()  # before anything else waits for the GPU
    assert np.array_equal(got, to_output(images.cpu(), "np"))
    assert torch.equal(got_rows, images[:, 0, 0].cpu() * 3)


def test_a_state_dict_on_the_gpu_gives_a_model_whose_causal_masks_are_there_too(ours):
    """`UnCLIPModel.from_state` with tensors on the GPU: the masks it rebuilds (non-persistent
    buffers) follow the weights, so the model runs there as loaded (an export or a forward
    would otherwise meet a mask left on the CPU)."""
    from models.unclip import UnCLIPModel

    state = {k: v.cuda() for k, v in ours.state_dict().items()}
    model = UnCLIPModel.from_state(ours.cfg, state, "the tiny model on the GPU")
    masks = [model.prior.causal_bias, model.clip.model.attn_mask]
    assert all(m.device.type == "cuda" for m in masks)
    tokens = torch.randint(0, ours.cfg.clip.vocab_size, (2, ours.cfg.clip.context_length), device="cuda")
    embed, _ = model.clip.encode_text(tokens)
    assert embed.is_cuda and torch.isfinite(embed).all()
