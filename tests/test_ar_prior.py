"""The autoregressive prior: its codebook, the cached step against the whole-sequence forward,
the code sampler (temperature, top-k, top-p), the `UnCLIP(prior="ar")` API and its engines, and
the shipped default model's codebook."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from export.build_engines import build
from models.configs import TINY, ARPriorConfig
from models.unclip import UnCLIPModel
from runtime import UnCLIP
from runtime.sampling.ar_loop import ARSettings, draw_codes, similarity_tokens
from tests.metrics import psnr
from train.ar_prior import fit_codebook

TINY_AR = dataclasses.replace(
    TINY, name="tiny-ar",
    ar_prior=ARPriorConfig(width=64, layers=2, heads=2, clip_dim=32, text_width=32, components=8, buckets=64,
                           similarity_buckets=16),
)


def _tiny_ar_model(seed: int = 0) -> UnCLIPModel:
    torch.manual_seed(seed)
    model = UnCLIPModel(TINY_AR).eval()
    with torch.no_grad():  # zero-initialised output layers get weights, so outputs depend on every input
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
        low_rank = torch.randn(4096, 6) @ torch.randn(6, 32) + 0.1 * torch.randn(4096, 32)
        fit_codebook(model.ar_prior, low_rank, torch.randn(4096, 32), held_back=512)
    return model


@pytest.fixture(scope="module")
def tiny_ar():
    return _tiny_ar_model()


def _text(b: int, g: torch.Generator, dtype=torch.float32):
    embed, tokens = torch.randn(b, 32, generator=g, dtype=dtype), torch.randn(b, 77, 32, generator=g, dtype=dtype)
    mask = torch.arange(77)[None] < torch.randint(2, 78, (b,), generator=g)[:, None]
    return embed, tokens, mask


def test_codebook_round_trips_codes_and_reconstructs_low_rank_embeddings():
    model = _tiny_ar_model()
    ar = model.ar_prior
    g = torch.Generator().manual_seed(1)
    test = torch.randn(256, 6, generator=g) @ torch.randn(6, 32, generator=g)
    codes = ar.encode(test)
    assert codes.shape == (256, 8) and int(codes.min()) >= 0 and int(codes.max()) < 64
    assert torch.equal(ar.encode(ar.decode(codes)), codes)  # a bucket's value lies inside the bucket
    edges = ar.code_edges
    assert bool((edges[:, 1:] >= edges[:, :-1]).all())


def test_fit_reports_the_explained_variance_and_reconstruction():
    ar = _tiny_ar_model().ar_prior
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    data = (torch.randn(8192, 32, generator=g) * 3 * 0.5 ** torch.arange(32.0)) @ basis.t() + 1.0
    report = fit_codebook(ar, data, data + torch.randn(8192, 32, generator=g), held_back=1024)
    assert 0.99 < report["explained_variance"] <= 1.0  # 8 of 32 components with fast-falling variance
    assert report["reconstruction_cosine_mean"] > 0.99
    assert report["reconstruction_cosine_min"] <= report["reconstruction_cosine_mean"]
    # the components are orthonormal, sorted by variance (the first carries the largest)
    comp = ar.pca_components.double()
    torch.testing.assert_close(comp @ comp.t(), torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    assert abs(float(comp[0] @ basis[:, 0].double())) > 0.99


def test_cached_steps_equal_the_whole_sequence_forward(tiny_ar):
    ar = _tiny_ar_model().ar_prior.double()
    g = torch.Generator().manual_seed(3)
    b, k = 3, ar.cfg.components
    embed, tokens, mask = _text(b, g, torch.float64)
    similarity = torch.randint(0, 16, (b,), generator=g)
    codes = torch.randint(0, 64, (b, k), generator=g)
    with torch.no_grad():
        whole = ar(embed, tokens, mask, similarity, codes)
        prefix = ar.context_kv(embed, tokens, mask)
        cache = torch.zeros(b, 2, 2, 2, k, 32, dtype=torch.float64)
        token, stepped = similarity, []
        for i in range(k):
            logits, new_kv = ar.step(token, torch.full((b,), i), prefix, cache, mask)
            cache[:, :, :, :, i] = new_kv[:, :, :, :, 0]
            stepped.append(logits)
            token = codes[:, i]
    torch.testing.assert_close(torch.stack(stepped, 1), whole, atol=1e-10, rtol=0)
    # a cache slot at or after the current position is ignored (it holds garbage in practice)
    with torch.no_grad():
        noisy = cache.clone()
        noisy[:, :, :, :, 2:] = 1e3
        a, _ = ar.step(codes[:, 1], torch.full((b,), 2), prefix, cache, mask)
        c, _ = ar.step(codes[:, 1], torch.full((b,), 2), prefix, noisy, mask)
    torch.testing.assert_close(a, c, atol=1e-12, rtol=0)


def test_draws_follow_the_softmax_and_respect_top_k_and_top_p():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 10, generator=g) * 2
    u = torch.rand(200_000, generator=g)
    draws = draw_codes(logits.expand(len(u), -1), u, ARSettings(temperature=0.7))
    freq = torch.bincount(draws, minlength=10).float() / len(u)
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, -1), atol=5e-3, rtol=0)
    order = logits[0].argsort(descending=True)
    top3 = draw_codes(logits.expand(len(u), -1), u, ARSettings(top_k=3))
    assert set(top3.unique().tolist()) == set(order[:3].tolist())
    assert set(draw_codes(logits.expand(50, -1), u[:50], ARSettings(top_k=1)).tolist()) == {int(order[0])}
    probs = torch.softmax(logits[0], -1)
    need = int((probs[order].cumsum(0) < 0.8).sum()) + 1  # the nucleus of 80%
    nucleus = draw_codes(logits.expand(len(u), -1), u, ARSettings(top_p=0.8))
    assert set(nucleus.unique().tolist()) == set(order[:need].tolist())
    assert set(draw_codes(logits.expand(50, -1), u[:50], ARSettings(top_p=1e-6)).tolist()) == {int(order[0])}


def test_similarity_tokens_come_from_the_asked_quantiles():
    u = torch.rand(10_000, generator=torch.Generator().manual_seed(5))
    top = similarity_tokens(u, 64, ARSettings())
    assert int(top.min()) == 32 and int(top.max()) == 63  # the top half, as the paper samples it
    low = similarity_tokens(u, 64, ARSettings(similarity_low=0.0, similarity_high=0.25))
    assert int(low.min()) == 0 and int(low.max()) == 15


def test_generate_with_the_ar_prior_is_seeded_and_chunks_like_one_call(tiny_ar):
    pipe = UnCLIP(tiny_ar, device="cpu", progress=False, prior="ar")
    kw = {"decoder_steps": 2, "super_res_steps": 2, "output_type": "pt", "return_image_embeds": True}
    a = pipe.generate(["a red circle", "a blue box"], num_images_per_prompt=2, seed=7, **kw)
    b = pipe.generate(["a red circle", "a blue box"], num_images_per_prompt=2, seed=7, **kw)
    c = pipe.generate(["a red circle", "a blue box"], num_images_per_prompt=2, seed=8, **kw)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.images, b.images)
    assert not torch.equal(a.image_embeds, c.image_embeds)
    chunked = UnCLIP(tiny_ar, device="cpu", progress=False, prior="ar", max_batch=3)
    d = chunked.generate(["a red circle", "a blue box"], num_images_per_prompt=2, seed=7, **kw)
    torch.testing.assert_close(d.image_embeds, a.image_embeds, atol=1e-5, rtol=0)
    # embeddings are decoded codes: each re-encodes to itself
    ar = tiny_ar.ar_prior
    assert torch.equal(ar.encode(ar.decode(ar.encode(a.image_embeds))), ar.encode(a.image_embeds))


def test_ar_arguments_are_checked_at_the_api(tiny_ar):
    pipe = UnCLIP(tiny_ar, device="cpu", progress=False, prior="ar")
    with pytest.raises(ValueError, match="diffusion prior"):
        pipe.generate("x", prior_steps=3)
    with pytest.raises(ValueError, match="diffusion prior"):
        pipe.generate("x", prior_guidance_scale=2.0)
    for bad in ({"temperature": 0.0}, {"temperature": float("nan")}, {"top_k": 0}, {"top_k": 65}, {"top_p": 1.5},
                {"top_p": 0.0}, {"top_k": 2.5}, {"similarity_quantiles": (0.8, 0.2)},
                {"similarity_quantiles": (0.5,)}, {"similarity_quantiles": (-0.1, 0.5)}):
        with pytest.raises((ValueError, TypeError)):
            pipe.generate("x", **bad)
    with pytest.raises(TypeError, match="ARNoise"):
        diffusion_noise = UnCLIP(tiny_ar, device="cpu", progress=False).draw_noise(1, 2, 2, 2, None)
        pipe.generate("x", noise=diffusion_noise)
    diffusion = UnCLIP(tiny_ar, device="cpu", progress=False)
    for other in ({"temperature": 0.5}, {"similarity_quantiles": (0.9, 1.0)}):
        with pytest.raises(ValueError, match="autoregressive prior"):
            diffusion.generate("x", **other)
    with pytest.raises(ValueError, match="prior must be"):
        UnCLIP(tiny_ar, device="cpu", prior="autoregressive")
    without = UnCLIPModel.from_state(TINY_AR, {k: v for k, v in tiny_ar.state_dict().items()
                                               if not k.startswith("ar_prior.")}, "test")
    assert without.ar_prior is None
    with pytest.raises(ValueError, match="no autoregressive prior"):
        UnCLIP(without, device="cpu", prior="ar")


def test_onnxruntime_engines_draw_the_same_codes_as_torch(tiny_ar, tmp_path):
    pytest.importorskip("onnxruntime")
    manifest = build(tiny_ar, tmp_path / "e", ["onnxruntime"])
    assert {"ar_prior_context", "ar_prior_step"} <= set(manifest["stages"])
    assert max(manifest["stages"][s]["max_relative_error"] for s in ("ar_prior_context", "ar_prior_step")) < 1e-4
    torch_pipe = UnCLIP(tiny_ar, device="cpu", progress=False, prior="ar")
    ort_pipe = UnCLIP(tiny_ar, engine_dir=tmp_path / "e", backend="onnxruntime", device="cpu", progress=False,
                      prior="ar")
    kw = {"decoder_steps": 2, "super_res_steps": 2, "output_type": "pt", "return_image_embeds": True, "top_k": 20}
    for seed in range(3):
        a = torch_pipe.generate(["a red circle", "a blue box", ""], seed=seed, **kw)
        b = ort_pipe.generate(["a red circle", "a blue box", ""], seed=seed, **kw)
        assert torch.equal(tiny_ar.ar_prior.encode(a.image_embeds), tiny_ar.ar_prior.encode(b.image_embeds))
        torch.testing.assert_close(b.image_embeds, a.image_embeds, atol=1e-6, rtol=0)  # the same codes, decoded
        assert psnr(a.images, b.images) >= 40  # the decoder and super-res engines, as in test_backends


def test_the_default_models_codebook_reconstructs_held_out_embeddings():
    """Acceptance: decoding the PCA inverse of the true codes gives the CLIP image embedding back
    (cosine ≥ 0.98), on renders of the held-out combinations, which no fit saw."""
    from train.data import HELD_OUT, render, sample_scene

    pipe = UnCLIP(device="cpu", progress=False)
    ar, clip = pipe.model.ar_prior, pipe.model.clip
    assert ar is not None, "the shipped default model has an autoregressive prior"
    rng = random.Random(11)
    scenes = [sample_scene(rng, c) for c in HELD_OUT for _ in range(8)]
    with torch.no_grad():
        embeds = clip.encode_image(clip.preprocess((render(scenes, clip.cfg.image_size) + 1) / 2)).float()
        cosine = F.cosine_similarity(ar.decode(ar.encode(embeds)), embeds)
    assert float(cosine.mean()) >= 0.98 and float(cosine.min()) >= 0.95, (float(cosine.mean()), float(cosine.min()))


def test_the_cli_runs_the_ar_prior_and_refuses_the_other_priors_settings(tmp_path, capsys):
    from runtime.__main__ import main

    out = tmp_path / "ar.png"
    assert main(["a red circle", "-o", str(out), "--prior", "ar", "--top-k", "50", "--decoder-steps", "2",
                 "--super-res-steps", "2", "--seed", "0", "--no-progress", "--device", "cpu"]) == 0
    assert out.is_file()
    assert main(["a red circle", "-o", str(out), "--prior", "ar", "--prior-steps", "3", "--device", "cpu"]) == 2
    assert "diffusion prior" in capsys.readouterr().err


@pytest.mark.gpu
def test_ar_prior_graph_replay_draws_the_eager_codes_and_fp16_stays_close():
    kw = {"decoder_steps": 3, "super_res_steps": 2, "output_type": "pt", "return_image_embeds": True}
    prompts = ["a red circle on a blue background", "a green square", ""]
    eager = UnCLIP(device="cuda", progress=False, prior="ar", cuda_graphs=False)
    graphed = UnCLIP(device="cuda", progress=False, prior="ar", cuda_graphs=True)
    for seed in range(3):
        a, b = eager.generate(prompts, seed=seed, **kw), graphed.generate(prompts, seed=seed, **kw)
        torch.testing.assert_close(b.image_embeds, a.image_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.images, a.images, atol=1e-5, rtol=0)
    assert len(graphed.graphs) >= 3  # AR prior, decoder, super-res (and the text encoder)
    # fp16 against fp32: the step's logits and keys/values on the same inputs
    half = UnCLIP(device="cuda", progress=False, prior="ar", dtype=torch.float16)
    sig = eager.engines["ar_prior_step"].signature
    inputs = list(sig.sample_inputs(4, device="cuda", generator=torch.Generator().manual_seed(0)).values())
    ref = eager.engines["ar_prior_step"](*inputs)
    got = half.engines["ar_prior_step"](*inputs)
    for r, h in zip(ref, got, strict=True):
        assert float((h.float() - r).abs().max() / r.abs().max()) <= 1e-2
    images = half.generate(prompts, seed=0, **kw).images  # the whole fp16 run, graphed
    assert torch.isfinite(images).all() and float(images.std()) > 0.05
