"""Named model configurations, as frozen dataclasses.

A configuration is data: every shape of every stage of an unCLIP model, and each stage's
diffusion settings. `karlo` reproduces Kakao Brain's Karlo-v1.0.alpha (see
`shared/KARLO_SPEC.md`); `tiny` keeps the same topology at small widths for tests.
Look a preset up with `get_config(name)`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

# OpenAI CLIP's image normalisation (used by Karlo's i2i preprocessing).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Prediction = Literal["epsilon", "sample"]
Variance = Literal["fixed_small_log", "learned_range"]
Schedule = Literal["squaredcos_cap_v2", "linear"]


@dataclass(frozen=True)
class ClipConfig:
    """An OpenAI-style CLIP (open_clip `CLIP` layout): text tower and vision tower."""

    embed_dim: int = 768
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 768
    text_heads: int = 12
    text_layers: int = 12
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    vision_head_width: int = 64
    quick_gelu: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def open_clip_model_cfg(self) -> dict:
        """The model config dict in open_clip's format (as in its `model_configs/*.json`)."""
        return {
            "embed_dim": self.embed_dim,
            "quick_gelu": self.quick_gelu,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": self.vision_layers,
                "width": self.vision_width,
                "head_width": self.vision_head_width,
                "patch_size": self.patch_size,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


@dataclass(frozen=True)
class DiffusionConfig:
    """How a stage was trained to denoise, and how its samples are clamped."""

    prediction: Prediction
    variance: Variance
    clip_range: float | None  # clamp x0 to ±clip_range; None: no clamp
    num_train_timesteps: int = 1000
    schedule: Schedule = "squaredcos_cap_v2"


@dataclass(frozen=True)
class PriorConfig:
    """The diffusion prior: a causal transformer over [text tokens, text, time, x_t, prd]."""

    text_ctx: int = 77
    width: int = 2048
    layers: int = 20
    heads: int = 32
    clip_dim: int = 768  # CLIP embedding size (input x_t and output x0)
    text_width: int = 768  # width of the CLIP text tokens fed in
    final_ln: bool = True
    # diffusers clamps x0 to +-5 standardised units, Karlo to +-10; the default follows diffusers.
    diffusion: DiffusionConfig = DiffusionConfig("sample", "fixed_small_log", 5.0)

    @property
    def seq_len(self) -> int:
        return self.text_ctx + 4


@dataclass(frozen=True)
class ARPriorConfig:
    """The paper's autoregressive prior (DALL-E 2 §2.2): a causal transformer over [text tokens,
    text embedding, quantised text–image similarity, codes], where the codes are the leading
    `components` PCA coefficients of the CLIP image embedding, each quantised into `buckets`
    equal-mass buckets."""

    text_ctx: int = 77
    width: int = 256
    layers: int = 4
    heads: int = 4
    clip_dim: int = 128  # CLIP embedding size
    text_width: int = 128  # width of the CLIP text tokens fed in
    components: int = 48  # PCA components kept (the paper keeps 319 of 1024)
    buckets: int = 1024  # quantisation buckets per component (as the paper)
    similarity_buckets: int = 64  # buckets of the text–image cosine similarity token

    @property
    def prefix_len(self) -> int:
        """Tokens before the codes' part: the text tokens and the text embedding."""
        return self.text_ctx + 1

    @property
    def seq_len(self) -> int:
        """Prefix, similarity token, then one input token per code but the last."""
        return self.prefix_len + self.components


@dataclass(frozen=True)
class UNetConfig:
    """A guided-diffusion UNet, as used by the decoder and the super-res stages."""

    image_size: int
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_ds: tuple[int, ...] = ()  # downsample rates with attention (1 = full size)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = False
    middle_attention: bool = False
    context_width: int | None = None  # width of the cross-attention context (decoder)
    diffusion: DiffusionConfig = DiffusionConfig("epsilon", "fixed_small_log", 1.0)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclass(frozen=True)
class SuperResConfig:
    """One super-resolution stage of the chain: a UNet that denoises the image at its size given the
    previous stage's image upsampled to it (no text), run for `steps` steps by default, the last of
    them by a separate last-step model where `last_step_model` (Karlo's fine-tuned copy), else by
    the same UNet."""

    unet: UNetConfig
    steps: int = 7
    last_step_model: bool = True
    # Run the UNet on `tile`×`tile` tiles overlapping by `tile_overlap` pixels, blended, instead of
    # the whole image (None): for a stage trained on crops, whose group norms must see crop-sized
    # statistics; tiles also bound the memory of a large stage.
    tile: int | None = None
    tile_overlap: int = 16

    @property
    def image_size(self) -> int:
        return self.unet.image_size

    @property
    def diffusion(self) -> DiffusionConfig:
        return self.unet.diffusion


@dataclass(frozen=True)
class TextProjConfig:
    """Decoder conditioning: extra CLIP context tokens and the time-embedding addition."""

    clip_dim: int = 768
    clip_tokens: int = 4
    text_width: int = 768
    context_width: int = 1536
    time_embed_dim: int = 1280


@dataclass(frozen=True)
class SamplingDefaults:
    """Steps and guidance scales `generate` uses when the caller names none (Karlo's by default;
    a model trained with other settings ships its own in config.json). Each super-res stage's
    steps are its own (`SuperResConfig.steps`)."""

    prior_steps: int = 25
    decoder_steps: int = 25
    prior_guidance_scale: float = 4.0
    decoder_guidance_scale: float = 8.0
    image_size: int | None = None  # the images' size by default: a stage's of the chain (None: the last)

    def with_overrides(self, **given: float | int | None) -> SamplingDefaults:
        """These defaults with every value the caller gave (not None) put in their place."""
        return replace(self, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class UnCLIPConfig:
    """Every stage of one unCLIP model."""

    name: str
    clip: ClipConfig
    prior: PriorConfig
    text_proj: TextProjConfig
    decoder: UNetConfig
    super_res: tuple[SuperResConfig, ...]  # the chain of upsamplers after the decoder, in order (may be empty)
    sampling: SamplingDefaults = SamplingDefaults()
    ar_prior: ARPriorConfig | None = None  # the autoregressive prior, where the model has one

    def __post_init__(self) -> None:
        check_consistent(self)

    @property
    def image_sizes(self) -> tuple[int, ...]:
        """The image size after the decoder and after each super-res stage."""
        return (self.decoder.image_size, *(stage.image_size for stage in self.super_res))

    @property
    def image_size(self) -> int:
        """The size of the images the whole chain makes."""
        return self.image_sizes[-1]

    @property
    def default_image_size(self) -> int:
        """The size of the images `generate` makes unless asked for another (`sampling.image_size`,
        else the whole chain's)."""
        return self.sampling.image_size or self.image_size


def check_consistent(cfg: UnCLIPConfig) -> None:
    """Raise ValueError if the stages of `cfg` cannot be wired together."""
    problems = []
    if cfg.prior.clip_dim != cfg.clip.embed_dim:
        problems.append("prior.clip_dim must equal clip.embed_dim")
    if cfg.prior.text_width != cfg.clip.text_width:
        problems.append("prior.text_width must equal clip.text_width")
    if cfg.prior.text_ctx != cfg.clip.context_length:
        problems.append("prior.text_ctx must equal clip.context_length")
    if cfg.text_proj.clip_dim != cfg.clip.embed_dim:
        problems.append("text_proj.clip_dim must equal clip.embed_dim")
    if cfg.text_proj.text_width != cfg.clip.text_width:
        problems.append("text_proj.text_width must equal clip.text_width")
    if cfg.text_proj.context_width != cfg.decoder.context_width:
        problems.append("text_proj.context_width must equal decoder.context_width")
    if cfg.text_proj.time_embed_dim != cfg.decoder.time_embed_dim:
        problems.append("text_proj.time_embed_dim must equal 4 * decoder.model_channels")
    previous = cfg.decoder.image_size
    for i, stage in enumerate(cfg.super_res):
        if stage.unet.in_channels != 2 * cfg.decoder.in_channels or stage.unet.out_channels != cfg.decoder.in_channels:
            problems.append(f"super_res[{i}] must take twice the image channels in and give the image channels out")
        if stage.image_size <= previous:
            problems.append(f"super_res[{i}].unet.image_size must exceed the size before it ({previous})")
        if stage.unet.context_width is not None:
            problems.append(f"super_res[{i}] has no text conditioning: its unet.context_width must be null")
        if stage.steps < 2:
            problems.append(f"super_res[{i}].steps must be at least 2")
        if stage.tile is not None:
            step = 2 ** (len(stage.unet.channel_mult) - 1)
            if not (0 < stage.tile <= stage.image_size and stage.tile % step == 0
                    and 0 <= stage.tile_overlap < stage.tile // 2):
                problems.append(f"super_res[{i}].tile must be a multiple of {step} up to the image size, its "
                                "overlap under half of it")
        previous = stage.image_size
    stage_unets = [(f"super_res[{i}].unet", stage.unet) for i, stage in enumerate(cfg.super_res)]
    if cfg.sampling.image_size is not None and cfg.sampling.image_size not in (
            cfg.decoder.image_size, *(stage.image_size for stage in cfg.super_res)):
        problems.append("sampling.image_size must be the decoder's or a super-res stage's image size")
    for name, unet in (("decoder", cfg.decoder), *stage_unets):
        levels = len(unet.channel_mult)
        if unet.image_size % 2 ** (levels - 1):
            problems.append(f"{name}.image_size must be divisible by 2**(levels-1)")
        for mult in unet.channel_mult:
            if (unet.model_channels * mult) % 32:
                problems.append(f"{name} channels must be multiples of 32 (GroupNorm32)")
                break
    for name, value in (("prior.heads", cfg.prior.heads), ("clip.text_heads", cfg.clip.text_heads),
                        ("clip.vision_head_width", cfg.clip.vision_head_width)):
        if value < 1:
            problems.append(f"{name} must be >= 1")
    if cfg.prior.heads >= 1 and cfg.prior.width % cfg.prior.heads:
        problems.append("prior.width must be divisible by prior.heads")
    if cfg.clip.text_heads >= 1 and cfg.clip.text_width % cfg.clip.text_heads:
        problems.append("clip.text_width must be divisible by clip.text_heads")
    if cfg.clip.vision_head_width >= 1 and cfg.clip.vision_width % cfg.clip.vision_head_width:
        problems.append("clip.vision_width must be divisible by clip.vision_head_width")
    for name, unet in (("decoder", cfg.decoder), *stage_unets):
        if unet.num_head_channels < 1 or unet.model_channels < 1 or unet.num_res_blocks < 0:
            problems.append(f"{name}: num_head_channels and model_channels must be >= 1, num_res_blocks >= 0")
        else:
            attended = [m for i, m in enumerate(unet.channel_mult) if 2**i in unet.attention_ds]
            if unet.middle_attention and unet.channel_mult:
                attended.append(unet.channel_mult[-1])
            if any((unet.model_channels * m) % unet.num_head_channels for m in attended):
                problems.append(f"{name}: the channels of every level with attention must be divisible by "
                                "num_head_channels")
    ar = cfg.ar_prior
    if ar is not None:
        if (ar.clip_dim, ar.text_width, ar.text_ctx) != (cfg.clip.embed_dim, cfg.clip.text_width,
                                                         cfg.clip.context_length):
            problems.append("ar_prior clip_dim/text_width/text_ctx must match the CLIP's")
        if not 1 <= ar.components <= ar.clip_dim:
            problems.append("ar_prior.components must be in 1..clip_dim")
        if ar.heads < 1 or ar.width % ar.heads:
            problems.append("ar_prior.width must be divisible by ar_prior.heads")
    if problems:
        raise ValueError(f"inconsistent unCLIP config {cfg.name!r}: " + "; ".join(problems))


KARLO = UnCLIPConfig(
    name="karlo",
    clip=ClipConfig(),
    prior=PriorConfig(),
    text_proj=TextProjConfig(),
    decoder=UNetConfig(
        image_size=64,
        in_channels=3,
        out_channels=6,
        model_channels=320,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_ds=(2, 4, 8),
        num_head_channels=64,
        use_scale_shift_norm=True,
        middle_attention=True,
        context_width=1536,
        diffusion=DiffusionConfig("epsilon", "learned_range", 1.0),
    ),
    super_res=(SuperResConfig(UNetConfig(
        image_size=256,
        in_channels=6,
        out_channels=3,
        model_channels=320,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        diffusion=DiffusionConfig("epsilon", "fixed_small_log", 1.0),
    )),),
)

TINY = UnCLIPConfig(
    name="tiny",
    clip=ClipConfig(
        embed_dim=32,
        text_width=32,
        text_heads=2,
        text_layers=2,
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=2,
        vision_head_width=16,
    ),
    prior=PriorConfig(width=64, layers=2, heads=2, clip_dim=32, text_width=32),
    text_proj=TextProjConfig(clip_dim=32, text_width=32, context_width=48, time_embed_dim=128),
    decoder=replace(
        KARLO.decoder, image_size=16, model_channels=32, num_res_blocks=1, num_head_channels=16,
        context_width=48,
    ),
    super_res=(SuperResConfig(replace(KARLO.super_res[0].unet, image_size=64, model_channels=32, num_res_blocks=1)),),
)

def with_prior_clip_range(cfg: UnCLIPConfig, clip_range: float | None) -> UnCLIPConfig:
    """The same config with another prior x0 clamp (diffusers ±5, Karlo ±10)."""
    diffusion = replace(cfg.prior.diffusion, clip_range=clip_range)
    return replace(cfg, prior=replace(cfg.prior, diffusion=diffusion))


# The small model trained on generated shapes that ships with the repo (train/, weights/default).
# Same topology as Karlo; the decoder uses a fixed (not learned) variance, so it has 3 outputs.
# Decoder and super-res predict x0 ("sample") rather than ε: with the squaredcos schedule √ᾱ is
# 4.9e-5 at t = 999, so an ε model's x0 estimate there is its ε error times 2e4 (clamped noise,
# grey on average), and a small model trained for minutes never learns to undo that in the few
# steps left: measured on true 64² inputs, the ε super-res read back 25% of the combinations,
# desaturating every background. An x0 model states the colours at every step.
DEFAULT = UnCLIPConfig(
    name="default",
    clip=ClipConfig(
        embed_dim=128, text_width=128, text_heads=4, text_layers=4,
        image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_head_width=32,
    ),
    prior=PriorConfig(width=256, layers=4, heads=4, clip_dim=128, text_width=128),
    text_proj=TextProjConfig(clip_dim=128, text_width=128, context_width=128, time_embed_dim=128),
    decoder=UNetConfig(
        image_size=64, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 1, 2, 2),
        num_res_blocks=1, attention_ds=(4, 8), num_head_channels=32, use_scale_shift_norm=True,
        middle_attention=True, context_width=128, diffusion=DiffusionConfig("sample", "fixed_small_log", 1.0),
    ),
    # Super-res with no res block on the way down (one on the way up): its 256² level, 32 channels
    # (the floor with 32-group norms), is most of a CPU image's time; v0.2's one block per level
    # cost 2× as much.
    # Then the paper's second upsampler, 256 → 1024 (its last stage): fully convolutional, no text,
    # three levels, its last step run by the same UNet, trained on crops (train/stages.py) and so
    # run on tiles of the crops' size (its group norms are wrong on whole images:
    # docs/default-model.md). Four steps: at 1024² each costs 16 times a 256² step of the first
    # stage, so images are 256² unless asked for 1024² (`size=1024`).
    super_res=(SuperResConfig(UNetConfig(
        image_size=256, in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 1, 2, 2),
        num_res_blocks=0, diffusion=DiffusionConfig("sample", "fixed_small_log", 1.0),
    )), SuperResConfig(UNetConfig(
        image_size=1024, in_channels=6, out_channels=3, model_channels=32, channel_mult=(1, 1, 2),
        num_res_blocks=0, diffusion=DiffusionConfig("sample", "fixed_small_log", 1.0),
    ), steps=4, last_step_model=False, tile=64, tile_overlap=16)),
    # Decoder guidance 3: on held-out prompts, 8 over-saturates this small model into colour
    # misreads (docs/default-model.md has both figures).
    sampling=SamplingDefaults(decoder_guidance_scale=3.0, image_size=256),
    # The autoregressive prior, the prior's size. 48 PCA components: on 16k training images they
    # explain 99.70% of the CLIP image embeddings' variance (32: 99.27%, 64: 99.88%), and the
    # quantised codes decode to cosine 0.9986 on average, ≥ 0.991 for every held-back embedding
    # (32 components: 0.979 at worst); the paper's 319 of 1024 is a similar share (31% vs 38%).
    # Each code is one sampling step, so more components cost time for little gain.
    ar_prior=ARPriorConfig(width=256, layers=4, heads=4, clip_dim=128, text_width=128, components=48),
)

# Karlo with the paper's second upsampler, 256 → 1024, at the size the paper's hyperparameter table
# gives it (as recalled: 300M parameters — 192 channels, depth 2, channel multipliers 1,1,2,2,4,4, no
# attention —, the linear noise schedule, 15 sampling steps); for speed and memory work with random
# weights (`benchmarks/latency.py --config paper`). Its last step is run by the same UNet.
PAPER = replace(
    KARLO, name="paper",
    super_res=(*KARLO.super_res, SuperResConfig(UNetConfig(
        image_size=1024, in_channels=6, out_channels=3, model_channels=192, channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2, diffusion=DiffusionConfig("epsilon", "fixed_small_log", 1.0, schedule="linear"),
    ), steps=15, last_step_model=False)),
)

PRESETS: dict[str, UnCLIPConfig] = {cfg.name: cfg for cfg in (KARLO, TINY, DEFAULT, PAPER)}


def get_config(name: str) -> UnCLIPConfig:
    """Return the named preset; raise KeyError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown config {name!r}; known: {sorted(PRESETS)}") from None
