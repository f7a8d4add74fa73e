"""Each stage's I/O signature, declared once as data: tensor names, shapes (with a symbolic batch
axis), dtypes, and the module that computes it. ONNX export, every engine backend and graph
capture read their names, shapes and sample inputs from here.

Stages: `clip_text`, `clip_image`, `prior_context` (the prior's step-independent tokens → their
per-layer keys and values, once per prompt), `prior_step` (one prior step against that cache),
`decoder_context` (the decoder's text projection and every attention block's context keys and
values, once per call), `decoder_step` (one UNet step against them), for each super-res stage
of the chain its first-steps UNet and, where it has one, its last-step UNet (`super_res_first` and
`super_res_last` for the first stage, `super_res_2_first` … for the second: `super_res_stages`),
`ar_prior_context` and `ar_prior_step` (the
autoregressive prior's text prefix → its per-layer keys and values; one sampling step against
them and the codes' cache slots), where the model has one; and `prior` and `decoder`, each whole network in one
graph (the references the split pairs are checked against; not needed to generate, so not built
unless asked for). Each stage module takes its inputs positionally in the declared order and
returns its outputs as a tuple in the declared order. The step stages (`prior_step`,
`decoder_step`, `super_res_*`) run `models.fused` where its kernels serve their inputs (CUDA, half
precision, eager or graph capture), the reference modules otherwise and always under export.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models import fused
from models.configs import UnCLIPConfig
from models.fused.options import DEFAULT as DEFAULT_FUSED
from models.fused.options import FusedOptions
from models.unclip import UnCLIPModel
from models.unet import context_heads

BATCH = "batch"  # the one dynamic axis; every other size is fixed by the model's config
# A stage's call at step i of a prepared loop: step(i, *the stage's inputs) -> its outputs.
LoopStep = Callable[..., tuple[torch.Tensor, ...]]

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: shape (ints, or BATCH) and dtype kind: "float" (the stage's precision),
    "int64", "bool", or "mask_bias" (the stage's precision, an additive key mask: 0 keeps a
    token, -inf drops it — the fast attention paths read it as a mask, not as general scores)."""

    name: str
    shape: tuple[Dim, ...]
    kind: str = "float"
    high: int | None = None  # int64 inputs: values lie in [0, high) (default: the timestep range)

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        return {"float": float_dtype, "mask_bias": float_dtype, "int64": torch.int64, "bool": torch.bool}[self.kind]


