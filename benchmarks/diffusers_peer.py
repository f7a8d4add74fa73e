"""The peer: diffusers' unCLIP pipeline and modules (diffusers 0.42 `UnCLIPPipeline`) built at
any of our configs with random weights, and our `UnCLIPModel` converted from the very same weights.

The tests compare our modules with these at the `tiny` config (the reference implementation);
`benchmarks/latency.py` times them at Karlo's. Every parameter is randomised, including those
diffusers initialises to zero, so each weight influences a comparison.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import PriorTransformer, UnCLIPPipeline, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from export.build_engines import fill_zero_layers
from models.configs import UnCLIPConfig
from models.convert.diffusers_folder import model_from_states
from models.super_res import SuperRes
from models.unclip import UnCLIPModel


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a random value of a sensible scale (fan-in scaled matrices), drawn
    where the module lives (a CPU module draws the same values on every machine)."""
    device = next(module.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=device)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module.eval()


def scale_output(unet: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Shrink the last conv so ε has a trained network's scale (~N(0, 1) and below).

    With unit-gain random weights ε is several times too large; guidance then saturates most
    pixels at ±1, and the constant regions make GroupNorm divide by ~√eps in the next stage, an
    ill-conditioned model whose outputs move by 0.3 for a 1e-4 change of input.
    """
    with torch.no_grad():
        unet.conv_out.weight.mul_(factor)
        unet.conv_out.bias.mul_(factor)
    return unet


def build_text_encoder(cfg: UnCLIPConfig, seed: int) -> CLIPTextModelWithProjection:
    c = cfg.clip
    hf = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.text_width, intermediate_size=4 * c.text_width,
        num_attention_heads=c.text_heads, num_hidden_layers=c.text_layers,
        max_position_embeddings=c.context_length, projection_dim=c.embed_dim, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )
    return randomize(CLIPTextModelWithProjection(hf), seed)


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """An HF CLIPTokenizer with open_clip's BPE vocabulary (no download), pad "!" as diffusers'."""
    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def build_prior(cfg: UnCLIPConfig, seed: int) -> PriorTransformer:
    p = cfg.prior
    prior = PriorTransformer(
        num_attention_heads=p.heads, attention_head_dim=p.width // p.heads, num_layers=p.layers,
        embedding_dim=p.clip_dim, num_embeddings=p.text_ctx,
    )
    randomize(prior, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        mean = torch.randn(prior.clip_mean.shape, generator=g, device="cpu")
        std = 0.5 + torch.rand(prior.clip_std.shape, generator=g, device="cpu")
        prior.clip_mean.copy_(mean.to(prior.clip_mean.device))
        prior.clip_std.copy_(std.to(prior.clip_std.device))
    return prior


def _block_out(unet_cfg) -> tuple[int, ...]:
    return tuple(unet_cfg.model_channels * m for m in unet_cfg.channel_mult)


def build_decoder(cfg: UnCLIPConfig, seed: int) -> UNet2DConditionModel:
    d = cfg.decoder
    levels = len(d.channel_mult)
    attn = [2**i in d.attention_ds for i in range(levels)]
    down = tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn)
    up = tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn))
    unet = UNet2DConditionModel(
        sample_size=d.image_size, layers_per_block=d.num_res_blocks, down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=_block_out(d),
        in_channels=d.in_channels, out_channels=d.out_channels, cross_attention_dim=d.context_width,
        class_embed_type="identity", attention_head_dim=d.num_head_channels, resnet_time_scale_shift="scale_shift",
    )
    scale_output(randomize(unet, seed), 0.1)
    with torch.no_grad():  # keep the learned-range value v well inside [-1, 1], as a trained decoder's
        unet.conv_out.weight[3:].mul_(0.2)
        unet.conv_out.bias[3:].mul_(0.2)
    return unet


def build_text_proj(cfg: UnCLIPConfig, seed: int) -> UnCLIPTextProjModel:
    t = cfg.text_proj
    proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=t.clip_tokens, clip_embeddings_dim=t.clip_dim,
        time_embed_dim=t.time_embed_dim, cross_attention_dim=t.context_width,
    )
    return randomize(proj, seed)


def build_super_res(cfg: UnCLIPConfig, seed: int) -> UNet2DModel:
    s = cfg.super_res[0].unet  # diffusers' UnCLIPPipeline has one super-res stage: the chain's first
    levels = len(s.channel_mult)
    unet = UNet2DModel(
        sample_size=s.image_size, layers_per_block=s.num_res_blocks,
        down_block_types=("ResnetDownsampleBlock2D",) * levels, up_block_types=("ResnetUpsampleBlock2D",) * levels,
        block_out_channels=_block_out(s), in_channels=s.in_channels, out_channels=s.out_channels, add_attention=False,
    )
    return scale_output(randomize(unet, seed), 0.1)


def build_pipeline(cfg: UnCLIPConfig, tokenizer_dir: Path, seed: int = 0) -> UnCLIPPipeline:
    """A whole diffusers `UnCLIPPipeline` with the schedulers of kakaobrain/karlo-v1-alpha."""
    return UnCLIPPipeline(
        prior=build_prior(cfg, seed),
        decoder=build_decoder(cfg, seed + 10),
        text_encoder=build_text_encoder(cfg, seed + 20),
        tokenizer=build_tokenizer(tokenizer_dir),
        text_proj=build_text_proj(cfg, seed + 30),
        super_res_first=build_super_res(cfg, seed + 40),
        super_res_last=build_super_res(cfg, seed + 50),
        prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
            clip_sample=True, clip_sample_range=5.0,
        ),
        decoder_scheduler=UnCLIPScheduler(
            variance_type="learned_range", prediction_type="epsilon", num_train_timesteps=1000
        ),
        super_res_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="epsilon", num_train_timesteps=1000
        ),
    )


def ours_from_pipeline(pipe: UnCLIPPipeline, cfg: UnCLIPConfig, seed: int = 60) -> UnCLIPModel:
    """Our `UnCLIPModel` holding the pipeline's weights (converted as from a saved folder). The
    pipeline has one super-res stage; a longer chain's later stages (the `paper` config's
    256 → 1024) get random weights of their own, every layer non-zero."""
    one_stage = replace(cfg, super_res=cfg.super_res[:1])
    model = model_from_states(one_stage, {
        "text_encoder": pipe.text_encoder.state_dict(), "prior": pipe.prior.state_dict(),
        "decoder": pipe.decoder.state_dict(), "text_proj": pipe.text_proj.state_dict(),
        "super_res_first": pipe.super_res_first.state_dict(), "super_res_last": pipe.super_res_last.state_dict(),
    })
    if len(cfg.super_res) == 1:
        return model
    torch.manual_seed(seed)
    with torch.device(next(model.parameters()).device):
        later = [fill_zero_layers(SuperRes(stage).to(next(model.parameters()).dtype)) for stage in cfg.super_res[1:]]
    state = {**model.state_dict(), **{f"super_res.{i + 1}.{k}": v for i, stage in enumerate(later)
                                      for k, v in stage.state_dict().items()}}
    return UnCLIPModel.from_state(cfg, state, "the peer's weights and random later super-res stages")
