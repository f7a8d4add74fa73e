"""`UnCLIP(prior_batch=N)`: the text encoder and the prior always run on N rows (fewer padded with
the last row, more in several calls), so every row takes the same kernels whatever shares its
call; the images are those of the unpadded pipeline (on the CPU, whose products are row-invariant
already, bit for bit), and only the padded rows are computed extra."""

from __future__ import annotations

import pytest
import torch

from runtime import UnCLIP
from runtime.sampling import loops
from runtime.sampling.ar_loop import ARNoise
from runtime.sampling.fixed_batch import in_fixed_batches, pad_rows
from runtime.sampling.inputs import StageNoise, TextConditioning


def test_pad_rows_repeats_the_last_row_along_the_asked_dimension():
    t = torch.arange(6.0).view(3, 2)
    assert torch.equal(pad_rows(t, 5), torch.tensor([[0.0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]))
    assert pad_rows(t, 3) is t
    steps = torch.randn(4, 2, 3)
    padded = pad_rows(steps, 3, dim=1)
    assert padded.shape == (4, 3, 3) and torch.equal(padded[:, 2], steps[:, 1])
    for rows in (2, 0):
        with pytest.raises(ValueError, match="cannot pad"):
            pad_rows(t if rows else t[:0], rows if rows else 1)


def test_each_call_gets_exactly_the_fixed_rows_and_the_results_come_back_in_order():
    seen = []

    def run(x, y, none):
        seen.append((x.shape[0], y.rows(0, y.embed.shape[0]).embed.shape[0], none))
        return x * 2, x + y.embed

    x = torch.randn(7, 3)
    text = TextConditioning(torch.randn(7, 3), torch.randn(7, 2, 3), torch.ones(7, 2, dtype=torch.bool))
    doubled, summed = in_fixed_batches(run, 7, 3, x, text, None)
    assert seen == [(3, 3, None)] * 3
    assert torch.equal(doubled, x * 2) and torch.equal(summed, x + text.embed)
    seen.clear()
    assert torch.equal(in_fixed_batches(lambda v: v + 1, 7, None, x), x + 1)  # None: one call as it is


def test_the_loop_inputs_pad_with_their_last_image():
    noise = StageNoise.draw((2, 4), 3, torch.Generator().manual_seed(0))
    padded = noise.padded(5)
    assert padded.init.shape == (5, 4) and padded.steps.shape == (3, 5, 4)
    assert torch.equal(padded.init[4], noise.init[1]) and torch.equal(padded.steps[:, 4], noise.steps[:, 1])
    assert torch.equal(padded.rows(0, 2).steps, noise.steps)
    ar = ARNoise.draw(2, 3, torch.Generator().manual_seed(0)).padded(4)
    assert ar.codes.shape == (4, 3) and torch.equal(ar.codes[3], ar.codes[1])
    text = TextConditioning(torch.randn(1, 3), torch.randn(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
    assert text.expand(2).padded(4).tokens.shape == (4, 2, 3)


class _Counting:
    """An engine wrapper that records the rows of each call."""

    def __init__(self, engine, rows: list[int]):
        self.engine, self.rows = engine, rows

    def __call__(self, tokens):
        self.rows.append(tokens.shape[0])
        return self.engine(tokens)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_a_fixed_prior_batch_gives_the_unpadded_images_and_runs_the_prior_only_at_that_batch(ours, monkeypatch):
    kw = {"seed": 3, "output_type": "pt", "return_image_embeds": True, "prior_steps": 3, "decoder_steps": 3,
          "super_res_steps": 2}
    prompts = ["a red circle", "a blue square", "a green star"]
    plain = UnCLIP(ours, device="cpu", progress=False).generate(prompts, num_images_per_prompt=2, **kw)
    fixed = UnCLIP(ours, device="cpu", progress=False, prior_batch=4)
    clip_rows, prior_rows = [], []
    fixed.engines["clip_text"] = _Counting(fixed.engines["clip_text"], clip_rows)
    original = loops.sample_prior

    def counting_prior(*args, **kwargs):
        prior_rows.append(args[4].embed.shape[0])  # text: the fixed batch, its unconditional half beside it
        return original(*args, **kwargs)

    monkeypatch.setattr(loops, "sample_prior", counting_prior)
    got = fixed.generate(prompts, num_images_per_prompt=2, **kw)
    # the 3 prompts in one padded call, then the empty prompt's; the 6 images in two calls of 4
    assert clip_rows == [4, 4] and prior_rows == [4, 4]
    assert torch.equal(got.image_embeds, plain.image_embeds)
    assert torch.equal(got.images, plain.images)
    kw["seed"] = 5
    lone = fixed.generate("a green star", **kw)
    assert torch.equal(lone.images, UnCLIP(ours, device="cpu", progress=False).generate("a green star", **kw).images)


def test_the_autoregressive_prior_runs_at_the_fixed_batch_too():
    kw = {"seed": 2, "output_type": "pt", "return_image_embeds": True, "decoder_steps": 2, "size": 64}
    plain = UnCLIP(prior="ar", progress=False, device="cpu").generate(["a red circle", "a blue square"], **kw)
    fixed = UnCLIP(prior="ar", progress=False, device="cpu", prior_batch=3).generate(["a red circle",
                                                                                     "a blue square"], **kw)
    assert torch.equal(fixed.image_embeds, plain.image_embeds) and torch.equal(fixed.images, plain.images)


def test_prior_batch_is_checked():
    with pytest.raises(ValueError, match="prior_batch"):
        UnCLIP(prior_batch=0)


def test_the_cli_takes_a_prior_batch_and_refuses_a_bad_one(tmp_path, capsys):
    from runtime.__main__ import main

    args = ["a red circle", "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2", "--no-progress"]
    assert main([*args, "--prior-batch", "0", "-o", str(tmp_path / "bad.png")]) == 2
    assert "prior_batch must be an integer" in capsys.readouterr().err
    assert main([*args, "--prior-batch", "3", "-o", str(tmp_path / "ok.png")]) == 0
    assert (tmp_path / "ok.png").is_file()
