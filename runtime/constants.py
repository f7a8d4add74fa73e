"""The few tensors the sampling loops need besides the stage networks: the prior's CLIP
statistics (to de-standardise its output), the decoder's learned unconditional image
embedding (the image half of classifier-free guidance) and, for a model with an autoregressive
prior, its codebook (codes → CLIP image embedding).

They come from the torch model, or from `constants.safetensors` in an engine folder, so that an
engine folder alone is enough to generate.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.ar_prior import codes_to_embedding
from models.checkpoint import atomic_write
from models.unclip import UnCLIPModel

FILE = "constants.safetensors"


@dataclass(frozen=True)
class ModelConstants:
    """prior_clip_mean / prior_clip_std: [1, D]; decoder_uncond_image_embed: [D]; the AR prior's
    codebook, None without one: ar_pca_mean [D], ar_pca_components [k, D], ar_code_values
    [k, buckets] (all float32)."""

    prior_clip_mean: torch.Tensor
    prior_clip_std: torch.Tensor
    decoder_uncond_image_embed: torch.Tensor
    ar_pca_mean: torch.Tensor | None = None
    ar_pca_components: torch.Tensor | None = None
    ar_code_values: torch.Tensor | None = None

    @staticmethod
    def from_model(model: UnCLIPModel) -> ModelConstants:
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().float().cpu().clone()

        ar = model.ar_prior
        codebook = (copy(ar.pca_mean), copy(ar.pca_components), copy(ar.code_values)) if ar is not None else ()
        return ModelConstants(copy(model.prior.clip_mean), copy(model.prior.clip_std),
                              copy(model.decoder.text_proj.cf_param), *codebook)

    @property
    def has_ar_prior(self) -> bool:
        return self.ar_code_values is not None

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The AR prior's codes [B, k] → CLIP image embeddings [B, D] (float32)."""
        return codes_to_embedding(codes, self.ar_code_values, self.ar_pca_components, self.ar_pca_mean)

    def to(self, device: torch.device | str) -> ModelConstants:
        return ModelConstants(*(getattr(self, f.name).to(device) if getattr(self, f.name) is not None else None
                                for f in fields(self)))

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised prior sample → raw CLIP image embedding (in z's dtype, ≥ float32)."""
        return z * self.prior_clip_std.to(z.dtype) + self.prior_clip_mean.to(z.dtype)

    def uncond_image_embed(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.decoder_uncond_image_embed.to(dtype)[None].expand(batch, -1)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / FILE
        present = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        tensors = {name: t.contiguous() for name, t in present.items()}
        atomic_write(path, lambda p: save_file(tensors, str(p)))
        return path

    @staticmethod
    def load(folder: Path) -> ModelConstants:
        """Read `constants.safetensors`; raises ValueError naming the file when it is unreadable."""
        path = Path(folder) / FILE
        try:
            tensors = load_file(str(path))
            required = [f.name for f in fields(ModelConstants) if f.default is not None]
            missing = [name for name in required if name not in tensors]
            if missing:
                raise KeyError(f"missing {missing}")
            return ModelConstants(*(tensors[f.name].float() if f.name in tensors else None
                                    for f in fields(ModelConstants)))
        except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt file
            raise ValueError(f"{path}: cannot read the model constants ({type(exc).__name__}: {exc})") from exc
