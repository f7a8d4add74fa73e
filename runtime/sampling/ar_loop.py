"""Sampling the autoregressive prior: the similarity token, then one code per step with
temperature, top-k and top-p, against a K/V cache; codes → CLIP image embeddings.

Like the diffusion loops (`runtime.sampling.loops`), the loop is a function of tensors with no host sync
(captured whole as a CUDA graph on CUDA) and all its randomness is drawn before it starts
(`ARNoise`: one uniform per draw, on the CPU, so a seed gives the same codes on any device and
backend). A code is drawn by inverting the cumulative distribution **in code order** over the
codes that survive the top-k/top-p filter: a tiny difference in logits between backends moves a
bucket boundary by as much, instead of reordering near-equal probabilities as a sort would.

The similarity token is drawn uniformly from a quantile range of the training similarities
(buckets are equal-mass, so a range of bucket indices is a range of quantiles); the default, the
top half, is the paper's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.backends.engines import Engine
from runtime.constants import ModelConstants
from runtime.sampling.fixed_batch import pad_rows
from runtime.sampling.graphs import GraphCache
from runtime.sampling.inputs import TextConditioning, to_device
from runtime.sampling.loops import PendingChecks, check_finite, progress_bar
from runtime.validate import check_int


@dataclass(frozen=True)
class ARNoise:
    """Uniforms in [0, 1): `similarity` [B] (which similarity bucket) and `codes` [B, k] (one per code)."""

    similarity: torch.Tensor
    codes: torch.Tensor

    @staticmethod
    def draw(batch: int, components: int, generator: torch.Generator | None) -> ARNoise:
        similarity = torch.rand(batch, generator=generator, dtype=torch.float32)
        return ARNoise(similarity, torch.rand(batch, components, generator=generator, dtype=torch.float32))

    def to(self, device: torch.device | str) -> ARNoise:
        return ARNoise(to_device(self.similarity, device), to_device(self.codes, device))

    @staticmethod
    def cat(parts: list[ARNoise]) -> ARNoise:
        """The noise of several runs' images, one after another."""
        return ARNoise(torch.cat([p.similarity for p in parts]), torch.cat([p.codes for p in parts]))

    def rows(self, start: int, stop: int) -> ARNoise:
        return ARNoise(self.similarity[start:stop].contiguous(), self.codes[start:stop].contiguous())

    def padded(self, rows: int) -> ARNoise:
        """The noise of `rows` images: the last one's repeated (`runtime.sampling.fixed_batch`)."""
        return ARNoise(pad_rows(self.similarity, rows), pad_rows(self.codes, rows))


