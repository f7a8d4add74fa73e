"""diffusers UNet / prior / text-projection state dicts → our (Karlo-layout) state dicts.

The inverse of the published mapping in diffusers' `scripts/convert_kakao_brain_unclip_to_diffusers.py`
(see `shared/KARLO_SPEC.md` §5): block indices are derived from the `UNetConfig`, and the split
q/k/v (and added k/v) projections are re-interleaved per head into Karlo's fused `qkv` layout.
"""

from __future__ import annotations

import torch

from models.configs import PriorConfig, UNetConfig

RES_PARAMS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def interleave_heads(parts: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """Concatenate per-head: rows [p0 head0, p1 head0, …, p0 head1, p1 head1, …]."""
    rows = parts[0].shape[0]
    heads = rows // head_dim
    stacked = torch.stack([p.reshape(heads, head_dim, *p.shape[1:]) for p in parts], dim=1)
    return stacked.reshape(len(parts) * rows, *parts[0].shape[1:])


def unet_block_pairs(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(diffusers prefix, our prefix, kind) for every block; kind is plain/res/attn."""
    levels, per = len(cfg.channel_mult), cfg.num_res_blocks
    pairs = [
        ("time_embedding.linear_1", "time_embed.0", "plain"),
        ("time_embedding.linear_2", "time_embed.2", "plain"),
        ("conv_in", "input_blocks.0.0", "plain"),
        ("conv_norm_out", "out.0", "plain"),
        ("conv_out", "out.2", "plain"),
    ]
    k = 1
    for level in range(levels):
        attn = 2**level in cfg.attention_ds
        for r in range(per):
            pairs.append((f"down_blocks.{level}.resnets.{r}", f"input_blocks.{k}.0", "res"))
            if attn:
                pairs.append((f"down_blocks.{level}.attentions.{r}", f"input_blocks.{k}.1", "attn"))
            k += 1
        if level != levels - 1:
            pairs.append((f"down_blocks.{level}.downsamplers.0", f"input_blocks.{k}.0", "res"))
            k += 1
    pairs.append(("mid_block.resnets.0", "middle_block.0", "res"))
    if cfg.middle_attention:
        pairs.append(("mid_block.attentions.0", "middle_block.1", "attn"))
    pairs.append(("mid_block.resnets.1", f"middle_block.{2 if cfg.middle_attention else 1}", "res"))
    k = 0
    for b, level in enumerate(reversed(range(levels))):
        attn = 2**level in cfg.attention_ds
        for r in range(per + 1):
            pairs.append((f"up_blocks.{b}.resnets.{r}", f"output_blocks.{k}.0", "res"))
            if attn:
                pairs.append((f"up_blocks.{b}.attentions.{r}", f"output_blocks.{k}.1", "attn"))
            if level and r == per:
                pairs.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{k}.{2 if attn else 1}", "res"))
            k += 1
    return pairs


def _take(state: dict, prefix: str) -> dict:
    """Pop every `prefix.*` entry of `state`, keyed by the remainder."""
    keys = [k for k in state if k.startswith(prefix + ".")]
    return {k[len(prefix) + 1 :]: state.pop(k) for k in keys}


def unet_from_diffusers(state: dict, cfg: UNetConfig) -> dict:
    """Convert a diffusers `UNet2DConditionModel`/`UNet2DModel` state dict to our `UNet` keys.

    Keys left unconverted raise KeyError listing them (nothing is silently dropped).
    """
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    hd = cfg.num_head_channels
    for src, dst, kind in unet_block_pairs(cfg):
        part = _take(state, src)
        if kind == "plain":
            out.update({f"{dst}.{k}": v for k, v in part.items()})
        elif kind == "res":
            for k, v in part.items():
                name, param = k.rsplit(".", 1)
                out[f"{dst}.{RES_PARAMS[name]}.{param}"] = v
        else:
            out[f"{dst}.norm.weight"] = part["group_norm.weight"]
            out[f"{dst}.norm.bias"] = part["group_norm.bias"]
            for param in ("weight", "bias"):
                qkv = [part[f"to_{n}.{param}"] for n in "qkv"]
                out[f"{dst}.qkv.{param}"] = interleave_heads(qkv, hd)
                out[f"{dst}.proj_out.{param}"] = part[f"to_out.0.{param}"]
                if f"add_k_proj.{param}" in part:
                    kv = [part[f"add_{n}_proj.{param}"] for n in "kv"]
                    out[f"{dst}.encoder_kv.{param}"] = interleave_heads(kv, hd)
            for name in ("qkv", "proj_out", "encoder_kv"):
                if f"{dst}.{name}.weight" in out:
                    out[f"{dst}.{name}.weight"] = out[f"{dst}.{name}.weight"][..., None]
    if state:
        raise KeyError(f"diffusers UNet keys not converted: {sorted(state)[:20]}")
    return out


TEXT_PROJ_NAMES = {
    "embedding_proj": "text_feat_proj",
    "clip_image_embeddings_project_to_time_embeddings": "clip_emb",
    "clip_extra_context_tokens_proj": "clip_tok_proj",
    "encoder_hidden_states_proj": "text_seq_proj.0",
    "text_encoder_hidden_states_norm": "text_seq_proj.1",
}


def text_proj_from_diffusers(state: dict) -> dict:
    """diffusers `UnCLIPTextProjModel` → our `TextProjection`."""
    out = {"cf_param": state["learned_classifier_free_guidance_embeddings"]}
    for k, v in state.items():
        if k == "learned_classifier_free_guidance_embeddings":
            continue
        module, param = k.rsplit(".", 1)
        out[f"{TEXT_PROJ_NAMES[module]}.{param}"] = v
    return out


PRIOR_NAMES = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "proj_in": "clip_img_proj",
    "embedding_proj": "text_emb_proj",
    "encoder_hidden_states_proj": "text_enc_proj",
    "norm_out": "final_ln",
    "proj_to_clip_embeddings": "out_proj",
}
PRIOR_BLOCK_NAMES = {
    "attn1.to_out.0": "attn.c_proj",
    "ff.net.0.proj": "mlp.c_fc",
    "ff.net.2": "mlp.c_proj",
    "norm1": "ln_1",
    "norm3": "ln_2",
}


def prior_from_diffusers(state: dict, cfg: PriorConfig) -> dict:
    """diffusers `PriorTransformer` → our `Prior` (stats included, as [1, D] buffers)."""
    state = dict(state)
    out = {
        "positional_embedding": state.pop("positional_embedding"),
        "prd_emb": state.pop("prd_embedding"),
        "clip_mean": state.pop("clip_mean").reshape(1, -1),
        "clip_std": state.pop("clip_std").reshape(1, -1),
    }
    hd = cfg.width // cfg.heads
    for i in range(cfg.layers):
        block = _take(state, f"transformer_blocks.{i}")
        dst = f"transformer.resblocks.{i}"
        for param in ("weight", "bias"):
            qkv = [block.pop(f"attn1.to_{n}.{param}") for n in "qkv"]
            out[f"{dst}.attn.c_qkv.{param}"] = interleave_heads(qkv, hd)
        for k, v in block.items():
            module, param = k.rsplit(".", 1)
            out[f"{dst}.{PRIOR_BLOCK_NAMES[module]}.{param}"] = v
    for k, v in state.items():
        module, param = k.rsplit(".", 1)
        out[f"{PRIOR_NAMES[module]}.{param}"] = v
    return out
