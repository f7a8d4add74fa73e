"""`UnCLIPModel`: every network of one unCLIP model, built from an `UnCLIPConfig`.

This is the unit the converters fill and the runtime runs: `clip`, `prior`, `decoder`
(UNet + text projection) and `super_res` (first-steps and last-step UNets).
"""

from __future__ import annotations

import torch
from torch import nn

from models.checkpoint import load_strict
from models.clip import ClipEncoder
from models.configs import UnCLIPConfig
from models.decoder import Decoder
from models.layers import causal_bias
from models.prior import Prior
from models.super_res import SuperRes


class UnCLIPModel(nn.Module):
    """Container of the four stages."""

    def __init__(self, cfg: UnCLIPConfig, with_vision: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = ClipEncoder(cfg.clip, with_vision=with_vision)
        self.prior = Prior(cfg.prior)
        self.decoder = Decoder(cfg.decoder, cfg.text_proj)
        self.super_res = SuperRes(cfg.super_res)

    @classmethod
    def empty(cls, cfg: UnCLIPConfig, with_vision: bool = True) -> UnCLIPModel:
        """Build on the meta device (no memory, no init) for `load_state_dict(..., assign=True)`."""
        with torch.device("meta"):
            return cls(cfg, with_vision=with_vision)

    def materialize_buffers(self) -> None:
        """Recreate the non-persistent buffers (causal masks) after loading into `empty()`."""
        self.prior.causal_bias = causal_bias(self.cfg.prior.seq_len)
        self.clip.reset_causal_mask()

    @classmethod
    def from_state(cls, cfg: UnCLIPConfig, state: dict, what: str) -> UnCLIPModel:
        """Strictly load a full state dict (the CLIP vision tower may be absent) into a new model."""
        has_vision = any(k.startswith("clip.model.visual.") for k in state)
        model = cls.empty(cfg, with_vision=has_vision)
        load_strict(model, state, what)
        model.materialize_buffers()
        return model


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers such as CLIP statistics excluded)."""
    return sum(p.numel() for p in module.parameters())
