"""models/convert/karlo.py: checkpoints in Karlo's original key layout (built from the tiny
diffusers reference by the inverse mapping) load into our modules and match diffusers."""

from __future__ import annotations

import pickle

import pytest
import torch

from models.checkpoint import CheckpointError
from models.configs import TINY
from models.convert.karlo import FILE_PATTERNS, load_karlo
from runtime import UnCLIP
from tests.diffusers_reference import max_rel_err
from tests.karlo_files import NAMES, write_karlo_folder


@pytest.fixture(scope="module")
def karlo_dir(ours, tmp_path_factory):
    return write_karlo_folder(ours.state_dict(), tmp_path_factory.mktemp("karlo"))


def test_written_files_use_karlos_key_names(karlo_dir):
    prior = torch.load(karlo_dir / NAMES["prior"], weights_only=True)["state_dict"]
    decoder = torch.load(karlo_dir / NAMES["decoder"], weights_only=True)["state_dict"]
    sr = torch.load(karlo_dir / NAMES["super_res"], weights_only=True)["state_dict"]
    assert "model.transformer.resblocks.0.attn.c_qkv.weight" in prior and "model.prd_emb" in prior
    assert {"model.input_blocks.0.0.weight", "model.clip_tok_proj.weight", "model.cf_param",
            "model.input_blocks.3.1.encoder_kv.weight", "model.middle_block.1.qkv.weight"} <= decoder.keys()
    assert decoder["model.input_blocks.3.1.qkv.weight"].ndim == 3  # Karlo's 1x1 conv1d layout
    assert {"model_first_steps.out.2.weight", "model_last_step.input_blocks.0.0.weight"} <= sr.keys()
    mean, std = torch.load(karlo_dir / NAMES["stats"], weights_only=True)
    assert mean.shape == std.shape == (TINY.clip.embed_dim,)


def test_karlo_files_load_and_match_diffusers(karlo_dir, diffusers_pipe):
    model = load_karlo(karlo_dir, TINY).eval()
    g = torch.Generator().manual_seed(0)
    b, d = 2, TINY.clip.embed_dim
    embed, tokens = torch.randn(b, d, generator=g), torch.randn(b, 77, TINY.clip.text_width, generator=g)
    mask = torch.zeros(b, 77, dtype=torch.bool)
    mask[:, :6] = True
    x, ts = torch.randn(b, d, generator=g), torch.tensor([999, 300])
    with torch.no_grad():
        ref = diffusers_pipe.prior(x, timestep=ts, proj_embedding=embed, encoder_hidden_states=tokens,
                                   attention_mask=mask).predicted_image_embedding
        assert max_rel_err(model.prior(x, ts, embed, tokens, mask), ref) <= 1e-4
        img_embed = torch.randn(b, d, generator=g)
        hidden, add = diffusers_pipe.text_proj(image_embeddings=img_embed, prompt_embeds=embed,
                                               text_encoder_hidden_states=tokens, do_classifier_free_guidance=False)
        xs = torch.randn(b, 3, 16, 16, generator=g)
        ref = diffusers_pipe.decoder(sample=xs, timestep=ts, encoder_hidden_states=hidden, class_labels=add,
                                     attention_mask=torch.nn.functional.pad(mask, (4, 0), value=True)).sample
        assert max_rel_err(model.decoder(xs, ts, img_embed, embed, tokens, mask), ref) <= 1e-4
        xl, low = torch.randn(b, 3, 64, 64, generator=g), torch.randn(b, 3, 64, 64, generator=g)
        ref = diffusers_pipe.super_res_last(sample=torch.cat([xl, low], 1), timestep=ts).sample
        assert max_rel_err(model.super_res[0](xl, ts, low, last=True), ref) <= 1e-4


def test_karlo_and_diffusers_loads_give_the_same_model_and_image(karlo_dir, ours):
    from_karlo = load_karlo(karlo_dir, TINY)
    a_state, b_state = from_karlo.state_dict(), ours.state_dict()
    assert a_state.keys() == b_state.keys()
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    kw = {"prior_steps": 3, "decoder_steps": 3, "super_res_steps": 2, "seed": 3, "output_type": "np"}
    a = UnCLIP(from_karlo, device="cpu", progress=False).generate("a blue square", **kw).images
    b = UnCLIP(ours, device="cpu", progress=False).generate("a blue square", **kw).images
    # Not bitwise: CPU kernels may round differently for differently aligned (but equal) weights.
    assert abs(a - b).max() <= 1e-3


def test_missing_karlo_file_is_named(tmp_path, karlo_dir):
    for name in ("clip", "stats", "prior", "decoder"):
        (tmp_path / NAMES[name]).write_bytes((karlo_dir / NAMES[name]).read_bytes())
    with pytest.raises(FileNotFoundError, match="super_res"):
        load_karlo(tmp_path, TINY)


def test_checkpoint_with_a_missing_key_lists_it(tmp_path, karlo_dir):
    for name in NAMES.values():
        (tmp_path / name).write_bytes((karlo_dir / name).read_bytes())
    ckpt = torch.load(tmp_path / NAMES["prior"], weights_only=True)
    del ckpt["state_dict"]["model.out_proj.weight"]
    ckpt["state_dict"]["model.surprise"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / NAMES["prior"])
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): prior.out_proj.weight") as info:
        load_karlo(tmp_path, TINY)
    assert "unexpected keys (1): prior.surprise" in str(info.value)


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_refused_without_running(tmp_path, karlo_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in NAMES.values():
        (tmp_path / name).write_bytes((karlo_dir / name).read_bytes())
    with open(tmp_path / NAMES["decoder"], "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(CheckpointError, match="refused because loading it could run code"):
        load_karlo(tmp_path, TINY)
    assert not (tmp_path / "PWNED").exists()


def test_file_patterns_cover_karlos_release_names():
    import fnmatch

    for part, name in NAMES.items():
        assert any(fnmatch.fnmatch(name, pat) for pat in FILE_PATTERNS[part]), part
