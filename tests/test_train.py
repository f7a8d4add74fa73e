"""train/: the generated domain, the pixel attribute reader, and a smoke run of every training
stage (a few steps on the CPU) that assembles a loadable model folder."""

from __future__ import annotations

import json
import random

import pytest
import torch

from models.clip import ClipEncoder
from models.configs import TINY
from runtime import UnCLIP
from train.__main__ import main as train_main
from train.attributes import largest_component, read_batch
from train.batches import CaptionBank, SceneSampler
from train.data import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    SceneBatch,
    caption,
    render,
    render_windows,
    sample_batch,
    sample_scene,
    training_combos,
)
from train.stages import _later_stage_crops, _random_crops, degrade, degrade_bsr


def test_held_out_combinations_never_reach_training():
    combos = training_combos()
    assert not set(HELD_OUT) & set(combos)
    assert len(combos) + len(HELD_OUT) == len(COLOURS) * (len(COLOURS) - 1) * len(SHAPES)
    rng = random.Random(0)
    scenes, _ = sample_batch(rng, 2000)
    assert not {s.combo for s in scenes} & set(HELD_OUT)
    # every colour and shape still occurs in training as foreground and background
    assert {c[0] for c in combos} == {c[2] for c in combos} == set(COLOURS)


@pytest.mark.parametrize("size", [64, 256])
def test_reader_recovers_every_attribute_of_true_renders(size):
    rng = random.Random(size)
    scenes = [sample_scene(rng, c) for c in HELD_OUT for _ in range(2)]
    readings = read_batch(render(scenes, size))
    assert [r.combo for r in readings] == [s.combo for s in scenes]


def test_reader_ignores_specks_away_from_the_shape():
    rng = random.Random(9)
    scenes = [sample_scene(rng, c) for c in HELD_OUT]
    images = render(scenes, 256)
    images[:, :, 3:7, 3:7] = 1.0  # a white speck in a corner (or a background-coloured one)
    images[:, :, 240:246, 120:126] = -1.0
    assert [r.combo for r in read_batch(images)] == [s.combo for s in scenes]
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[1:5, 1:5] = True
    mask[8, 8] = mask[7, 9] = True  # a separate, smaller region (8-connected to itself)
    kept = largest_component(mask)
    assert int(kept.sum()) == 16 and not kept[8, 8]


def test_captions_name_the_foreground_and_shape():
    rng = random.Random(1)
    for _ in range(200):
        scene = sample_scene(rng, rng.choice(training_combos()))
        text = caption(rng, scene)
        assert scene.fg in text
        assert any(w in text for w in ("circle", "disc", "round", "square", "box", "triangle", "three-sided"))


def test_batched_sampler_draws_the_domain_of_sample_scene():
    sampler = SceneSampler("cpu", seed=0)
    scenes, caption_ids = sampler.scenes(4000)
    captions = sampler.captions()
    combos = {(COLOURS[f], SHAPES[s], COLOURS[b]) for f, s, b in zip(scenes.fg, scenes.shape, scenes.bg, strict=True)}
    assert combos <= set(training_combos()) and len(combos) == len(training_combos())  # all, none held out
    for i in range(len(scenes)):
        lo, hi = SIZES[SIZE_NAMES[int(scenes.size[i])]]
        r = float(scenes.radius[i])
        assert lo <= r <= hi and r + 0.02 <= float(scenes.cx[i]) <= 1 - r - 0.02
        assert (float(scenes.angle[i]) == 0) == (SHAPES[int(scenes.shape[i])] == "circle")
        text = captions[int(caption_ids[i])]
        assert COLOURS[int(scenes.fg[i])] in text.split()  # the caption describes this very scene
        named_sizes = set(text.split()) & set(SIZES)
        assert named_sizes <= {SIZE_NAMES[int(scenes.size[i])]}
    # every template occurs, and the same seed draws the same batch
    assert len({int(c) for c in caption_ids}) > 1000
    again, _ = SceneSampler("cpu", seed=0).scenes(4000)
    assert torch.equal(again.cx, scenes.cx) and torch.equal(again.fg, scenes.fg)


def test_scene_batch_renders_like_the_scenes_it_holds():
    rng = random.Random(4)
    scenes = [sample_scene(rng, c) for c in HELD_OUT]
    batch = SceneBatch.from_scenes(scenes)
    assert torch.equal(render(batch, 64), render(scenes, 64))
    assert batch.combo_keys().tolist() == [
        (COLOURS.index(s.fg) * len(SHAPES) + SHAPES.index(s.shape)) * len(COLOURS) + COLOURS.index(s.bg)
        for s in scenes
    ]


