"""Load a diffusers unCLIP folder (`kakaobrain/karlo-v1-alpha` layout) into `UnCLIPModel`.

Reads each component's `config.json` to derive our `UnCLIPConfig` (so any unCLIP trained with
diffusers' classes loads, not only Karlo's shapes), its weights (safetensors preferred, else
`.bin` through `torch.load(weights_only=True)`), and the schedulers' clip ranges. The folder's
tokenizer is not used: it is CLIP's BPE vocabulary, which open_clip ships too.
"""

from __future__ import annotations

import json
from pathlib import Path

from models.checkpoint import load_tensors
from models.configs import DiffusionConfig, PriorConfig, SuperResConfig, TextProjConfig, UnCLIPConfig, UNetConfig
from models.convert.diffusers_unet import prior_from_diffusers, text_proj_from_diffusers, unet_from_diffusers
from models.convert.hf_clip import text_config_from_hf, text_from_hf, vision_from_hf
from models.unclip import UnCLIPModel

WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin",
)
ATTN_DOWN = "SimpleCrossAttnDownBlock2D"

# The values each component's config may hold for a key our modules implement one way only (Karlo's);
# a folder asking for anything else is refused naming the key rather than loading into a model
# that computes something other than what its config says. Absent keys take diffusers' defaults,
# which are these values.
_UNET_FIXED = {
    "norm_num_groups": (32,), "norm_eps": (1e-5,), "flip_sin_to_cos": (True,), "freq_shift": (0,),
    "act_fn": ("silu",), "center_input_sample": (False,), "time_embedding_type": ("positional",),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "upcast_attention": (False,), "dual_cross_attention": (False,), "use_linear_projection": (False,),
    "only_cross_attention": (False,), "time_cond_proj_dim": (None,), "timestep_post_act": (None,),
    "class_embeddings_concat": (False,), "addition_embed_type": (None,), "encoder_hid_dim": (None,),
    "resnet_out_scale_factor": (1,), "resnet_skip_time_act": (False,), "time_embedding_act_fn": (None,),
    "cross_attention_norm": (None,), "attention_type": ("default",),
}
SUPPORTED = {
    "decoder": {**_UNET_FIXED, "class_embed_type": ("identity",)},
    "super_res_first": {**_UNET_FIXED, "class_embed_type": (None,)},
    "super_res_last": {**_UNET_FIXED, "class_embed_type": (None,)},
    "prior": {"time_embed_act_fn": ("silu",), "norm_in_type": (None,), "embedding_proj_norm_type": (None,),
              "encoder_hid_proj_type": ("linear",), "added_emb_type": ("prd",), "additional_embeddings": (4,)},
    "text_encoder": {"layer_norm_eps": (1e-5,), "hidden_act": ("quick_gelu",)},
}
TOKENIZER_VOCAB = 49408  # CLIP's BPE vocabulary, which the tokenizer emits ids from


def check_supported(component: str, config: dict, path: Path) -> None:
    """Refuse config values our modules do not implement, naming the file and the key."""
    for key, allowed in SUPPORTED.get(component, {}).items():
        if key in config and config[key] not in allowed:
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (this loader implements "
                             f"{' or '.join(repr(a) for a in allowed)}, as Karlo)")
    head = config.get("attention_head_dim")
    if isinstance(head, list) and len(set(head)) > 1:
        raise ValueError(f"{path}: attention_head_dim={head!r} (a different head width per level) is not supported; "
                         "every level must use the same")
    vocab = config.get("vocab_size")
    if component == "text_encoder" and isinstance(vocab, int) and vocab < TOKENIZER_VOCAB:
        raise ValueError(f"{path}: vocab_size={vocab} is smaller than the CLIP tokenizer's {TOKENIZER_VOCAB} ids")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (is this a diffusers unCLIP folder? it needs the components "
                                f"{', '.join(COMPONENTS)}; a variations-only folder has no prior and cannot make "
                                "images from text)")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a JSON object")
    component = path.parent.name
    check_supported(component, data, path)
    return data


def _weights(folder: Path) -> dict:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return load_tensors(folder / name)
    raise FileNotFoundError(f"no weights in {folder} (looked for {', '.join(WEIGHT_FILES)})")


def _scheduler(root: Path, name: str, default: DiffusionConfig) -> DiffusionConfig:
    path = root / name / "scheduler_config.json"
    if not path.is_file():
        return default
    s = json.loads(path.read_text())
    if s.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
        raise ValueError(f"{path}: only the squaredcos_cap_v2 schedule is supported")
    return DiffusionConfig(
        prediction=s.get("prediction_type", default.prediction),
        variance=s.get("variance_type", default.variance),
        clip_range=float(s.get("clip_sample_range", default.clip_range)) if s.get("clip_sample", True) else None,
        num_train_timesteps=int(s.get("num_train_timesteps", default.num_train_timesteps)),
    )


