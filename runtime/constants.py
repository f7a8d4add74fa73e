"""The few tensors the sampling loops need besides the stage networks: the prior's CLIP
statistics (to de-standardise its output) and the decoder's learned unconditional image
embedding (the image half of classifier-free guidance).

They come from the torch model, or from `constants.safetensors` in an engine folder, so that an
engine folder alone is enough to generate.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import atomic_write
from models.unclip import UnCLIPModel

FILE = "constants.safetensors"


@dataclass(frozen=True)
class ModelConstants:
    """prior_clip_mean / prior_clip_std: [1, D]; decoder_uncond_image_embed: [D] (float32)."""

    prior_clip_mean: torch.Tensor
    prior_clip_std: torch.Tensor
    decoder_uncond_image_embed: torch.Tensor

    @staticmethod
    def from_model(model: UnCLIPModel) -> ModelConstants:
        return ModelConstants(
            model.prior.clip_mean.detach().float().cpu().clone(),
            model.prior.clip_std.detach().float().cpu().clone(),
            model.decoder.text_proj.cf_param.detach().float().cpu().clone(),
        )

    def to(self, device: torch.device | str) -> ModelConstants:
        return ModelConstants(*(getattr(self, f.name).to(device) for f in fields(self)))

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised prior sample → raw CLIP image embedding (in z's dtype, ≥ float32)."""
        return z * self.prior_clip_std.to(z.dtype) + self.prior_clip_mean.to(z.dtype)

    def uncond_image_embed(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.decoder_uncond_image_embed.to(dtype)[None].expand(batch, -1)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILE
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self)}
        atomic_write(path, lambda p: save_file(tensors, str(p)))
        return path

    @staticmethod
    def load(folder: Path) -> ModelConstants:
        """Read `constants.safetensors`; raises ValueError naming the file when it is unreadable."""
        path = Path(folder) / FILE
        try:
            tensors = load_file(str(path))
            return ModelConstants(*(tensors[f.name].float() for f in fields(ModelConstants)))
        except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt file
            raise ValueError(f"{path}: cannot read the model constants ({type(exc).__name__}: {exc})") from exc
