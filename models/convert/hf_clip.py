"""Hugging Face `transformers` CLIP state dicts → open_clip's OpenAI-layout CLIP keys.

diffusers' `karlo-v1-alpha` folder stores its text encoder as `CLIPTextModelWithProjection`
(and the image-variations folder its image encoder as `CLIPVisionModelWithProjection`);
our `ClipEncoder` holds open_clip's `CLIP`, so both towers are renamed here, with q/k/v
concatenated into `in_proj_*` and the projections transposed into open_clip's matrices.
"""

from __future__ import annotations

import torch

from models.configs import ClipConfig

LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _encoder_layers(state: dict, layers: int, src: str, dst: str) -> dict:
    out = {}
    for i in range(layers):
        layer = _strip(state, f"{src}.encoder.layers.{i}.")
        for param in ("weight", "bias"):
            out[f"{dst}.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [layer.pop(f"self_attn.{n}_proj.{param}") for n in "qkv"]
            )
        for k, v in layer.items():
            module, param = k.rsplit(".", 1)
            out[f"{dst}.resblocks.{i}.{LAYER_NAMES[module]}.{param}"] = v
    return out


def text_from_hf(state: dict, cfg: ClipConfig) -> dict:
    """`CLIPTextModelWithProjection` state dict → open_clip CLIP text keys (top level)."""
    out = _encoder_layers(state, cfg.text_layers, "text_model", "transformer")
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].t().contiguous()
    return out


def vision_from_hf(state: dict, cfg: ClipConfig) -> dict:
    """`CLIPVisionModelWithProjection` state dict → open_clip CLIP `visual.*` keys."""
    out = _encoder_layers(state, cfg.vision_layers, "vision_model", "visual.transformer")
    emb = "vision_model.embeddings."
    out["visual.class_embedding"] = state[emb + "class_embedding"]
    out["visual.conv1.weight"] = state[emb + "patch_embedding.weight"]
    out["visual.positional_embedding"] = state[emb + "position_embedding.weight"]
    for src, dst in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for param in ("weight", "bias"):
            out[f"visual.{dst}.{param}"] = state[f"vision_model.{src}.{param}"]
    out["visual.proj"] = state["visual_projection.weight"].t().contiguous()
    return out


def text_config_from_hf(text: dict, vision: dict | None) -> ClipConfig:
    """Our `ClipConfig` from HF `CLIPTextConfig` (and optional `CLIPVisionConfig`) JSON dicts."""
    if text.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"unsupported CLIP activation {text['hidden_act']!r} (only quick_gelu)")
    if text["intermediate_size"] != 4 * text["hidden_size"]:
        raise ValueError("CLIP text MLP width must be 4x the hidden size (open_clip mlp_ratio=4)")
    kwargs = dict(
        embed_dim=text["projection_dim"],
        context_length=text["max_position_embeddings"],
        vocab_size=text["vocab_size"],
        text_width=text["hidden_size"],
        text_heads=text["num_attention_heads"],
        text_layers=text["num_hidden_layers"],
    )
    if vision is not None:
        kwargs.update(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            vision_width=vision["hidden_size"],
            vision_layers=vision["num_hidden_layers"],
            vision_head_width=vision["hidden_size"] // vision["num_attention_heads"],
        )
    return ClipConfig(**kwargs)
