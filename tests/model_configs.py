"""Model configs the tests build with random weights, beside the shipped presets."""

from __future__ import annotations

from dataclasses import replace

from models.configs import DEFAULT, UnCLIPConfig


def wide_default_config() -> UnCLIPConfig:
    """The default config with 64-channel UNets: two channels per group in every norm, which ONNX
    Runtime's CUDA GroupNorm takes (the default model's 32 channels in 32 groups it refuses)."""
    sr = DEFAULT.super_res[0]
    return replace(DEFAULT, name="default-wide", text_proj=replace(DEFAULT.text_proj, time_embed_dim=256),
                   decoder=replace(DEFAULT.decoder, model_channels=64),
                   super_res=(replace(sr, unet=replace(sr.unet, model_channels=64)),))