def test_caption_bank_lazy_and_eager_features_agree():
    torch.manual_seed(0)
    clip = ClipEncoder(TINY.clip).eval()
    sampler = SceneSampler("cpu", seed=1, combos=training_combos()[:2])
    eager = CaptionBank(sampler, TINY.clip.context_length).encode(clip)
    lazy = CaptionBank(sampler, TINY.clip.context_length).encode(clip, lazy=True)
    index = torch.tensor([5, 0, 5, len(eager) - 1])
    for a, b in zip(eager.text(index), lazy.text(index), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(lazy._filled.sum()) == 3  # only what was drawn got encoded


def test_random_crops_take_the_same_window_from_each_tensor():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    a, b = _random_crops([x, -x], 5, torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 5, 5) and torch.equal(a, -b)
    for i in range(2):  # each crop is a contiguous window of its own image, on the offset grid
        top, left = divmod(int(a[i, 0, 0, 0]) - i * 768, 16)
        assert torch.equal(a[i], x[i, :, top : top + 5, left : left + 5])
        assert top in (0, 5, 10) and left in (0, 5, 10)


def test_degrade_blurs_and_stays_in_range():
    x = render([sample_scene(random.Random(2), ("red", "square", "blue"))], 64)
    y = degrade(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.abs().max() <= 1 and 0 < (y - x).abs().mean() < 0.2
    # per-image σ: in a batch, each image is blurred like that image alone with the same draws
    xs = torch.cat([x, x.flip(-1)])
    ys = degrade(xs, torch.Generator().manual_seed(3))
    assert not torch.allclose(ys[0], ys[1].flip(-1), atol=1e-3)  # different σ and noise per image
    flat = torch.full((3, 3, 8, 8), 0.5)
    torch.testing.assert_close(degrade(flat, torch.Generator().manual_seed(0)).mean(), torch.tensor(0.5), atol=0.01,
                               rtol=0)


def test_windows_render_as_the_crops_of_the_whole_render():
    scenes, _ = SceneSampler("cpu", 0).scenes(4)
    full = render(scenes, 256)
    top, left = torch.tensor([0, 64, 192, 32]), torch.tensor([128, 0, 64, 200])
    windows = render_windows(scenes, 256, top, left, 56)
    for i, (t, c) in enumerate(zip(top.tolist(), left.tolist(), strict=True)):
        assert torch.equal(windows[i], full[i, :, t : t + 56, c : c + 56])


def test_the_bsr_corruption_changes_each_image_its_own_way_and_stays_in_range():
    x = render([sample_scene(random.Random(2), ("red", "square", "blue"))] * 2, 64)
    y = degrade_bsr(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.abs().max() <= 1
    assert 0 < (y - x).abs().mean() < 0.2 and not torch.allclose(y[0], y[1], atol=1e-2)
    assert torch.equal(y, degrade_bsr(x, torch.Generator().manual_seed(0)))  # the generator decides


def test_later_stage_crops_pair_each_target_with_its_corrupted_input_mostly_on_outlines():
    sampler = SceneSampler("cpu", 1)
    scenes, _ = sampler.scenes(32)
    x0, low = _later_stage_crops(scenes, 1024, 256, 64, sampler.gen)
    assert x0.shape == low.shape == (32, 3, 64, 64) and low.abs().max() <= 1.1  # bicubic overshoots a little
    assert (x0 - low).abs().mean() < 0.1  # the same place, corrupted
    with_edges = sum(int(len(torch.unique(x0[i, 0])) > 2) for i in range(32))
    assert with_edges >= 16, with_edges  # three in four are drawn on the outline


def test_every_stage_trains_and_assembles_a_loadable_model(tmp_path):
    out = tmp_path / "w"
    assert train_main(["all", "--out", str(out), "--device", "cpu", "--scale", "0.0003", "--batch", "2",
                       "--codebook-images", "1024"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"clip", "prior", "decoder", "super_res", "super_res_2", "ar_prior"}
    assert manifest["data_version"] == 1 and manifest["stages"]["ar_prior"]["codebook"]["components"] == 48
    for prior in ("diffusion", "ar"):
        pipe = UnCLIP(out, device="cpu", progress=False, prior=prior)
        steps = {"prior_steps": 2} if prior == "diffusion" else {}
        images = pipe.generate("a red circle", seed=0, decoder_steps=2, super_res_steps=2, output_type="pt",
                               **steps).images
        assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
    # the second upsampler (config default-1024) trains on its own and joins the folder's model
    assert train_main(["super_res_2", "--out", str(out), "--device", "cpu",
                       "--scale", "0.0003", "--batch", "2"]) == 0
    pipe = UnCLIP(out, device="cpu", progress=False)
    assert pipe.cfg.image_sizes == (64, 256, 1024) and pipe.cfg.sampling.image_size == 256
    big = pipe.generate("a red circle", seed=0, decoder_steps=2, super_res_steps=[2, 2], size=1024,
                        output_type="pt").images
    assert big.shape == (1, 3, 1024, 1024) and torch.isfinite(big).all()


def test_clip_retrieval_reads_a_half_precision_pipeline_like_a_float_one():
    """`train.evaluate.retrieval_top1` hands CLIP's image tower pixels in the tower's own dtype
    (its preprocessing gives fp32), so an fp16 pipeline is scored, and scored as the fp32 one is."""
    from train.evaluate import retrieval_top1

    half = retrieval_top1(UnCLIP(dtype=torch.float16, progress=False))
    assert half == retrieval_top1(UnCLIP(progress=False))
