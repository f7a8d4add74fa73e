"""train/: the generated domain, the pixel attribute reader, and a smoke run of every training
stage (a few steps on the CPU) that assembles a loadable model folder."""

from __future__ import annotations

import json
import random

import pytest
import torch

from runtime import UnCLIP
from train.__main__ import main as train_main
from train.attributes import read_batch
from train.data import COLOURS, HELD_OUT, SHAPES, caption, render, sample_batch, sample_scene, training_combos
from train.stages import degrade


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


def test_captions_name_the_foreground_and_shape():
    rng = random.Random(1)
    for _ in range(200):
        scene = sample_scene(rng, rng.choice(training_combos()))
        text = caption(rng, scene)
        assert scene.fg in text
        assert any(w in text for w in ("circle", "disc", "round", "square", "box", "triangle", "three-sided"))


def test_degrade_blurs_and_stays_in_range():
    x = render([sample_scene(random.Random(2), ("red", "square", "blue"))], 64)
    y = degrade(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.abs().max() <= 1 and 0 < (y - x).abs().mean() < 0.2


def test_every_stage_trains_and_assembles_a_loadable_model(tmp_path):
    out = tmp_path / "w"
    assert train_main(["all", "--out", str(out), "--device", "cpu", "--scale", "0.0003", "--batch", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"clip", "prior", "decoder", "super_res"} and manifest["data_version"] == 1
    pipe = UnCLIP(out, device="cpu", progress=False)
    images = pipe.generate("a red circle", seed=0, prior_steps=2, decoder_steps=2, super_res_steps=2,
                           output_type="pt").images
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
