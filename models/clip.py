"""CLIP for unCLIP: the OpenAI-layout CLIP towers (`models.clip_towers`, open_clip's parameter
names), with Karlo's tokenisation and outputs.

Text → `(text_embed [B, D], text_tokens [B, 77, W], mask [B, 77])` where `text_tokens` is the
final LayerNorm's output for every position (before projection) and `text_embed` the projected
EOT feature. No L2 normalisation anywhere (Karlo feeds raw features to every stage).
Tokenisation follows Karlo's `padded_tokens_and_mask`: `[SOT] + bpe + [EOT]`, cut to 77 with the
last kept token forced to EOT, padded with id 0, mask True from SOT through EOT.
The tokenizer is CLIP's BPE (`models.bpe`, equal to open_clip's `SimpleTokenizer`; its
vocabulary ships inside the open_clip package, so nothing is downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from models.bpe import ClipBPE
from models.clip_towers import OpenAIClip
from models.configs import ClipConfig
from models.layers import causal_bias

# Keys of OpenAI/open_clip CLIP state dicts that unCLIP inference does not use.
UNUSED_CLIP_KEYS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class TokenizedText:
    """Token ids, the mask of real tokens, and which prompts were cut to fit the context."""

    tokens: torch.Tensor  # [B, L] int64
    mask: torch.Tensor  # [B, L] bool
    truncated: tuple[bool, ...]


class KarloTokenizer:
    """CLIP BPE tokenisation with Karlo's padding and mask."""

    def __init__(self, context_length: int = 77) -> None:
        self.context_length = context_length
        self.bpe = _shared_bpe()
        self.sot = self.bpe.sot_token_id
        self.eot = self.bpe.eot_token_id
        self._encode = lru_cache(maxsize=65536)(lambda text: tuple(self.bpe.encode(text)))

    def ids(self, text: str) -> tuple[int, ...]:
        """The BPE ids of `text` (without SOT/EOT, not cut)."""
        return self._encode(text)

    def __call__(self, texts: list[str]) -> TokenizedText:
        n = self.context_length
        tokens = torch.zeros(len(texts), n, dtype=torch.long)
        mask = torch.zeros(len(texts), n, dtype=torch.bool)
        truncated = []
        for i, text in enumerate(texts):
            ids = [self.sot, *self._encode(text), self.eot]
            truncated.append(len(ids) > n)
            if len(ids) > n:
                ids = ids[:n]
                ids[-1] = self.eot
            tokens[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = True
        return TokenizedText(tokens, mask, tuple(truncated))


@lru_cache(maxsize=1)
def _shared_bpe() -> ClipBPE:
    """One BPE table per process (reading the vocabulary takes ~0.1 s)."""
    return ClipBPE()


class ClipEncoder(nn.Module):
    """OpenAI-layout CLIP (text tower always, vision tower optional) with unCLIP's outputs."""

    def __init__(self, cfg: ClipConfig, with_vision: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = OpenAIClip(cfg, with_vision=with_vision)

    def reset_causal_mask(self, device: torch.device | None = None) -> None:
        """Recreate the text tower's causal mask (a non-persistent buffer) after a meta-device
        load, on `device` (default: torch's default device, the CPU in place of meta)."""
        self.model.attn_mask = causal_bias(self.cfg.context_length, device)

    @property
    def has_vision(self) -> bool:
        return self.model.visual is not None

    def encode_text(self, tokens: torch.Tensor, ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] → (text_embed [B, D], text_tokens [B, L, W] after `ln_final`).

        The text transformer runs causally without the padding mask, as in CLIP and Karlo. `ends`
        [B] are the EOT tokens' positions, whose features are pooled (default: the largest id's).
        """
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
        ends = tokens.argmax(dim=-1) if ends is None else ends
        pooled = x[torch.arange(x.shape[0], device=x.device), ends]  # the EOT token's feature
        return pooled @ m.text_projection, x

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] RGB in [0, 1] → normalised encoder input (Karlo: resize, no crop)."""
        size = self.cfg.image_size
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.cfg.image_mean, device=x.device)[None, :, None, None]
        std = torch.tensor(self.cfg.image_std, device=x.device)[None, :, None, None]
        return (x - mean) / std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] (see `preprocess`) → image_embed [B, D]."""
        if not self.has_vision:
            raise RuntimeError(
                "this model has no CLIP image encoder (diffusers' karlo-v1-alpha folder ships "
                "none); load one that has it, e.g. UnCLIP.from_karlo(dir) with ViT-L-14.pt"
            )
        return self.model.visual(pixels)
