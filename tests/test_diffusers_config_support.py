"""diffusers folders the loader does not understand (#29 item 9): every config value our modules
do not implement is refused naming the file and key (Karlo's own values keep loading); a
variations-only folder says what is missing; a text encoder smaller than the tokenizer's
vocabulary is refused at load, not with an IndexError in generate."""

from __future__ import annotations

import json
import shutil

import pytest

from models.convert.diffusers_folder import load_diffusers


@pytest.fixture()
def folder(diffusers_folder, tmp_path):
    out = tmp_path / "pipe"
    shutil.copytree(diffusers_folder[1], out)
    return out


def _edit(folder, component, key, value):
    path = folder / component / "config.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("component", "key", "value"), [
    ("decoder", "attention_head_dim", [8, 16]), ("decoder", "norm_num_groups", 16), ("decoder", "norm_eps", 1e-6),
    ("decoder", "flip_sin_to_cos", False), ("decoder", "freq_shift", 1), ("decoder", "act_fn", "gelu"),
    ("decoder", "resnet_out_scale_factor", 2.0), ("decoder", "resnet_skip_time_act", True),
    ("decoder", "center_input_sample", True), ("decoder", "time_embedding_act_fn", "silu"),
    ("super_res_first", "norm_num_groups", 16), ("super_res_first", "flip_sin_to_cos", False),
    ("super_res_last", "center_input_sample", True), ("prior", "time_embed_act_fn", "gelu"),
    ("text_encoder", "layer_norm_eps", 1e-6), ("text_encoder", "vocab_size", 1000),
])
def test_unimplemented_values_are_refused_naming_the_key(folder, component, key, value):
    _edit(folder, component, key, value)
    with pytest.raises(ValueError, match=rf"{component}/config.json: {key}="):
        load_diffusers(folder)


def test_karlos_values_keep_loading_and_a_uniform_head_list_is_accepted(folder):
    _edit(folder, "decoder", "attention_head_dim", [16, 16, 16])
    load_diffusers(folder)


def test_a_variations_only_folder_says_what_is_missing(folder):
    shutil.rmtree(folder / "prior")
    with pytest.raises(FileNotFoundError, match="lacks the component.*prior.*variations-only"):
        load_diffusers(folder)