def _unet_config(c: dict, diffusion: DiffusionConfig, context: bool) -> UNetConfig:
    boc = c["block_out_channels"]
    if any(ch % boc[0] for ch in boc):
        raise ValueError(f"block_out_channels {boc} are not multiples of the first")
    down = c["down_block_types"]
    attention_ds = tuple(2**i for i, t in enumerate(down) if t == ATTN_DOWN)
    middle_attention = context and c.get("mid_block_type") == "UNetMidBlock2DSimpleCrossAttn"
    head = c.get("attention_head_dim") or 64  # a per-level list is refused unless uniform (check_supported)
    if not (attention_ds or middle_attention):
        head = UNetConfig.num_head_channels  # unused without attention; keep the default
    return UNetConfig(
        image_size=c["sample_size"],
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        model_channels=boc[0],
        channel_mult=tuple(ch // boc[0] for ch in boc),
        num_res_blocks=c["layers_per_block"],
        attention_ds=attention_ds,
        num_head_channels=head if isinstance(head, int) else head[0],
        use_scale_shift_norm=c.get("resnet_time_scale_shift") == "scale_shift",
        middle_attention=middle_attention,
        context_width=c.get("cross_attention_dim") if context else None,
        diffusion=diffusion,
    )


def config_from_diffusers(root: str | Path) -> UnCLIPConfig:
    """Derive our config from the component configs of a diffusers unCLIP folder."""
    root = Path(root)
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        hint = " (a variations-only folder has no prior)" if "prior" in missing else ""
        raise FileNotFoundError(f"{root} lacks the component(s) {', '.join(missing)} of a diffusers unCLIP "
                                f"text-to-image folder{hint}")
    _read_json(root / "super_res_last" / "config.json")  # checked like the first stage's
    pc = _read_json(root / "prior" / "config.json")
    text = _read_json(root / "text_encoder" / "config.json")
    vision_path = root / "image_encoder" / "config.json"
    vision = _read_json(vision_path) if vision_path.is_file() else None
    tp = _read_json(root / "text_proj" / "config.json")
    clip = text_config_from_hf(text, vision)
    base = PriorConfig()
    prior = PriorConfig(
        text_ctx=pc.get("num_embeddings", 77),
        width=pc["num_attention_heads"] * pc["attention_head_dim"],
        layers=pc["num_layers"],
        heads=pc["num_attention_heads"],
        clip_dim=pc["embedding_dim"],
        text_width=pc["embedding_dim"],
        diffusion=_scheduler(root, "prior_scheduler", base.diffusion),
    )
    decoder = _unet_config(
        _read_json(root / "decoder" / "config.json"),
        _scheduler(root, "decoder_scheduler", DiffusionConfig("epsilon", "learned_range", 1.0)),
        context=True,
    )
    super_res = SuperResConfig(_unet_config(
        _read_json(root / "super_res_first" / "config.json"),
        _scheduler(root, "super_res_scheduler", DiffusionConfig("epsilon", "fixed_small_log", 1.0)),
        context=False,
    ))
    text_proj = TextProjConfig(
        clip_dim=tp.get("clip_embeddings_dim", 768),
        clip_tokens=tp.get("clip_extra_context_tokens", 4),
        text_width=tp.get("clip_embeddings_dim", 768),
        context_width=tp["cross_attention_dim"],
        time_embed_dim=tp["time_embed_dim"],
    )
    return UnCLIPConfig(f"diffusers:{root.name}", clip, prior, text_proj, decoder, (super_res,))


COMPONENTS = ("text_encoder", "prior", "decoder", "text_proj", "super_res_first", "super_res_last")


def load_diffusers(root: str | Path) -> UnCLIPModel:
    """Build an `UnCLIPModel` with the weights of a diffusers unCLIP folder."""
    root = Path(root)
    cfg = config_from_diffusers(root)  # first: it names missing components and unsupported settings
    states = {name: _weights(root / name) for name in COMPONENTS}
    if (root / "image_encoder").is_dir():
        states["image_encoder"] = _weights(root / "image_encoder")
    return model_from_states(cfg, states, f"diffusers folder {root}")


def model_from_states(cfg: UnCLIPConfig, states: dict[str, dict], what: str = "diffusers components") -> UnCLIPModel:
    """An `UnCLIPModel` from the state dicts of diffusers' components (keyed as the folder's
    sub-folders: `COMPONENTS`, and optionally `image_encoder`)."""
    state = {f"clip.model.{k}": v for k, v in text_from_hf(states["text_encoder"], cfg.clip).items()}
    if "image_encoder" in states:
        vision = vision_from_hf(states["image_encoder"], cfg.clip)
        state.update({f"clip.model.{k}": v for k, v in vision.items()})
    parts = {
        "prior.": prior_from_diffusers(states["prior"], cfg.prior),
        "decoder.unet.": unet_from_diffusers(states["decoder"], cfg.decoder),
        "decoder.text_proj.": text_proj_from_diffusers(states["text_proj"]),
        "super_res.0.first_steps.": unet_from_diffusers(states["super_res_first"], cfg.super_res[0].unet),
        "super_res.0.last_step.": unet_from_diffusers(states["super_res_last"], cfg.super_res[0].unet),
    }
    for prefix, part in parts.items():
        state.update({prefix + k: v for k, v in part.items()})
    return UnCLIPModel.from_state(cfg, state, what)

