"""Super-resolution as a chain from the config: zero, one and two stages through the API, the
command line, ONNX Runtime engines and the image tools; the one-stage config and weight formats
still read; a stage without a last-step model. Tiny random models (the `tiny` config's 16² decoder,
then 64² and 128² stages)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from export.build_engines import random_model
from models.checkpoint import config_to_dict, save_model
from models.config_schema import config_from_dict
from models.configs import TINY, DiffusionConfig, SuperResConfig, UnCLIPConfig, UNetConfig
from models.unclip import UnCLIPModel, chain_state_keys
from runtime import UnCLIP
from runtime.__main__ import main as cli_main
from runtime.backends.signatures import available_stages, generate_stages
from tests.metrics import psnr

FAST = {"prior_steps": 2, "decoder_steps": 2, "output_type": "pt"}
SECOND = UNetConfig(image_size=128, in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 1, 2),
                    num_res_blocks=1, diffusion=DiffusionConfig("epsilon", "fixed_small_log", 1.0))


def chain(stages: int, last_step_model: bool = True) -> UnCLIPConfig:
    """`tiny` with 0, 1 (its own) or 2 super-res stages (the second 64 → 128, 3 steps)."""
    own = TINY.super_res
    extra = (SuperResConfig(SECOND, steps=3, last_step_model=last_step_model),)
    return dataclasses.replace(TINY, name=f"tiny-{stages}", super_res=(own + extra)[:stages])


@pytest.fixture(scope="module")
def two():
    return random_model(chain(2))


def test_the_chain_gives_each_stage_its_size_and_the_stages_to_build():
    for stages, size in ((0, 16), (1, 64), (2, 128)):
        cfg = chain(stages)
        assert cfg.image_size == size and len(cfg.image_sizes) == stages + 1
    cfg = chain(2)
    assert generate_stages(cfg)[-4:] == ("super_res_first", "super_res_last", "super_res_2_first", "super_res_2_last")
    assert generate_stages(chain(2, last_step_model=False))[-1] == "super_res_2_first"
    assert not any(s.startswith("super_res") for s in generate_stages(chain(0)))
    with pytest.raises(ValueError, match=r"super_res\[1\].unet.image_size must exceed"):
        dataclasses.replace(TINY, super_res=(TINY.super_res[0], SuperResConfig(dataclasses.replace(SECOND,
                                                                                                   image_size=64))))


def test_a_two_stage_model_stops_at_any_size_with_the_shorter_chains_images(two):
    """size=64 runs the first stage only and gives exactly a one-stage model's images (same weights,
    same seed: the noise of later stages is drawn after); size=16 the decoder's."""
    pipe = UnCLIP(two, device="cpu", progress=False)
    full = pipe.generate("a red circle", seed=4, **FAST)
    assert full.images.shape == (1, 3, 128, 128)
    at_64 = pipe.generate("a red circle", seed=4, size=64, **FAST).images
    one = UnCLIPModel.from_state(chain(1), {k: v for k, v in two.state_dict().items()
                                            if not k.startswith("super_res.1.")}, "first stage")
    alone = UnCLIP(one, device="cpu", progress=False).generate("a red circle", seed=4, **FAST).images
    assert at_64.shape == (1, 3, 64, 64) and torch.equal(at_64, alone)
    small = pipe.generate("a red circle", seed=4, size=16, return_decoder_images=True, **FAST)
    assert small.images.shape == (1, 3, 16, 16) and torch.equal(small.images, small.decoder_images)
    with pytest.raises(ValueError, match=r"size must be one of this model's image sizes \[16, 64, 128\]"):
        pipe.generate("x", size=256, **FAST)


def test_super_res_steps_per_stage(two):
    pipe = UnCLIP(two, device="cpu", progress=False)
    base = pipe.generate("a blue square", seed=1, super_res_steps=[2, 2], **FAST).images
    same = pipe.generate("a blue square", seed=1, super_res_steps=2, **FAST).images
    other = pipe.generate("a blue square", seed=1, super_res_steps=[2, 3], **FAST).images
    assert torch.equal(base, same) and not torch.equal(base, other)
    # the first stage's steps alone decide its images: stopping there, [2, 3]'s first stage is [2, 2]'s
    assert torch.equal(pipe.generate("a blue square", seed=1, super_res_steps=[2], size=64, **FAST).images,
                       pipe.generate("a blue square", seed=1, super_res_steps=2, size=64, **FAST).images)
    for bad, match in (([2], "one value per super-res stage that runs \\(2\\)"), ([2, 1], r"super_res_steps\[1\]"),
                       ("2", "integer")):
        with pytest.raises(ValueError, match=match):
            pipe.generate("x", super_res_steps=bad, **FAST)


