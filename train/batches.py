"""Batched, on-device sampling of training scenes and captions: the fast input path of training.

`train.data` describes the domain one scene at a time (Python objects, used by evaluation and
tests); training draws hundreds of scenes per step, so here a batch is a handful of tensors drawn
with one device generator, and captions are indices into a `CaptionBank` that holds every caption
the sampler can produce, tokenised once (and, for a frozen CLIP, encoded once). The distribution
is the one of `train.data.sample_scene` and `train.data.caption`.
"""

from __future__ import annotations

import math

import torch

from models.clip import ClipEncoder, KarloTokenizer
from train.data import COLOURS, SHAPE_WORDS, SHAPES, SIZE_NAMES, SIZES, TEMPLATES, SceneBatch, training_combos

_SYNONYMS = len(next(iter(SHAPE_WORDS.values())))
assert all(len(words) == _SYNONYMS for words in SHAPE_WORDS.values())


def caption_variants(combo: tuple[str, str, str], size: str) -> list[str]:
    """Every caption `train.data.caption` can give a scene of this combination and size, in the
    order template-major, synonym-minor (duplicates kept, so uniform picks match its odds)."""
    fg, shape, bg = combo
    return [t.format(fg=fg, bg=bg, shape=word, size=size) for t in TEMPLATES for word in SHAPE_WORDS[shape]]


class SceneSampler:
    """Draws `SceneBatch`es of the given combinations (default: every training one) on a device,
    and for each scene the index of a random caption of it in `captions()`."""

    def __init__(self, device: str | torch.device, seed: int, combos: list[tuple[str, str, str]] | None = None):
        self.device = torch.device(device)
        self.combos = combos or training_combos()
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self._combo_table = torch.tensor(
            [(COLOURS.index(f), SHAPES.index(s), COLOURS.index(b)) for f, s, b in self.combos], device=self.device
        )
        self._size_ranges = torch.tensor([SIZES[n] for n in SIZE_NAMES], device=self.device)

    def captions(self) -> list[str]:
        """The caption bank: index ((combo·sizes + size)·templates + template)·synonyms + synonym."""
        return [c for combo in self.combos for size in SIZE_NAMES for c in caption_variants(combo, size)]

    def uniform(self, n: int) -> torch.Tensor:
        """[n] uniform draws in [0, 1) from the sampler's generator."""
        return torch.rand(n, generator=self.gen, device=self.device)

    def _index(self, n: int, high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.gen, device=self.device)

    def scenes(self, batch: int) -> tuple[SceneBatch, torch.Tensor]:
        """(scenes, caption indices into `captions()`)."""
        combo = self._index(batch, len(self.combos))
        fg, shape, bg = self._combo_table[combo].unbind(1)
        size = self._index(batch, len(SIZE_NAMES))
        lo, hi = self._size_ranges[size].unbind(1)
        radius = lo + (hi - lo) * self.uniform(batch)
        margin = radius + 0.02
        cx = margin + (1 - 2 * margin) * self.uniform(batch)
        cy = margin + (1 - 2 * margin) * self.uniform(batch)
        angle = torch.where(shape == SHAPES.index("circle"), 0.0, 2 * math.pi * self.uniform(batch))
        template, synonym = self._index(batch, len(TEMPLATES)), self._index(batch, _SYNONYMS)
        caption = ((combo * len(SIZE_NAMES) + size) * len(TEMPLATES) + template) * _SYNONYMS + synonym
        return SceneBatch(fg, shape, bg, size, cx, cy, radius, angle), caption


class CaptionBank:
    """Tokens of every caption of a sampler, and, given a frozen CLIP, their text features: all
    encoded up front (`lazy=False`, for GPUs), or each caption the first time it is drawn (for
    short CPU runs, where encoding the whole bank would take longer than the run)."""

    def __init__(self, sampler: SceneSampler, context_length: int) -> None:
        tokenized = KarloTokenizer(context_length)(sampler.captions())
        self.tokens = tokenized.tokens.to(sampler.device)
        self.mask = tokenized.mask.to(sampler.device)
        self._clip: ClipEncoder | None = None
        self._filled: torch.Tensor | None = None
        self._complete = False
        self.embed: torch.Tensor | None = None
        self.seq: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @torch.no_grad()
    def _encode(self, index: torch.Tensor) -> None:
        embed, seq = self._clip.encode_text(self.tokens[index])
        if self.embed is None:
            n = len(self)
            self.embed = embed.new_zeros(n, *embed.shape[1:], dtype=torch.float32)
            self.seq = seq.new_zeros(n, *seq.shape[1:], dtype=torch.float32)
        self.embed[index], self.seq[index] = embed.float(), seq.float()
        self._filled[index] = True

    def encode(self, clip: ClipEncoder, lazy: bool = False, chunk: int = 1024) -> CaptionBank:
        """Attach a frozen CLIP whose text features `text` returns."""
        self._clip = clip
        self._filled = torch.zeros(len(self), dtype=torch.bool, device=self.tokens.device)
        if not lazy:
            for i in range(0, len(self), chunk):
                self._encode(torch.arange(i, min(i + chunk, len(self)), device=self.tokens.device))
            self._complete = True
        return self

    def text(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embed, seq, mask) of the captions at `index`."""
        if self._clip is None:
            raise RuntimeError("CaptionBank.encode(clip) first")
        if not self._complete:  # lazy: encode what this batch is the first to draw
            missing = index[~self._filled[index]].unique()
            if len(missing):
                self._encode(missing)
            self._complete = bool(self._filled.all())
        return self.embed[index], self.seq[index], self.mask[index]
