"""The fused fast path: the prior's cached step and the UNets' forward on `cpp_ext`'s kernels.

The reference modules (`models.prior`, `models.unet`) read like the architecture and run
anywhere; this package runs the same functions faster on CUDA in half precision, walking the
reference modules' parameters with fused kernels, and falls back to the reference where its
kernels do not serve (no CUDA, another dtype, `cpp_ext` not built, export or compilation). The
runtime's stages call `prior_step` and `unet_forward` (a UNet loop's time-embedding projections made
before it by `loop_projections`); `FusedOptions` switches its individual
fusions off for tests and benchmarks.

  options.py       FusedOptions, the one set of switches
  availability.py  when the kernels serve a tensor, tensor layouts
  derived.py       tensors derived from a module's weights, kept while the weights stay
  norms.py         group norm and the residual join on the kernels (NormInput: a join's statistics)
  linear_plan.py   which kernel runs each of the prior step's few-row linear layers
  prior_step.py    the prior's cached denoising step
  upsampled_conv.py  a 3×3 convolution of a 2x-upsampled map, run on the map before upsampling
  keys_around.py   a guided pair's context keys around its image rows: attention without a pack
  unet_blocks.py   the UNet's ResBlock and attention block, and their block protocol
  unet_forward.py  the UNet's forward
"""

from __future__ import annotations

from models.fused.availability import fused_kernels_available
from models.fused.options import FusedOptions
from models.fused.prior_step import prior_step
from models.fused.unet_forward import loop_projections, unet_forward

__all__ = ["FusedOptions", "fused_kernels_available", "loop_projections", "prior_step", "unet_forward"]
