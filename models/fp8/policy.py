"""Which layers run in FP8, and the conversion of a model's copy to it.

The large linear maps go to FP8, where the FLOPs are, by network ("group"):
- "super_res" (the default) and "decoder" (on request): each UNet's convolutions — the residual
  blocks' 3×3 (their 1×1 skips only where `SKIP_CONVS` asks), the attention blocks' projections
  (1-D convolutions) — but its first and its last: the first reads the few channels of the
  noisy image (no GEMM worth quantising), the last writes the predicted noise itself, which the
  sampler subtracts from the image. The super-resolution chain in FP8 leaves images within
  42 dB of fp16; the decoder in FP8 leaves every held-out image's attributes but mottles flat
  areas visibly (docs/fp8.md), so it is asked for, not assumed;
- "prior" (on request), the diffusion prior's transformer blocks' linear
  layers (attention and MLP): its guided loop amplifies their rounding into image embeddings
  about a tenth off on the default model, where the UNets' FP8 leaves the embedding exact (the
  measurements are in docs/fp8.md); its input and output projections and time embedding stay
  as they are either way.
CLIP's encoders, the text projection, the time embeddings, the norms and the sampler stay in the
model's dtype.
"""

from __future__ import annotations

from torch import nn

from models.fp8.layers import Fp8Conv, Fp8Linear

GROUPS = ("prior", "decoder", "super_res")  # what `groups` may name
DEFAULT_GROUPS = ("super_res",)  # the decoder in FP8 mottles flat areas visibly (docs/fp8.md)
_UNET_KEPT = ("input_blocks.0.0", "out.2")  # a UNet's first and last convolution
# Whether a UNet's residual blocks' 1×1 skip convolutions go to FP8 with the rest: no. Kept in
# `dtype`, a skip accumulates into its block's last convolution (one GEMM, no join pass, no
# quantising pass over its concatenated input), where in FP8 it pays both passes for an e4m3
# product of a few percent of the block's FLOPs; and the skips carry much of FP8's error to the
# output (docs/fp8.md). `benchmarks/latency.py --fp8-skips-fp8` times them in FP8.
SKIP_CONVS = False
_MARK = "_holds_fp8"


def check_groups(groups) -> tuple[str, ...]:
    """`groups` as a tuple of known group names (a `ValueError` naming the unknown ones)."""
    if isinstance(groups, str) or not all(isinstance(g, str) for g in groups) or not groups:
        raise ValueError(f"FP8 networks must be a non-empty list of {', '.join(GROUPS)}, got {groups!r}")
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown FP8 network(s) {unknown}; choose from {', '.join(GROUPS)}")
    return tuple(dict.fromkeys(groups))


def _roots(model: nn.Module, groups: tuple[str, ...]) -> dict[str, nn.Module]:
    """The converted networks by qualified name: UNets and the prior's block stack."""
    roots: dict[str, nn.Module] = {}
    groups = check_groups(groups)
    if "prior" in groups:
        roots["prior.transformer"] = model.prior.transformer
    if "decoder" in groups:
        roots["decoder.unet"] = model.decoder.unet
    if "super_res" in groups:
        for i, stage in enumerate(model.super_res):
            roots[f"super_res.{i}.first_steps"] = stage.first_steps
            if stage.last_step is not None:
                roots[f"super_res.{i}.last_step"] = stage.last_step
    return roots


def _eligible(root_name: str, name: str, module: nn.Module) -> bool:
    if root_name == "prior.transformer":
        return isinstance(module, nn.Linear)
    if not SKIP_CONVS and name.endswith(".skip_connection"):
        return False
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and name not in _UNET_KEPT


def fp8_layer_names(model: nn.Module, groups: tuple[str, ...] = DEFAULT_GROUPS) -> list[str]:
    """Qualified names (in `model`) of the layers `convert` turns into FP8 layers."""
    return [f"{root_name}.{name}" for root_name, root in _roots(model, groups).items()
            for name, module in root.named_modules() if _eligible(root_name, name, module)
            or isinstance(module, (Fp8Linear, Fp8Conv))]


def convert(model: nn.Module, groups: tuple[str, ...] = DEFAULT_GROUPS,
            input_scales: dict[str, float] | None = None) -> list[str]:
    """Replace, in place, the layers of `groups` in `model` (an `UnCLIPModel`, already in its
    device and dtype) by FP8 layers, with fixed activation scales from `input_scales` (qualified
    name → scale; layers it does not name measure each input). Returns the converted names."""
    converted = []
    for root_name, root in _roots(model, groups).items():
        for name, module in list(root.named_modules()):
            if not _eligible(root_name, name, module):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            fp8 = Fp8Linear.from_float(module) if isinstance(module, nn.Linear) else Fp8Conv.from_float(module)
            qualified = f"{root_name}.{name}"
            if input_scales is not None and qualified in input_scales:
                fp8.set_input_scale(input_scales[qualified])
            setattr(parent, child, fp8)
            converted.append(qualified)
    for owner in (model.prior, model.decoder.unet, *(s.first_steps for s in model.super_res),
                  *(s.last_step for s in model.super_res if s.last_step is not None)):
        if any(isinstance(m, (Fp8Linear, Fp8Conv)) for m in owner.modules()):
            setattr(owner, _MARK, True)
    return converted


def fp8_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The FP8 layers of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8Conv))}


def holds_fp8(module: nn.Module) -> bool:
    """Whether `convert` put FP8 layers into `module` (a UNet or the prior). The prior's fused step
    reads its linear layers' weights directly, so it leaves a prior holding FP8 layers to the
    reference forward; the fused UNet runs the FP8 layers' own products."""
    return getattr(module, _MARK, False)