@dataclass(frozen=True)
class StageSignature:
    """A stage's inputs and outputs, and what the batch axis means (`cfg_doubled`: the sampling
    loop runs conditional and unconditional rows together, so it sees twice the image count)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cfg_doubled: bool = False
    tiles: int = 1  # a tiled super-res stage's tiles per image: its batch holds every tile of every image

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: "batch"}} for every input and output (ONNX export's form)."""
        return {s.name: {i: BATCH for i, d in enumerate(s.shape) if d == BATCH} for s in self.inputs + self.outputs}

    def max_batch(self, images: int) -> int:
        """Largest batch the stage sees when `images` images are generated at once."""
        return (2 * images if self.cfg_doubled else images) * self.tiles

    def sample_inputs(
        self, batch: int, float_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        generator: torch.Generator | None = None, num_timesteps: int = 1000, vocab_size: int = 49408,
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right names, shapes and dtypes (valid token ids, timesteps and masks)."""
        out = {}
        for spec in self.inputs:
            shape = spec.concrete(batch)
            if spec.name == "tokens":
                length = shape[1]
                t = torch.randint(1, vocab_size - 1, shape, generator=generator)
                ends = torch.randint(2, length, (shape[0],), generator=generator)
                t[torch.arange(length)[None] > ends[:, None]] = 0
                t[torch.arange(shape[0]), ends] = vocab_size - 1  # EOT: the argmax the pooling takes
                out[spec.name] = t
            elif spec.kind == "int64":
                out[spec.name] = torch.randint(0, spec.high or num_timesteps, shape, generator=generator)
            elif spec.kind in ("bool", "mask_bias"):
                lengths = torch.randint(2, shape[1] + 1, (shape[0],), generator=generator)
                keep = torch.arange(shape[1])[None] < lengths[:, None]
                if spec.kind == "bool":
                    out[spec.name] = keep
                else:
                    out[spec.name] = torch.zeros(shape).masked_fill(~keep, float("-inf")).to(float_dtype)
            else:
                out[spec.name] = torch.randn(shape, generator=generator).to(float_dtype)
        return {k: v.to(device) for k, v in out.items()}


def signatures(cfg: UnCLIPConfig) -> dict[str, StageSignature]:
    """Every stage's signature for a model config."""
    c, p, d = cfg.clip, cfg.prior, cfg.decoder
    length, width = c.context_length, c.text_width
    text = (
        TensorSpec("text_embed", (BATCH, c.embed_dim)),
        TensorSpec("text_tokens", (BATCH, length, width)),
        TensorSpec("text_mask", (BATCH, length), "bool"),
    )
    t = TensorSpec("timesteps", (BATCH,), "int64")
    kv = TensorSpec("context_kv", (BATCH, p.layers, 2, p.heads, p.text_ctx + 1, p.width // p.heads))
    n_ctx = cfg.text_proj.clip_tokens + length
    dec_cond = (
        TensorSpec("emb_add", (BATCH, d.time_embed_dim)),
        TensorSpec("context_kv", (BATCH, 2, context_heads(d), n_ctx, d.num_head_channels)),
        TensorSpec("context_bias", (BATCH, n_ctx), "mask_bias"),
    )
    dec_x = TensorSpec("x_t", (BATCH, 3, d.image_size, d.image_size))
    dec_out = (TensorSpec("model_out", (BATCH, d.out_channels, d.image_size, d.image_size)),)
    super_res = []
    for i, stage in enumerate(cfg.super_res):
        size, u = stage.tile or stage.image_size, stage.unet  # a tiled stage's networks see one tile
        sr_inputs = (TensorSpec("x_t", (BATCH, 3, size, size)), t, TensorSpec("low_res_up", (BATCH, 3, size, size)))
        sr_out = (TensorSpec("model_out", (BATCH, u.out_channels, size, size)),)
        tiles = len(tile_starts(stage.image_size, stage.tile, stage.tile_overlap)) ** 2 if stage.tile else 1
        super_res += [StageSignature(name, sr_inputs, sr_out, tiles=tiles) for name in super_res_stages(cfg, i)]
    stages = [
        StageSignature("clip_text", (TensorSpec("tokens", (BATCH, length), "int64"),), text[:2]),
        StageSignature("clip_image", (TensorSpec("pixels", (BATCH, 3, c.image_size, c.image_size)),),
                       (TensorSpec("image_embed", (BATCH, c.embed_dim)),)),
        StageSignature("prior", (TensorSpec("x_t", (BATCH, p.clip_dim)), t, *text),
                       (TensorSpec("model_out", (BATCH, p.clip_dim)),), cfg_doubled=True),
        StageSignature("prior_context", text, (kv,), cfg_doubled=True),
        StageSignature("prior_step", (TensorSpec("x_t", (BATCH, p.clip_dim)), t, kv, text[2]),
                       (TensorSpec("model_out", (BATCH, p.clip_dim)),), cfg_doubled=True),
        StageSignature("decoder", (dec_x, t, TensorSpec("image_embed", (BATCH, c.embed_dim)), *text), dec_out,
                       cfg_doubled=True),
        StageSignature("decoder_context", (TensorSpec("image_embed", (BATCH, c.embed_dim)), *text), dec_cond,
                       cfg_doubled=True),
        StageSignature("decoder_step", (dec_x, t, *dec_cond), dec_out, cfg_doubled=True),
        *super_res,
        *(_ar_signatures(cfg, text) if cfg.ar_prior is not None else ()),
    ]
    return {sig.name: sig for sig in stages}


def _ar_signatures(cfg: UnCLIPConfig, text: tuple[TensorSpec, ...]) -> tuple[StageSignature, ...]:
    a = cfg.ar_prior
    head_dim = a.width // a.heads
    prefix = TensorSpec("prefix_kv", (BATCH, a.layers, 2, a.heads, a.prefix_len, head_dim))
    codes = TensorSpec("codes_kv", (BATCH, a.layers, 2, a.heads, a.components, head_dim))
    step_inputs = (TensorSpec("token", (BATCH,), "int64", a.buckets),
                   TensorSpec("position", (BATCH,), "int64", a.components), prefix, codes, text[2])
    step_outputs = (TensorSpec("logits", (BATCH, a.buckets)),
                    TensorSpec("new_kv", (BATCH, a.layers, 2, a.heads, 1, head_dim)))
    return (StageSignature("ar_prior_context", text, (prefix,)),
            StageSignature("ar_prior_step", step_inputs, step_outputs))


class _ClipText(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.clip = model.clip

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The EOT position as the argmax of the ids in float32 (exact: ids < 2^24): ONNX Runtime's
        # CUDA ArgMax takes no integers, and an integer one would run on the CPU with two copies.
        return self.clip.encode_text(tokens, ends=tokens.float().argmax(dim=-1))


class _ClipImage(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.clip = model.clip

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.clip.encode_image(pixels),)


class _Prior(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.prior = model.prior

    def forward(self, x_t, timesteps, text_embed, text_tokens, text_mask) -> tuple[torch.Tensor]:
        return (self.prior(x_t, timesteps, text_embed, text_tokens, text_mask),)


class _PriorContext(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.prior = model.prior

    def forward(self, text_embed, text_tokens, text_mask) -> tuple[torch.Tensor]:
        return (self.prior.context_kv(text_embed, text_tokens, text_mask),)


class _PriorStep(nn.Module):
    def __init__(self, model: UnCLIPModel, options: FusedOptions) -> None:
        super().__init__()
        self.prior, self.options = model.prior, options

    def forward(self, x_t, timesteps, context_kv, text_mask) -> tuple[torch.Tensor]:
        return (fused.prior_step(self.prior, x_t, timesteps, context_kv, text_mask, self.options),)


class _Decoder(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, x_t, timesteps, image_embed, text_embed, text_tokens, text_mask) -> tuple[torch.Tensor]:
        return (self.decoder(x_t, timesteps, image_embed, text_embed, text_tokens, text_mask),)


class _DecoderContext(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, image_embed, text_embed, text_tokens, text_mask) -> tuple[torch.Tensor, ...]:
        return self.decoder.context(image_embed, text_embed, text_tokens, text_mask)


class _DecoderStep(nn.Module):
    def __init__(self, model: UnCLIPModel, options: FusedOptions) -> None:
        super().__init__()
        self.decoder, self.options = model.decoder, options

    def forward(self, x_t, timesteps, emb_add, context_kv, context_bias, projections=None) -> tuple[torch.Tensor]:
        return (fused.unet_forward(self.decoder.unet, x_t, timesteps, emb_add, None, context_bias, context_kv,
                                   options=self.options, projections=projections),)

    def prepare_loop(self, timesteps: torch.Tensor, batch: int, emb_add: torch.Tensor) -> LoopStep | None:
        """`forward` for each step of a loop over `timesteps` at `batch` rows with this `emb_add`,
        its time-embedding projections made for every step at once (None where they cannot be)."""
        steps = fused.loop_projections(self.decoder.unet, timesteps, batch, emb_add, self.options)
        return None if steps is None else lambda i, *inputs: self(*inputs, projections=steps[i])


class _ARPriorContext(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.ar_prior = model.ar_prior

    def forward(self, text_embed, text_tokens, text_mask) -> tuple[torch.Tensor]:
        return (self.ar_prior.context_kv(text_embed, text_tokens, text_mask),)


class _ARPriorStep(nn.Module):
    def __init__(self, model: UnCLIPModel) -> None:
        super().__init__()
        self.ar_prior = model.ar_prior

    def forward(self, token, position, prefix_kv, codes_kv, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ar_prior.step(token, position, prefix_kv, codes_kv, text_mask)


class _SuperRes(nn.Module):
    def __init__(self, model: UnCLIPModel, stage: int, last: bool, options: FusedOptions) -> None:
        super().__init__()
        self.unet, self.options = model.super_res[stage].unet(last), options

    def forward(self, x_t, timesteps, low_res_up, projections=None) -> tuple[torch.Tensor]:
        return (fused.unet_forward(self.unet, torch.cat([x_t, low_res_up], dim=1), timesteps, options=self.options,
                                   projections=projections),)

    def prepare_loop(self, timesteps: torch.Tensor, batch: int) -> LoopStep | None:
        """`forward` for each step of a loop over `timesteps` at `batch` rows, its time-embedding
        projections made for every step at once (None where they cannot be)."""
        steps = fused.loop_projections(self.unet, timesteps, batch, None, self.options)
        return None if steps is None else lambda i, *inputs: self(*inputs, projections=steps[i])


def stage_module(model: UnCLIPModel, name: str, options: FusedOptions = DEFAULT_FUSED) -> nn.Module:
    """The module computing stage `name` of `model` with the signature's positional I/O (`options`:
    the fused path's switches, where a stage takes it)."""
    builders = {
        "clip_text": lambda: _ClipText(model),
        "clip_image": lambda: _ClipImage(model),
        "prior": lambda: _Prior(model),
        "prior_context": lambda: _PriorContext(model),
        "prior_step": lambda: _PriorStep(model, options),
        "decoder": lambda: _Decoder(model),
        "decoder_context": lambda: _DecoderContext(model),
        "decoder_step": lambda: _DecoderStep(model, options),
        **{name: functools.partial(_SuperRes, model, i, name.endswith("_last"), options)
           for i in range(len(model.super_res)) for name in super_res_stages(model.cfg, i)},
        "ar_prior_context": lambda: _ARPriorContext(model),
        "ar_prior_step": lambda: _ARPriorStep(model),
    }
    if name.startswith("ar_prior") and model.ar_prior is None:
        raise KeyError(f"stage {name!r}: this model has no autoregressive prior")
    if name not in builders:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(builders)}")
    return builders[name]().eval()


AR_PRIOR_STAGES = ("ar_prior_context", "ar_prior_step")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """The offsets of the tiles along one side of a `size` image: every `tile - overlap` pixels,
    the last one flush with the far edge."""
    starts = list(range(0, size - tile + 1, tile - overlap))
    return starts if starts[-1] == size - tile else [*starts, size - tile]


def is_unet_stage(name: str) -> bool:
    """Whether stage `name` runs a UNet (the decoder's, or a super-res stage's): where a
    channels-last layout and UNet-specific fusions can pay."""
    return name in ("decoder", "decoder_step") or name.startswith("super_res")


def super_res_stages(cfg: UnCLIPConfig, stage: int) -> tuple[str, ...]:
    """The engine stages of super-res stage `stage` (0 the first of the chain): its first-steps
    UNet, then its last-step UNet where it has one. The first stage's names are those of Karlo's
    one stage (`super_res_first`, `super_res_last`); a later one's carry its place in the chain,
    counted from 1 (`super_res_2_first` for the second)."""
    prefix = "super_res" if stage == 0 else f"super_res_{stage + 1}"
    return (f"{prefix}_first", *((f"{prefix}_last",) if cfg.super_res[stage].last_step_model else ()))


def generate_stages(cfg: UnCLIPConfig) -> tuple[str, ...]:
    """What text → image runs: the text encoder, the prior's and decoder's split stages and every
    super-res stage of the chain."""
    chain = tuple(name for i in range(len(cfg.super_res)) for name in super_res_stages(cfg, i))
    return ("clip_text", "prior_context", "prior_step", "decoder_context", "decoder_step", *chain)



def available_stages(model: UnCLIPModel) -> list[str]:
    """The stages to build for this model: what text→image needs, clip_image (the image tools)
    when the model has a CLIP vision tower, and the autoregressive prior's when it has one.
    (`prior` and `decoder`, the whole networks the split stages are checked against, are built
    only when asked for.)"""
    return ["clip_text", *(["clip_image"] if model.clip.has_vision else []), *generate_stages(model.cfg)[1:],
            *(AR_PRIOR_STAGES if model.ar_prior is not None else ())]
