"""What a text→image run consumes besides the networks: the encoded text (`TextConditioning`) and
all of its noise, drawn before the loops start (`StageNoise` per stage, `SamplingNoise` for a run),
and their upload to the device (`to_device`). A run is reproducible from its noise alone, and a
caller can inject its own (`UnCLIP.generate(noise=...)`, `UnCLIP.draw_noise`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from runtime.sampling.fixed_batch import pad_rows


@dataclass(frozen=True)
class TextConditioning:
    """CLIP text outputs for a batch: embed [B, D], tokens [B, L, W], mask [B, L] (bool)."""

    embed: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def expand(self, batch: int) -> TextConditioning:
        """Broadcast a batch-1 conditioning (e.g. the empty prompt's) to `batch` rows, without copies."""
        return TextConditioning(*(t.expand(batch, *t.shape[1:]) for t in (self.embed, self.tokens, self.mask)))

    def rows(self, start: int, stop: int) -> TextConditioning:
        """Rows `start:stop` (one chunk of a split batch)."""
        return TextConditioning(*(t[start:stop] for t in (self.embed, self.tokens, self.mask)))

    @staticmethod
    def cat(parts: Iterable[TextConditioning]) -> TextConditioning:
        parts = list(parts)
        return TextConditioning(*(torch.cat([getattr(p, f) for p in parts]) for f in ("embed", "tokens", "mask")))

    def padded(self, rows: int) -> TextConditioning:
        """`rows` rows: the last repeated (`runtime.sampling.fixed_batch`)."""
        return TextConditioning(*(pad_rows(t, rows) for t in (self.embed, self.tokens, self.mask)))


@dataclass(frozen=True)
class StageNoise:
    """Initial sample x_T and one noise tensor per step ([steps, *x_T.shape]), float32. `pinned`:
    both lie in page-locked host memory (drawn for a GPU), so their uploads need no staging copy."""

    init: torch.Tensor
    steps: torch.Tensor
    pinned: bool = False

    @staticmethod
    def draw(shape: tuple[int, ...], num_steps: int, generator: torch.Generator | None,
             pin_memory: bool = False) -> StageNoise:
        """`torch.randn` draws of x_T, then of the steps' noise. `pin_memory` (a CUDA run): drawn
        straight into page-locked memory — the same values (`randn` is `empty().normal_()`), without
        the host copy into a staging buffer that each upload would make (for the prior's noise that
        copy is on the critical path: the GPU waits for it)."""
        def normal(size: tuple[int, ...]) -> torch.Tensor:
            return torch.empty(size, dtype=torch.float32, pin_memory=pin_memory).normal_(generator=generator)

        init = normal(shape)
        return StageNoise(init, normal((num_steps, *shape)), pin_memory)

    def to(self, device: torch.device | str) -> StageNoise:
        return StageNoise(to_device(self.init, device, self.pinned), to_device(self.steps, device, self.pinned))

    @staticmethod
    def cat(parts: list[StageNoise]) -> StageNoise:
        """The noise of several runs' images, one after another (pinned if every part is)."""
        pinned = all(p.pinned for p in parts)
        init = torch.cat([p.init for p in parts])
        steps = torch.cat([p.steps for p in parts], dim=1)
        if pinned:
            init, steps = init.pin_memory(), steps.pin_memory()
        return StageNoise(init, steps, pinned)

    def rows(self, start: int, stop: int) -> StageNoise:
        """The noise of images `start:stop` (contiguous: the tensors themselves for all rows, else copies)."""
        init, steps = self.init[start:stop], self.steps[:, start:stop]
        whole = init.is_contiguous() and steps.is_contiguous()  # no copy: still pinned if it was
        return StageNoise(init.contiguous(), steps.contiguous(), self.pinned and whole)

    def padded(self, rows: int) -> StageNoise:
        """The noise of `rows` images: the last one's repeated (`runtime.sampling.fixed_batch`),
        still page-locked if it was."""
        return StageNoise(pad_rows(self.init, rows, 0, self.pinned), pad_rows(self.steps, rows, 1, self.pinned),
                          self.pinned)


@dataclass(frozen=True)
class SamplingNoise:
    """The noise of one text→image run, per stage (a stage may be None when it does not run); the
    prior's is an `runtime.sampling.ar_loop.ARNoise` for the autoregressive prior. `super_res` holds one
    `StageNoise` per super-res stage that runs, in the chain's order (a single `StageNoise` is
    taken as a chain of one)."""

    prior: StageNoise | None
    decoder: StageNoise | None
    super_res: tuple[StageNoise, ...] | None

    def __post_init__(self) -> None:
        if isinstance(self.super_res, StageNoise):
            object.__setattr__(self, "super_res", (self.super_res,))
        elif isinstance(self.super_res, list):
            object.__setattr__(self, "super_res", tuple(self.super_res))

    @staticmethod
    def cat(parts: list[SamplingNoise]) -> SamplingNoise:
        """The noise of several runs (each drawn with its own seed) as the noise of one batched run:
        image i of the batch gets exactly the noise it had in its own run."""
        stages = []
        for stage in ("prior", "decoder"):
            stages.append(_cat_stage([getattr(p, stage) for p in parts], stage))
        chains = [p.super_res for p in parts]
        if any(c is None for c in chains):
            if not all(c is None for c in chains):
                raise ValueError("cannot join noise where only some runs have super_res noise")
            stages.append(None)
        else:
            if len({len(c) for c in chains}) != 1:
                raise ValueError("cannot join noise of runs with different numbers of super-res stages")
            stages.append(tuple(_cat_stage([c[i] for c in chains], f"super_res[{i}]") for i in range(len(chains[0]))))
        return SamplingNoise(*stages)

    def rows(self, start: int, stop: int) -> SamplingNoise:
        """The noise of images `start:stop`: a chunk of a split batch gets exactly its own noise."""
        chain = None if self.super_res is None else tuple(n.rows(start, stop) for n in self.super_res)
        return SamplingNoise(*(n.rows(start, stop) if n is not None else None for n in (self.prior, self.decoder)),
                             chain)


def _cat_stage(chosen: list, name: str):
    """One stage's noise of several runs joined (None where no run has it)."""
    if any(c is None for c in chosen):
        if not all(c is None for c in chosen):
            raise ValueError(f"cannot join noise where only some runs have {name} noise")
        return None
    return type(chosen[0]).cat(chosen)


def to_device(t: torch.Tensor, device: torch.device | str, pinned: bool = False) -> torch.Tensor:
    """`t` on `device`; a host tensor bound for a GPU goes through pinned memory without blocking,
    so the host does not wait for the GPU's queue (a pageable copy would sync the stream). The
    pinned buffer comes straight from torch's caching host allocator: `Tensor.pin_memory()` first
    asks the driver whether `t` is pinned already, a slow query made before the GPU has any work.
    `pinned`: the caller knows `t` is page-locked already (uploaded as it is)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        if pinned:
            return t.to(device, non_blocking=True)
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        return staged.to(device, non_blocking=True)
    return t.to(device)
