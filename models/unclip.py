"""`UnCLIPModel`: every network of one unCLIP model, built from an `UnCLIPConfig`.

This is the unit the converters fill and the runtime runs: `clip`, `prior`, `decoder`
(UNet + text projection) and `super_res`, the chain of super-resolution stages (each a
first-steps and maybe a last-step UNet; `super_res[i]`, keys `super_res.{i}.`); and `ar_prior`,
the paper's autoregressive prior, where the config has one and the weights hold it (else None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from models.ar_prior import ARPrior
from models.checkpoint import load_strict
from models.clip import ClipEncoder
from models.configs import UnCLIPConfig
from models.decoder import Decoder
from models.layers import causal_bias
from models.prior import Prior
from models.super_res import SuperRes


class UnCLIPModel(nn.Module):
    """Container of the stages."""

    def __init__(self, cfg: UnCLIPConfig, with_vision: bool = True, with_ar_prior: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = ClipEncoder(cfg.clip, with_vision=with_vision)
        self.prior = Prior(cfg.prior)
        self.decoder = Decoder(cfg.decoder, cfg.text_proj)
        self.super_res = nn.ModuleList(SuperRes(stage) for stage in cfg.super_res)
        self.ar_prior = ARPrior(cfg.ar_prior) if cfg.ar_prior is not None and with_ar_prior else None

    @classmethod
    def empty(cls, cfg: UnCLIPConfig, with_vision: bool = True, with_ar_prior: bool = True) -> UnCLIPModel:
        """Build on the meta device (no memory, no init) for `load_state_dict(..., assign=True)`."""
        with torch.device("meta"), _no_weight_init():
            return cls(cfg, with_vision=with_vision, with_ar_prior=with_ar_prior)

    def materialize_buffers(self) -> None:
        """Recreate the non-persistent buffers (causal masks) after loading into `empty()`, on the
        device the weights were loaded to (a state dict on the GPU gives a model on the GPU)."""
        device = next(self.parameters()).device
        device = None if device.type == "meta" else device
        self.prior.causal_bias = causal_bias(self.cfg.prior.seq_len, device)
        if self.ar_prior is not None:
            self.ar_prior.causal_bias = causal_bias(self.cfg.ar_prior.seq_len, device)
        self.clip.reset_causal_mask(device)

    @classmethod
    def from_state(cls, cfg: UnCLIPConfig, state: dict, what: str) -> UnCLIPModel:
        """Strictly load a full state dict into a new model; the CLIP vision tower and the
        autoregressive prior may be absent (the model then has none)."""
        state = chain_state_keys(state)
        has_vision = any(k.startswith("clip.model.visual.") for k in state)
        has_ar_prior = any(k.startswith("ar_prior.") for k in state)
        model = cls.empty(cfg, with_vision=has_vision, with_ar_prior=has_ar_prior)
        load_strict(model, state, what)
        model.materialize_buffers()
        return model


def chain_state_keys(state: dict) -> dict:
    """`state` with the one-stage super-res keys (`super_res.first_steps.`, `super_res.last_step.`,
    as weights were written before super-res became a chain) under the chain's first stage
    (`super_res.0.`); a state already in the chain's keys is returned as it is."""
    old = ("super_res.first_steps.", "super_res.last_step.")
    if not any(k.startswith(old) for k in state):
        return state
    return {("super_res.0." + k[len("super_res."):] if k.startswith(old) else k): v for k, v in state.items()}


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """`torch.nn.init`'s in-place initialisers do nothing inside (for the meta device, where there
    is nothing to fill). Why: on meta tensors torch routes them through its Python references,
    whose first call imports `torch._dynamo`, seconds of a new process's model load
    (`benchmarks/first_image.py`), for values that are never used. The
    functions are module attributes, so a module initialised on another thread meanwhile would
    keep its uninitialised values: the loaders call this from the thread that loads."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (buffers such as CLIP statistics excluded)."""
    return sum(p.numel() for p in module.parameters())