def test_a_model_without_super_res_gives_the_decoders_images():
    model = random_model(chain(0))
    assert len(model.super_res) == 0 and not any(k.startswith("super_res") for k in model.state_dict())
    pipe = UnCLIP(model, device="cpu", progress=False)
    out = pipe.generate(["a", "b"], seed=0, return_decoder_images=True, **FAST)
    assert out.images.shape == (2, 3, 16, 16) and torch.equal(out.images, out.decoder_images)
    with pytest.raises(ValueError, match="no super-res stage runs"):
        pipe.generate("a", super_res_steps=3, **FAST)


def test_a_stage_without_a_last_step_model_runs_its_first_steps_unet_last():
    model = random_model(chain(2, last_step_model=False))
    assert model.super_res[1].last_step is None
    assert not any(k.startswith("super_res.1.last_step.") for k in model.state_dict())
    images = UnCLIP(model, device="cpu", progress=False).generate("a", seed=0, **FAST).images
    assert images.shape == (1, 3, 128, 128) and torch.isfinite(images).all()


def test_a_saved_chain_reads_back_with_its_images(two, tmp_path):
    save_model(two, two.cfg, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert [stage["unet"]["image_size"] for stage in data["super_res"]] == [64, 128]
    kw = {"seed": 2, **FAST}
    assert torch.equal(UnCLIP(tmp_path, device="cpu", progress=False).generate("x", **kw).images,
                       UnCLIP(two, device="cpu", progress=False).generate("x", **kw).images)


def test_the_one_stage_formats_read_as_a_chain_of_one():
    """config.json and weights written before the chain: `super_res` one UNet object with its steps
    in `sampling.super_res_steps`, weights under `super_res.first_steps.` / `super_res.last_step.`."""
    data = config_to_dict(TINY)
    old = {**data, "super_res": data["super_res"][0]["unet"], "sampling": {**data["sampling"], "super_res_steps": 5}}
    del old["sampling"]["image_size"]
    cfg = config_from_dict(old, "old config.json")
    assert cfg.super_res == (dataclasses.replace(TINY.super_res[0], steps=5),) and cfg.sampling == TINY.sampling
    state = {"super_res.first_steps.a": 1, "super_res.last_step.b": 2, "prior.c": 3}
    assert chain_state_keys(state) == {"super_res.0.first_steps.a": 1, "super_res.0.last_step.b": 2, "prior.c": 3}
    assert chain_state_keys({"super_res.1.first_steps.a": 1}) == {"super_res.1.first_steps.a": 1}


def test_the_command_line_takes_size_and_steps_per_stage(two, tmp_path, capsys):
    folder = tmp_path / "model"
    save_model(two, two.cfg, folder)
    out = tmp_path / "out.png"
    args = ["a red circle", "--model", str(folder), "--prior-steps", "2", "--decoder-steps", "2", "--seed", "0",
            "--no-progress", "-o", str(out)]
    assert cli_main([*args, "--super-res-steps", "2", "3"]) == 0
    assert Image.open(out).size == (128, 128)
    assert cli_main([*args, "--size", "64"]) == 0
    assert Image.open(out).size == (64, 64)
    assert cli_main([*args, "--super-res-steps", "2", "3", "4"]) == 2
    assert "--super-res-steps must give one value per super-res stage that runs (2)" in capsys.readouterr().err


def test_onnxruntime_engines_of_every_stage_give_the_torch_images(two, tmp_path):
    from export.build_engines import build

    manifest = build(two, tmp_path, ["onnxruntime"])
    assert set(manifest["stages"]) == set(available_stages(two))
    kw = {"seed": 6, **FAST}
    want = UnCLIP(two, device="cpu", progress=False).generate("a green star", **kw).images
    got = UnCLIP(two, engine_dir=tmp_path, backend="onnxruntime", device="cpu", progress=False
                 ).generate("a green star", **kw).images
    assert got.shape == want.shape == (1, 3, 128, 128)
    assert psnr(got, want) >= 40.0, psnr(got, want)


def test_the_image_tools_run_the_chain(two):
    pipe = UnCLIP(two, device="cpu", progress=False)
    image = torch.rand(3, 32, 32)
    big = pipe.variations(image, 2, seed=0, steps=2, output_type="pt").images
    small = pipe.variations(image, 2, seed=0, steps=2, super_res=False, output_type="pt").images
    assert big.shape == (2, 3, 128, 128) and small.shape == (2, 3, 16, 16)
    steps = pipe.variations(image, 2, seed=0, steps=2, super_res_steps=[2, 3], output_type="pt").images
    assert steps.shape == big.shape and not torch.equal(steps, big)


def test_the_paper_config_has_the_papers_second_upsampler():
    """`paper`: Karlo's stages, then 256 → 1024 at the paper's size (267M parameters here against
    the paper's 300M) on DDPM's linear schedule (ᾱ from 0.9999 down to 4.0e-5)."""
    from models.configs import get_config
    from models.super_res import SuperRes
    from runtime.sampling.schedules import alphas_cumprod

    cfg = get_config("paper")
    assert cfg.image_sizes == (64, 256, 1024) and cfg.super_res[1].steps == 15
    with torch.device("meta"):
        stage = SuperRes(cfg.super_res[1])
    assert stage.last_step is None and 260e6 < sum(p.numel() for p in stage.parameters()) < 300e6
    ac = alphas_cumprod(cfg.super_res[1].diffusion.schedule, 1000)
    assert abs(ac[0].item() - 0.9999) < 1e-9 and 3.9e-5 < ac[-1].item() < 4.1e-5


def test_blended_tiles_of_an_image_give_the_image_back():
    from runtime.backends.signatures import tile_starts
    from runtime.sampling.loops import TileBlend

    image = torch.randn(2, 3, 100, 100)
    starts = tile_starts(100, 32, 8)
    assert starts[0] == 0 and starts[-1] == 68 and all(b - a <= 24 for a, b in zip(starts, starts[1:], strict=False))
    cut = [(i, j) for i in starts for j in starts]
    tiles = torch.stack([image[:, :, i : i + 32, j : j + 32] for i, j in cut])
    torch.testing.assert_close(TileBlend(cut, 32, 100, 8, torch.float32, torch.device("cpu"))(tiles), image, rtol=1e-6,
                               atol=1e-6)


def tiled(tile: int, overlap: int) -> UnCLIPConfig:
    cfg = chain(2)
    return dataclasses.replace(cfg, super_res=(cfg.super_res[0], dataclasses.replace(cfg.super_res[1], tile=tile,
                                                                                      tile_overlap=overlap)))


def test_a_stage_runs_tile_wise_through_the_api_and_the_engines(two, tmp_path):
    """One tile as large as the image is the untiled stage exactly; 64² tiles overlapping by 16 run
    in the signature's tile shape, through torch and ONNX Runtime alike (PSNR ≥ 40 dB)."""
    from export.build_engines import build

    state = two.state_dict()
    kw = {"seed": 5, **FAST}
    whole = UnCLIP(two, device="cpu", progress=False).generate("a cat", **kw).images
    one_tile = UnCLIPModel.from_state(tiled(128, 0), state, "one tile")
    assert torch.equal(UnCLIP(one_tile, device="cpu", progress=False).generate("a cat", **kw).images, whole)
    model = UnCLIPModel.from_state(tiled(64, 16), state, "tiles")
    sig = signatures_of(model)["super_res_2_first"]
    assert sig.inputs[0].shape[2:] == (64, 64) and sig.tiles == 9 and sig.max_batch(2) == 18
    want = UnCLIP(model, device="cpu", progress=False).generate("a cat", **kw).images
    assert want.shape == (1, 3, 128, 128) and torch.isfinite(want).all() and not torch.equal(want, whole)
    build(model, tmp_path, ["onnxruntime"])
    got = UnCLIP(model, engine_dir=tmp_path, backend="onnxruntime", device="cpu", progress=False
                 ).generate("a cat", **kw).images
    assert psnr(got, want) >= 40.0, psnr(got, want)
    with pytest.raises(ValueError, match=r"super_res\[1\].tile must be a multiple of 4"):
        tiled(66, 16)


def signatures_of(model: UnCLIPModel):
    from runtime.backends.signatures import signatures

    return signatures(model.cfg)