@dataclass(frozen=True)
class ARSettings:
    """How codes are drawn: logits / `temperature`, then only the `top_k` most likely codes (None:
    all) and the smallest set holding `top_p` of the probability (None: all); the similarity
    token from the quantiles [`similarity_low`, `similarity_high`) of its training distribution."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    similarity_low: float = 0.5
    similarity_high: float = 1.0

    @staticmethod
    def from_arguments(
        temperature: float | None, top_k: int | None, top_p: float | None,
        similarity_quantiles: tuple[float, float] | None, buckets: int,
    ) -> ARSettings:
        """Checked settings from the public arguments (None: the default of each)."""
        if similarity_quantiles is None:
            similarity_quantiles = (ARSettings.similarity_low, ARSettings.similarity_high)
        if not isinstance(similarity_quantiles, (tuple, list)) or len(similarity_quantiles) != 2:
            raise ValueError(f"similarity_quantiles must be a (low, high) pair, got {similarity_quantiles!r}")
        settings = ARSettings(1.0 if temperature is None else temperature, top_k, top_p, *similarity_quantiles)
        return settings.checked(buckets)

    def checked(self, buckets: int) -> ARSettings:
        """These settings, or a ValueError naming the bad one."""
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 100.0:
            raise ValueError(f"temperature must be a number in (0, 100], got {t!r}")
        if self.top_k is not None:
            check_int("top_k", self.top_k, 1, buckets)
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {p!r}")
        lo, hi = self.similarity_low, self.similarity_high
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not 0 <= lo < hi <= 1:
            raise ValueError(f"similarity quantiles must satisfy 0 <= low < high <= 1, got ({lo!r}, {hi!r})")
        return ARSettings(float(t), self.top_k, None if p is None else float(p), float(lo), float(hi))


def draw_codes(logits: torch.Tensor, uniform: torch.Tensor, settings: ARSettings) -> torch.Tensor:
    """One code per row of `logits` [B, n] from `uniform` [B] in [0, 1) (see module docstring)."""
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    n = probs.shape[-1]
    if settings.top_k is not None and settings.top_k < n:
        kth = probs.topk(settings.top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    if settings.top_p is not None and settings.top_p < 1.0:
        ordered = probs.sort(dim=-1, descending=True).values
        mass_before = ordered.cumsum(-1) - ordered
        # The smallest probability still needed to reach top_p (the most likely code always is).
        needed = torch.where(mass_before < settings.top_p, ordered, torch.full_like(ordered, float("inf")))
        probs = torch.where(probs >= needed.min(-1, keepdim=True).values, probs, torch.zeros_like(probs))
    cdf = probs.cumsum(-1)
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(-1).clamp(max=n - 1)


def similarity_tokens(uniform: torch.Tensor, buckets: int, settings: ARSettings) -> torch.Tensor:
    """[B] similarity buckets drawn uniformly from the settings' quantile range."""
    lo, hi = settings.similarity_low * buckets, settings.similarity_high * buckets
    return (lo + uniform * (hi - lo)).floor().long().clamp(0, buckets - 1)


@torch.no_grad()
def sample_ar_prior(
    context: Engine,
    step: Engine,
    constants: ModelConstants,
    text: TextConditioning,
    noise: ARNoise,
    settings: ARSettings,
    similarity_buckets: int,
    progress: bool = False,
    graphs: GraphCache | None = None,
    pending: PendingChecks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the autoregressive prior: (CLIP image embeddings [B, D] float32, codes [B, k] int64).

    `context` (the `ar_prior_context` stage) runs the caption prefix once; `step`
    (`ar_prior_step`) runs once per code, its keys and values written into the codes' cache.

    :param similarity_buckets: the model's count of similarity buckets (`ARPriorConfig`)."""
    b = text.embed.shape[0]
    codes_spec = step.signature.inputs[3]
    components = codes_spec.shape[4]
    if tuple(noise.codes.shape) != (b, components) or tuple(noise.similarity.shape) != (b,):
        raise ValueError(f"AR prior noise has shapes {tuple(noise.similarity.shape)}/{tuple(noise.codes.shape)}, "
                         f"expected ({b},)/({b}, {components})")
    net = step.float_dtype
    device = text.embed.device

    def loop(embed, tokens, mask, u_similarity, u_codes):
        (prefix_kv,) = context(embed, tokens, mask)
        codes_kv = torch.zeros(codes_spec.concrete(embed.shape[0]), dtype=net, device=embed.device)
        token = similarity_tokens(u_similarity, similarity_buckets, settings)
        first_bad = torch.full((1,), -1, dtype=torch.int32, device=embed.device)
        codes = []
        for i in progress_bar(components, "ar prior", progress and graphs is None):
            position = torch.full((embed.shape[0],), i, dtype=torch.int64, device=embed.device)
            logits, new_kv = step(token, position, prefix_kv, codes_kv, mask)
            codes_kv[:, :, :, :, i] = new_kv[:, :, :, :, 0]
            bad = ~torch.isfinite(logits).all()
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
            token = draw_codes(logits, u_codes[:, i], settings)
            codes.append(token)
        codes = torch.stack(codes, dim=1)
        return constants.decode_codes(codes), codes, first_bad

    noise = noise.to(device)
    args = (text.embed, text.tokens, text.mask, noise.similarity, noise.codes)
    tag = ("ar_prior", settings)
    embeds, codes, first_bad = loop(*args) if graphs is None else graphs.run(tag, loop, args)
    check_finite(first_bad, "autoregressive prior", components, pending)
    return embeds, codes

