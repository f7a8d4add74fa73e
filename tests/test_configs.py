"""models/configs.py and the module shapes: the `karlo` preset reproduces the published
parameter counts; configs are validated; open_clip's ViT-L-14-quickgelu is the karlo CLIP."""

from __future__ import annotations

import dataclasses

import open_clip
import pytest

from models.checkpoint import config_from_dict, config_to_dict
from models.configs import KARLO, TINY, get_config
from models.unclip import UnCLIPModel, count_parameters


def test_karlo_parameter_counts_equal_the_published_ones():
    m = UnCLIPModel.empty(KARLO)
    assert count_parameters(m.prior) == 1_022_028_544
    assert tuple(m.prior.clip_mean.shape) == tuple(m.prior.clip_std.shape) == (1, 768)
    assert count_parameters(m.decoder.unet) == 885_439_686
    assert count_parameters(m.decoder.text_proj) == 7_878_400
    assert count_parameters(m.super_res[0].first_steps) == count_parameters(m.super_res[0].last_step) == 691_579_523
    text_tower = count_parameters(m.clip) - count_parameters(m.clip.model.visual)
    assert round(text_tower / 1e6, 2) == 123.65
    assert round(count_parameters(m.clip.model.visual) / 1e6, 2) == 303.97


def test_karlo_clip_is_open_clip_vit_l_14_quickgelu():
    ref = open_clip.get_model_config("ViT-L-14-quickgelu")
    ours = KARLO.clip.open_clip_model_cfg()
    assert ours["embed_dim"] == ref["embed_dim"] and ours["quick_gelu"] is True is ref["quick_gelu"]
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in ours[tower].items():
            assert ref[tower].get(key, value) == value, (tower, key)


def test_karlo_decoder_block_counts():
    m = UnCLIPModel.empty(KARLO)
    from models.unet import AttentionBlock, ResBlock

    mods = list(m.decoder.unet.modules())
    assert sum(isinstance(x, ResBlock) for x in mods) == 36
    assert sum(isinstance(x, AttentionBlock) for x in mods) == 22
    assert not any(isinstance(x, AttentionBlock) for x in m.super_res.modules())


def test_config_round_trips_through_json_dict():
    for cfg in (KARLO, TINY):
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_inconsistent_config_is_refused_with_the_reason():
    bad_prior = dataclasses.replace(TINY.prior, clip_dim=48)
    with pytest.raises(ValueError, match="prior.clip_dim"):
        dataclasses.replace(TINY, prior=bad_prior)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="karlo"):
        get_config("nope")
    assert get_config("tiny") is TINY


def test_an_empty_karlo_model_initialises_nothing_and_leaves_torch_init_as_it_was():
    """`UnCLIPModel.empty` (the loaders' first step) builds every tensor on the meta device
    without running an initialiser, so a new process does not import `torch._dynamo` (torch's
    Python references on meta tensors do; seconds of a model load on the GPU machine); afterwards
    `torch.nn.init` initialises again."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, torch; from models.unclip import UnCLIPModel; from models.configs import KARLO; "
            "m = UnCLIPModel.empty(KARLO); "
            "assert all(p.is_meta for p in m.parameters()); "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
    import torch

    UnCLIPModel.empty(TINY)
    filled = torch.nn.init.normal_(torch.zeros(64), std=1.0)
    assert filled.abs().sum() > 0
