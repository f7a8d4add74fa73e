"""Reliability of the public API: numerical faults raise (no black images), concurrent calls on
one instance equal sequential ones, the same seed gives the same image bit for bit, and a fuzz
test over `generate`'s arguments and image inputs finds no failure other than the documented
`ValueError`/`TypeError`."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import UnCLIP
from runtime.images import load_images, resize_batch
from runtime.sampling.loops import NumericalError

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2}


@pytest.fixture(scope="module")
def pipe(ours):
    return UnCLIP(ours, device="cpu", progress=False)


def test_a_nan_inside_a_loop_raises_naming_the_stage_and_step(pipe, monkeypatch):
    real = pipe.engines["decoder_step"]
    calls = []

    def poisoned(*inputs):
        calls.append(1)
        (out,) = real(*inputs)
        return (out.fill_(float("nan")),) if len(calls) == 3 else (out,)

    poisoned.signature, poisoned.float_dtype = real.signature, real.float_dtype
    monkeypatch.setitem(pipe.engines, "decoder_step", poisoned)
    with pytest.raises(NumericalError, match="decoder produced NaN or infinite values at step 3 of 4"):
        pipe.generate("a cat", seed=0, prior_steps=2, decoder_steps=4, super_res_steps=2)


def test_an_infinite_prior_output_is_caught_too(pipe, monkeypatch):
    real = pipe.engines["prior_step"]

    def exploding(*inputs):
        (out,) = real(*inputs)
        return (out * float("inf"),)

    exploding.signature, exploding.float_dtype = real.signature, real.float_dtype
    monkeypatch.setitem(pipe.engines, "prior_step", exploding)
    with pytest.raises(NumericalError, match="prior .* at step 1 of 2"):
        pipe.generate("a cat", seed=0, **FAST)


def test_eight_threads_on_one_instance_get_the_sequential_images(pipe):
    jobs = [(f"prompt {i}", i) for i in range(8)]
    sequential = [pipe.generate(p, seed=s, output_type="pt", **FAST).images for p, s in jobs]
    again = [pipe.generate(p, seed=s, output_type="pt", **FAST).images for p, s in jobs]
    assert all(torch.equal(a, b) for a, b in zip(sequential, again, strict=True))  # bitwise on the CPU
    results: dict[int, torch.Tensor] = {}
    errors = []
    barrier = threading.Barrier(len(jobs))

    def work(k: int) -> None:
        try:
            barrier.wait()
            results[k] = pipe.generate(jobs[k][0], seed=jobs[k][1], output_type="pt", **FAST).images
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[k], sequential[k]) for k in range(len(jobs)))
    assert not torch.equal(sequential[0], sequential[1])


prompts = st.one_of(
    st.text(max_size=400),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
    st.text(alphabet=st.sampled_from("\x00\x01\n\t\r\x1b\u200b\ufeff é中😀"), max_size=40),
    st.lists(st.text(max_size=30), max_size=3),
    st.integers(), st.none(), st.binary(max_size=10), st.just([]),
)
numbers = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                    st.text(max_size=3))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(prompt=prompts, n=numbers, prior_steps=numbers, decoder_steps=numbers, super_res_steps=numbers,
       prior_scale=numbers, decoder_scale=numbers, seed=st.one_of(st.integers(-5, 2**64), st.none(), st.floats()),
       output_type=st.sampled_from(["pil", "np", "pt", "jpg", None]))
def test_fuzz_generate_never_fails_but_with_a_clear_error(pipe, prompt, n, prior_steps, decoder_steps,
                                                          super_res_steps, prior_scale, decoder_scale, seed,
                                                          output_type):
    try:
        out = pipe.generate(prompt, num_images_per_prompt=n, prior_steps=prior_steps, decoder_steps=decoder_steps,
                            super_res_steps=super_res_steps, prior_guidance_scale=prior_scale,
                            decoder_guidance_scale=decoder_scale, seed=seed, output_type=output_type)
    except (ValueError, TypeError) as exc:
        assert str(exc)  # a message, not a bare exception
        return
    count = (1 if isinstance(prompt, str) else len(prompt)) * n
    images = out.images
    if output_type == "pil":
        assert len(images) == count
    else:
        array = images.numpy() if output_type == "pt" else images
        assert array.shape[0] == count and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1


arrays = st.one_of(
    st.builds(lambda h, w, c, dtype: np.zeros((h, w, c), dtype=dtype), st.integers(0, 9), st.integers(0, 9),
              st.integers(0, 6), st.sampled_from([np.uint8, np.float32, np.float64, np.int32, np.bool_])),
    st.builds(lambda v, shape: np.full(shape, v, dtype=np.float32),
              st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([(4, 4), (4, 4, 3), (2, 2, 2, 3)])),
    st.builds(lambda shape: torch.rand(shape), st.sampled_from([(3, 5, 5), (1, 3, 4, 4), (5,), (3, 0, 4)])),
    st.text(max_size=20), st.none(), st.integers(), st.lists(st.none(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(image=arrays)
def test_fuzz_image_inputs_convert_or_fail_clearly(image):
    try:
        images = load_images(image)
    except (ValueError, TypeError) as exc:
        assert str(exc)
        return
    batch = resize_batch(images, 8)
    assert batch.shape == (len(images), 3, 8, 8) and torch.isfinite(batch).all()
    assert batch.min() >= 0 and batch.max() <= 1


def test_a_request_over_max_batch_runs_in_chunks_and_gives_the_same_images(ours):
    # the trained default model: random-weight models amplify the last-bit differences that
    # another batch size gives CPU matmuls (see test_parity_diffusers)
    whole = UnCLIP(device="cpu", progress=False)
    chunked = UnCLIP(device="cpu", progress=False, max_batch=3)
    kw = {"num_images_per_prompt": 2, "seed": 4, "output_type": "pt", "return_image_embeds": True, **FAST}
    want = whole.generate(["a red circle", "a blue square"], **kw)
    got = chunked.generate(["a red circle", "a blue square"], **kw)  # chunks of 3 and 1
    assert got.images.shape == want.images.shape == (4, 3, 256, 256)
    assert float((got.images - want.images).abs().max()) <= 1e-3  # each chunk got its own slice of the noise
    assert torch.allclose(got.image_embeds, want.image_embeds, atol=1e-4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises((ValueError, TypeError), match="max_batch"):
            UnCLIP(ours, device="cpu", progress=False, max_batch=bad)


def test_a_seed_draws_the_noise_draw_noise_draws(ours):
    """generate(seed=...) draws the decoder's and super-res noise only once the prior is queued (so
    the CPU draws it while the GPU works), in draw_noise's order: the same images as the noise
    draw_noise gives for that seed, also when the request runs in chunks."""
    for pipe in (UnCLIP(ours, device="cpu", progress=False), UnCLIP(ours, device="cpu", progress=False, max_batch=1)):
        seeded = pipe.generate(["a red circle", "a blue square"], seed=11, output_type="pt", **FAST).images
        noise = pipe.draw_noise(2, *FAST.values(), torch.Generator().manual_seed(11))
        given = pipe.generate(["a red circle", "a blue square"], noise=noise, output_type="pt", **FAST).images
        assert torch.equal(seeded, given)
