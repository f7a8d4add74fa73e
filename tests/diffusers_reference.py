"""Test helpers over the diffusers peer (`benchmarks.diffusers_peer`): its builders, and the
error measure every parity test states its tolerance in."""

from __future__ import annotations

import torch

from benchmarks.diffusers_peer import (  # noqa: F401  (re-exported for the tests)
    build_decoder,
    build_pipeline,
    build_prior,
    build_super_res,
    build_text_encoder,
    build_text_proj,
    build_tokenizer,
    randomize,
    scale_output,
)


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max |ref| (error relative to the reference's scale)."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())
