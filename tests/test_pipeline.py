"""runtime/pipeline.py and the CLI: input validation at the public API, outputs, determinism,
our own checkpoint folder, and the no-default-model message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import CheckpointError, save_model
from models.file_integrity import IntegrityError
from runtime import UnCLIP
from runtime.__main__ import main

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2}


@pytest.fixture(scope="module")
def pipe(ours):
    return UnCLIP(ours, device="cpu", progress=False)


def test_default_model_loads_and_a_missing_one_says_how_to_load_weights(monkeypatch, tmp_path):
    pipe = UnCLIP(device="cpu", progress=False)
    assert pipe.cfg.name == "default"
    image = pipe.generate("a red circle on a blue background", seed=0, output_type="np", **FAST).images
    assert image.shape == (1, 256, 256, 3)
    import runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "DEFAULT_MODEL", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="from_karlo"):
        UnCLIP()


def test_unset_steps_and_scales_come_from_the_model_config(ours):
    import dataclasses

    from models.configs import SamplingDefaults

    defaults = SamplingDefaults(prior_steps=2, decoder_steps=3, prior_guidance_scale=2.0, decoder_guidance_scale=1.5)
    chain = (dataclasses.replace(ours.cfg.super_res[0], steps=2),)
    cfg = dataclasses.replace(ours.cfg, sampling=defaults, super_res=chain)
    model = ours.__class__.from_state(cfg, ours.state_dict(), "test")
    pipe = UnCLIP(model, device="cpu", progress=False)
    implicit = pipe.generate("a cat", seed=3, output_type="pt").images
    explicit = pipe.generate("a cat", seed=3, output_type="pt", super_res_steps=2,
                             **{k: v for k, v in dataclasses.asdict(defaults).items() if v is not None}).images
    karlo_defaults = pipe.generate("a cat", seed=3, output_type="pt", super_res_steps=2, **{
        k: v for k, v in dataclasses.asdict(SamplingDefaults(prior_steps=2, decoder_steps=3)).items()
        if v is not None}).images
    assert torch.equal(implicit, explicit) and not torch.allclose(implicit, karlo_defaults)


def test_output_types_and_shapes(pipe):
    pil = pipe.generate("a cat", seed=0, **FAST).images
    assert len(pil) == 1 and isinstance(pil[0], Image.Image) and pil[0].size == (64, 64)
    arr = pipe.generate(["a", "b"], num_images_per_prompt=2, seed=0, output_type="np", **FAST).images
    assert arr.shape == (4, 64, 64, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = pipe.generate("a", seed=0, output_type="pt", return_image_embeds=True, **FAST)
    assert pt.images.shape == (1, 3, 64, 64) and pt.image_embeds.shape == (1, 32)
    assert np.allclose(np.asarray(pil[0]) / 255.0, pipe.generate("a cat", seed=0, output_type="np", **FAST).images[0],
                       atol=1 / 255)


def test_same_seed_same_image_bitwise_and_different_seed_differs(pipe):
    a = pipe.generate("a red circle", seed=11, output_type="np", **FAST).images
    b = pipe.generate("a red circle", seed=11, output_type="np", **FAST).images
    c = pipe.generate("a red circle", seed=12, output_type="np", **FAST).images
    assert np.array_equal(a, b)
    assert abs(a - c).max() > 0.05


def test_guidance_scale_one_skips_the_unconditional_branch(pipe, monkeypatch):
    calls = []
    original = pipe.encode_prompts
    monkeypatch.setattr(pipe, "encode_prompts", lambda prompts: calls.append(list(prompts)) or original(prompts))
    pipe.generate("x", seed=0, prior_guidance_scale=1.0, decoder_guidance_scale=1.0, **FAST)
    assert calls == [["x"]]
    calls.clear()
    pipe.generate("x", seed=0, **FAST)
    assert calls == [["x"], [""]]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prompt": 3}, TypeError),
        ({"prompt": []}, TypeError),
        ({"prompt": ["ok", None]}, TypeError),
        ({"prompt": "x", "prior_steps": 0}, ValueError),
        ({"prompt": "x", "decoder_steps": 2.5}, ValueError),
        ({"prompt": "x", "super_res_steps": 1}, ValueError),
        ({"prompt": "x", "prior_guidance_scale": float("nan")}, ValueError),
        ({"prompt": "x", "decoder_guidance_scale": -1}, ValueError),
        ({"prompt": "x", "num_images_per_prompt": 0}, ValueError),
        ({"prompt": "x", "output_type": "jpeg"}, ValueError),
        ({"prompt": "x", "seed": -1}, ValueError),
    ],
)
def test_bad_arguments_fail_clearly_before_any_work(pipe, kwargs, error, monkeypatch):
    monkeypatch.setattr(pipe, "encode_prompts", lambda *_: pytest.fail("ran despite bad input"))
    with pytest.raises(error):
        pipe.generate(**kwargs)


def test_long_prompt_is_cut_with_a_warning(pipe, caplog):
    pipe.generate("word " * 100, seed=0, **FAST)
    assert any("prompt cut to 77 tokens" in r.message for r in caplog.records)


def test_saved_folder_round_trips(ours, tmp_path, pipe):
    save_model(ours, ours.cfg, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["checksums.json", "config.json", "model.safetensors"]
    again = UnCLIP(tmp_path / "m", device="cpu", progress=False)
    a = again.generate("a", seed=0, output_type="np", **FAST).images
    b = pipe.generate("a", seed=0, output_type="np", **FAST).images
    assert abs(a - b).max() <= 1e-3
    with pytest.raises(FileNotFoundError, match="not an unclip-rt model folder"):
        UnCLIP(tmp_path)


def test_bad_dtype_and_model_type_are_refused(ours):
    with pytest.raises(ValueError, match="dtype"):
        UnCLIP(ours, dtype=torch.int8)
    with pytest.raises(TypeError):
        UnCLIP(42)


def test_prior_dtype_runs_the_text_encoder_and_the_prior_in_it_giving_the_full_precision_embeddings(ours):
    """bfloat16 networks with `prior_dtype=float32`: CLIP and the priors stay float32 (the caller's
    model untouched), so the image embeddings are those of a float32 pipeline bit for bit, and the
    image stays near it (bfloat16 rounding on a random tiny model)."""
    from tests.metrics import psnr

    mixed = UnCLIP(ours, device="cpu", progress=False, dtype=torch.bfloat16, prior_dtype=torch.float32)
    dtypes = {name: next(getattr(mixed.model, name).parameters()).dtype
              for name in ("clip", "prior", "decoder", "super_res")}
    assert dtypes == {"clip": torch.float32, "prior": torch.float32, "decoder": torch.bfloat16,
                      "super_res": torch.bfloat16}
    assert next(ours.parameters()).dtype == torch.float32 and mixed.prior_dtype == torch.float32
    full = UnCLIP(ours, device="cpu", progress=False)
    kw = {**FAST, "seed": 5, "output_type": "pt", "return_image_embeds": True}
    a, b = full.generate("a red circle", **kw), mixed.generate("a red circle", **kw)
    assert torch.equal(a.image_embeds, b.image_embeds)
    assert psnr(a.images[0], b.images[0]) >= 20  # bfloat16 keeps 8 bits of mantissa
    with pytest.raises(ValueError, match="prior_dtype must be"):
        UnCLIP(ours, prior_dtype=torch.int8)


def test_cli_writes_one_png_per_image(ours, tmp_path, capsys):
    save_model(ours, ours.cfg, tmp_path / "m")
    out = tmp_path / "img" / "out.png"
    code = main(["a red circle", "--model", str(tmp_path / "m"), "-o", str(out), "--num-images", "2", "--seed", "1",
                 "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2", "--no-progress"])
    assert code == 0
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["out-0.png", "out-1.png"]
    assert Image.open(out.parent / "out-0.png").size == (64, 64)
    assert (out.parent / "out-0.png").stat().st_mode & 0o044 == 0o044  # readable by others, as a plain save
    mixed = tmp_path / "mixed.png"  # the prior's dtype apart from the networks': the same file as in fp32 here
    assert main(["a red circle", "--model", str(tmp_path / "m"), "-o", str(mixed), "--seed", "1", "--dtype", "float32",
                 "--prior-dtype", "float32", "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2",
                 "--no-progress", "--num-images", "2"]) == 0
    assert (tmp_path / "mixed-0.png").read_bytes() == (out.parent / "out-0.png").read_bytes()


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert main(["x", "--model", str(tmp_path)]) == 2
    assert "not an unclip-rt model folder" in capsys.readouterr().err
    assert main(["x", "--prior-steps", "0"]) == 2
    assert "--prior-steps must be" in capsys.readouterr().err


def test_a_truncated_weights_file_is_refused_naming_it(ours, tmp_path, capsys):
    save_model(ours, ours.cfg, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(IntegrityError, match="model.safetensors: its content differs"):
        UnCLIP(tmp_path / "m", device="cpu")
    assert main(["x", "--model", str(tmp_path / "m")]) == 2
    assert "content differs" in capsys.readouterr().err
    (tmp_path / "m" / "checksums.json").unlink()  # no record: the reader still refuses a truncated file
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or damaged"):
        UnCLIP(tmp_path / "m", device="cpu")


def test_cli_warns_when_a_prompt_is_cut_to_77_tokens(ours, tmp_path, caplog):
    save_model(ours, ours.cfg, tmp_path / "m")
    words = " ".join(f"word{i}" for i in range(120))
    with caplog.at_level("WARNING", logger="runtime"):
        code = main([words, "--model", str(tmp_path / "m"), "-o", str(tmp_path / "o.png"), "--prior-steps", "1",
                     "--decoder-steps", "1", "--super-res-steps", "2", "--no-progress"])
    assert code == 0
    assert "prompt cut to 77 tokens; dropped:" in caplog.text
    dropped = caplog.text.split("dropped:")[1].split("(kept:")[0]
    assert "1 1 9" in dropped and "word 0 " not in dropped  # BPE reads word119 as "word 1 1 9"
