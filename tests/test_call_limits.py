"""Bounded work (#29 item 4): a call too large for the host is refused with the figures before any
network runs; guidance beyond the sampling math's range is refused; a caller's `noise=` of the
wrong type or shape is refused naming the part, before the first network; large calls run in
chunks and give the images of one call."""

from __future__ import annotations

import pytest
import torch

from runtime import UnCLIP
from runtime.call_limits import check_host_memory

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2, "output_type": "pt"}


@pytest.fixture(scope="module")
def pipe(ours):
    return UnCLIP(ours, device="cpu", progress=False)


@pytest.fixture()
def no_network(pipe, monkeypatch):
    """Fails the test if any network runs."""
    for name, engine in list(pipe.engines.items()):
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} ran before the call was refused")

        refuse.signature, refuse.float_dtype = engine.signature, engine.float_dtype
        monkeypatch.setitem(pipe.engines, name, refuse)
    monkeypatch.setattr(pipe, "_empty_prompt", None)


def test_a_call_larger_than_the_host_can_hold_is_refused_with_the_figures(pipe, no_network, monkeypatch):
    monkeypatch.setattr("runtime.call_limits.available_host_bytes", lambda: 2**30)
    with pytest.raises(ValueError, match=r"GiB of noise and images on the host .* ask for fewer images"):
        pipe.generate(["a"] * 600, num_images_per_prompt=1024, seed=0, **FAST)


def test_the_host_memory_bound_is_half_of_what_is_available():
    check_host_memory(10, 100, available=2000)
    with pytest.raises(ValueError, match="over half of"):
        check_host_memory(11, 100, available=2000)


def test_huge_guidance_is_refused_before_any_network(pipe, no_network):
    with pytest.raises(ValueError, match=r"decoder_guidance_scale must be at most 1000"):
        pipe.generate("a", seed=0, decoder_guidance_scale=1e308, **FAST)


@pytest.mark.parametrize("break_it", ["wrong_type", "wrong_shape", "wrong_steps", "not_tensor"])
def test_bad_noise_is_refused_before_any_network(pipe, no_network, break_it):
    noise = pipe.draw_noise(2, 2, 2, 2, torch.Generator().manual_seed(0))
    if break_it == "wrong_type":
        noise = type(noise)(noise.prior, "noise", noise.super_res)
    elif break_it == "wrong_shape":
        noise = type(noise)(noise.prior, noise.decoder.rows(0, 1), noise.super_res)
    elif break_it == "wrong_steps":
        (sr,) = noise.super_res
        noise = type(noise)(noise.prior, noise.decoder, type(sr)(sr.init, sr.steps[:1]))
    else:
        noise = type(noise)(type(noise.prior)(noise.prior.init, [1, 2]), noise.decoder, noise.super_res)
    with pytest.raises((TypeError, ValueError), match=r"noise\.(prior|decoder|super_res)"):
        pipe.generate("a", num_images_per_prompt=2, noise=noise, **FAST)


def test_calls_beyond_the_chunk_give_the_images_of_one_call(ours, monkeypatch):
    pipe = UnCLIP(ours, device="cpu", progress=False)
    whole = pipe.generate(["a", "b"], num_images_per_prompt=3, seed=5, **FAST).images
    monkeypatch.setattr("runtime.pipeline.default_chunk", lambda device: 4)
    chunked = pipe.generate(["a", "b"], num_images_per_prompt=3, seed=5, **FAST).images
    assert torch.equal(whole, chunked)
