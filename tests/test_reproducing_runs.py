"""What a user needs to reproduce a run (#29 item 10): the noise types from `runtime`, the noise
`draw_noise` gives equals what `generate` draws from a seed, the decoder's images before
super-resolution from `generate`, and `variations(super_res_steps=…)`."""

from __future__ import annotations

import pytest
import torch

from runtime import SamplingNoise, StageNoise, UnCLIP

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2, "output_type": "pt"}


def test_drawn_noise_replays_a_seeded_run_and_the_decoder_images_come_back(ours):
    pipe = UnCLIP(ours, device="cpu", progress=False)
    seeded = pipe.generate("a red circle", num_images_per_prompt=2, seed=9, return_decoder_images=True, **FAST)
    noise = pipe.draw_noise(2, 2, 2, 2, torch.Generator().manual_seed(9))
    assert isinstance(noise, SamplingNoise) and isinstance(noise.decoder, StageNoise)
    replayed = pipe.generate("a red circle", num_images_per_prompt=2, noise=noise, **FAST)
    assert torch.equal(seeded.images, replayed.images)
    d = ours.cfg.decoder.image_size
    assert seeded.decoder_images.shape == (2, 3, d, d) and replayed.decoder_images is None
    # the super-res stage's input is the decoder's image: its downscaled output stays close to it
    s = ours.cfg.image_size
    assert seeded.images.shape == (2, 3, s, s)


def test_variations_take_super_res_steps():
    pipe = UnCLIP(device="cpu", progress=False)  # the shipped default model has a CLIP image encoder
    image = pipe.generate("a blue square", seed=1, **FAST).images[0]
    two = pipe.variations(image, 2, seed=3, steps=2, super_res_steps=2, output_type="pt").images
    three = pipe.variations(image, 2, seed=3, steps=2, super_res_steps=3, output_type="pt").images
    size = pipe.cfg.default_image_size
    assert two.shape == three.shape == (2, 3, size, size) and not torch.equal(two, three)


def test_variations_replay_from_drawn_noise_and_refuse_the_wrong_shape():
    pipe = UnCLIP(device="cpu", progress=False)
    image = pipe.generate("a blue square", seed=1, **FAST).images[0]
    seeded = pipe.variations(image, 2, seed=3, steps=2, super_res_steps=2, output_type="pt").images
    noise = pipe.draw_noise(2, 1, 2, 2, torch.Generator().manual_seed(3))
    replayed = pipe.variations(image, 2, steps=2, super_res_steps=2, output_type="pt", noise=noise).images
    assert torch.equal(seeded, replayed)
    with pytest.raises(ValueError, match=r"noise\.prior\.init must have shape \(3, "):
        pipe.variations(image, 3, steps=2, super_res_steps=2, noise=noise)
