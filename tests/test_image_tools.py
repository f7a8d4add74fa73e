"""The image tools: slerp and text-diff math, image inputs, DDIM inversion of the shipped default
model, and variations / interpolation / text diffs through the torch and onnxruntime backends."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import UnCLIP
from runtime.edits import slerp, text_diff_direction
from runtime.images import load_images
from runtime.pipeline import DEFAULT_MODEL, load_folder
from tests.metrics import psnr
from train.data import HELD_OUT, render, sample_scene

# --- slerp -----------------------------------------------------------------------------------

def test_slerp_keeps_the_norm_of_equal_norm_inputs_and_hits_the_endpoints_exactly():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    b = b * (a.norm() / b.norm())
    t = torch.linspace(0, 1, 11)
    path = slerp(a, b, t)
    assert path.shape == (11, 64)
    assert torch.allclose(path.norm(dim=-1), a.norm().expand(11), rtol=1e-6)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    # constant angular speed: equal steps subtend equal angles
    cos = torch.nn.functional.cosine_similarity(path[:-1].double(), path[1:].double(), dim=-1)
    assert torch.allclose(cos, cos[0].expand_as(cos), atol=1e-6)


def test_slerp_interpolates_norms_linearly_and_handles_parallel_and_antiparallel_vectors():
    a = torch.tensor([3.0, 4.0, 0.0])
    t = torch.tensor([0.0, 0.5, 1.0])
    parallel = slerp(a, 2 * a, t)
    assert torch.allclose(parallel[1], 1.5 * a) and torch.equal(parallel[2], 2 * a)
    anti = slerp(a, -a, t)
    assert torch.isfinite(anti).all() and torch.equal(anti[0], a) and torch.equal(anti[2], -a)
    assert abs(float(anti[1] @ a)) < 1e-5 and torch.allclose(anti.norm(dim=-1), torch.full((3,), 5.0))
    axis = torch.tensor([2.0, 0.0, 0.0])  # antiparallel along the axis the fallback would use
    mid = slerp(axis, -axis, 0.5)
    assert torch.isfinite(mid).all() and abs(float(mid @ axis)) < 1e-5 and abs(float(mid.norm()) - 2) < 1e-5
    with pytest.raises(ValueError, match="non-zero"):
        slerp(torch.zeros(3), a, 0.5)


def test_text_diff_direction_is_a_unit_vector_from_one_caption_to_the_other():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    d = text_diff_direction(x, y)
    assert abs(float(d.norm()) - 1) < 1e-6
    assert float(d @ (y / y.norm() - x / x.norm())) > 0
    with pytest.raises(ValueError, match="same CLIP text embedding"):
        text_diff_direction(x, 2 * x)


# --- image inputs ----------------------------------------------------------------------------

def test_images_of_any_mode_size_and_dtype_are_converted(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    inputs = [Image.fromarray(rgb), Image.fromarray(rgb).convert("L"), Image.fromarray(rgb).convert("RGBA"),
              Image.fromarray(rgb).convert("P"), rgb, rgb[..., 0], rgb.astype(np.float32) / 255, str(path),
              torch.from_numpy(rgb).permute(2, 0, 1), torch.rand(1, 20, 30)]
    images = load_images(inputs)
    assert all(t.shape == (3, 20, 30) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1 for t in images)
    assert torch.allclose(images[0], images[7]) and torch.allclose(images[0], images[6])
    assert len(load_images(torch.rand(3, 3, 8, 8))) == 3


def test_bad_images_fail_clearly(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image file .*bad.png"):
        load_images(str(bad))
    with pytest.raises(ValueError, match="NaN"):
        load_images(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_images(np.full((4, 4, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_images(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="PIL image"):
        load_images(42)
    with pytest.raises(ValueError, match="no images"):
        load_images([])


# --- on the default model, both backends ----------------------------------------------------

@pytest.fixture(scope="module")
def pipes(default_engine_dir):
    model = load_folder(DEFAULT_MODEL)
    torch_pipe = UnCLIP(model, backend="torch", device="cpu", progress=False)
    ort_pipe = UnCLIP(load_folder(DEFAULT_MODEL), engine_dir=default_engine_dir[0], backend="onnxruntime",
                      device="cpu", progress=False)
    return {"torch": torch_pipe, "onnxruntime": ort_pipe}


@pytest.fixture(scope="module")
def scenes():
    """Rendered held-out scenes, [N, 3, 64, 64] in [0, 1]."""
    rng = random.Random(0)
    return (render([sample_scene(rng, c) for c in HELD_OUT[:2]], 64, "cpu") + 1) / 2


def test_inversion_reconstructs_the_decoder_image_on_both_backends(pipes, scenes):
    latents = {}
    for name, pipe in pipes.items():
        inv = pipe.invert(scenes[0])
        assert inv.steps == 100 and inv.latents.shape == (1, 3, 64, 64) and torch.isfinite(inv.latents).all()
        rec = pipe.decode(inv.image_embeds, inv.latents, super_res=False, output_type="pt").images
        assert psnr(rec[0], scenes[0]) >= 30, name
        latents[name] = inv.latents
    assert torch.allclose(latents["torch"], latents["onnxruntime"], atol=1e-2)


def test_the_tools_give_the_same_images_on_both_backends(pipes, scenes):
    a, b = scenes[0], scenes[1]
    runs = {}
    for name, pipe in pipes.items():
        runs[name] = [
            pipe.variations(a, n=2, seed=3, super_res=False, output_type="pt").images,
            pipe.variations(a, n=2, eta=1.0, steps=8, seed=3, super_res=False, output_type="pt").images,
            pipe.interpolate(a, b, steps=3, ddim_steps=8, super_res=False, output_type="pt").images,
            pipe.interpolate(a, b, steps=3, path="fixed_noise", seed=4, ddim_steps=8, output_type="pt").images,
            pipe.text_diff(a, "a red circle on a blue background", "a green circle on a blue background",
                           amounts=(0.0, 0.5), ddim_steps=8, super_res=False, output_type="pt").images,
        ]
    shapes = [(2, 3, 64, 64), (2, 3, 64, 64), (3, 3, 64, 64), (3, 3, 256, 256), (2, 3, 64, 64)]
    for i, (x, y) in enumerate(zip(runs["torch"], runs["onnxruntime"], strict=True)):
        assert x.shape == y.shape == shapes[i] and psnr(x, y) >= 40, i
    variations, eta_variations, inverted, _, diff = runs["torch"]
    assert psnr(variations[0], variations[1]) < 30  # different noise, different layouts
    assert psnr(eta_variations[0], eta_variations[1]) < 40
    assert psnr(diff[0], diff[1]) < 40  # the text diff moved the image
    # the same inverted latents decode the same way whichever tool asks
    pipe = pipes["torch"]
    inv = pipe.invert(a, steps=8)
    direct = pipe.decode(inv.image_embeds, inv.latents, steps=8, super_res=False, output_type="pt").images
    assert psnr(inverted[0], direct[0]) >= 60 and psnr(diff[0], direct[0]) >= 60


def test_eta_zero_variations_reconstruct_and_bad_arguments_fail_before_any_network(pipes, scenes, monkeypatch):
    pipe = pipes["torch"]
    same = pipe.variations(scenes[0], n=2, eta=0.0, steps=8, super_res=False, output_type="pt").images
    assert torch.equal(same[0], same[1])
    monkeypatch.setitem(pipe.engines, "decoder_step", lambda *a: pytest.fail("a network ran despite bad input"))
    embeds = torch.zeros(1, pipe.cfg.clip.embed_dim)
    cases = [
        (lambda: pipe.text_diff(scenes[0], "a", "b", amounts=(0.0, 1.5)), ValueError, "amounts"),
        (lambda: pipe.text_diff(scenes[0], "a", None), TypeError, "to_caption"),
        (lambda: pipe.interpolate(scenes[0], scenes[1], path="linear"), ValueError, "path"),
        (lambda: pipe.interpolate(scenes[0], scenes[1], steps=1), ValueError, "steps"),
        (lambda: pipe.variations(scenes[0], n=0), ValueError, "n must be"),
        (lambda: pipe.decode(embeds, eta=-1), ValueError, "eta"),
        (lambda: pipe.decode(embeds, torch.zeros(1, 3, 32, 32)), ValueError, "latents must have shape"),
        (lambda: pipe.decode(torch.full_like(embeds, float("nan"))), ValueError, "NaN"),
        (lambda: pipe.decode(torch.zeros(1, 7)), ValueError, "image_embeds must have shape"),
        (lambda: pipe.invert(scenes[0], steps=1), ValueError, "steps"),
        (lambda: pipe.invert("no/such/file.png"), ValueError, "cannot read image file"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_the_tool_commands_write_their_outputs(scenes, tmp_path, capsys):
    from safetensors.torch import load_file

    from runtime.__main__ import main

    image = tmp_path / "in.png"
    Image.fromarray((scenes[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(image)
    common = ["--device", "cpu", "--no-progress"]
    assert main(["invert", str(image), "--steps", "4", "-o", str(tmp_path / "z.safetensors"), *common]) == 0
    saved = load_file(str(tmp_path / "z.safetensors"))
    assert saved["latents"].shape == (1, 3, 64, 64) and saved["image_embeds"].shape[0] == 1
    assert main(["variations", str(image), "-n", "2", "--low-res", "--seed", "1", "-o", str(tmp_path / "v.png"),
                 *common]) == 0
    assert (tmp_path / "v-0.png").is_file() and (tmp_path / "v-1.png").is_file()
    assert main(["text-diff", str(image), "--from", "a", "--to", "b", "--amounts", "0,x", "-o",
                 str(tmp_path / "d.png"), *common]) == 2
    assert "--amounts" in capsys.readouterr().err
