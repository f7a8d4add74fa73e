"""Training of the autoregressive prior (`models.ar_prior`) on the default model's domain.

1. The codebook, from the frozen CLIP's image embeddings of `codebook_images` training renders:
   PCA (the components of largest variance first), the leading `components` kept; each
   component's coefficient quantised into `buckets` equal-mass buckets (edges at its quantiles;
   a code decodes to the mean of the coefficients in its bucket); the text–image cosine
   similarity of training pairs quantised the same way into `similarity_buckets`. Its report
   (explained variance, reconstruction cosine on embeddings the fit did not see) goes into the
   stage record.
2. The transformer: cross-entropy of every code given the caption prefix, the true similarity
   bucket and the codes before it (teacher forcing); captions replaced by the empty prompt 10%
   of the time, so "" asks for an unconditional sample.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from models.ar_prior import ARPrior
from models.clip import ClipEncoder
from models.configs import UnCLIPConfig
from train.batches import SceneSampler
from train.data import render
from train.stages import Conditioner, TrainSettings, _fit, _load

log = logging.getLogger("train")
CAPTION_DROP = 0.1


@torch.no_grad()
def training_pairs(cond: Conditioner, n: int, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings [n, D], text embeddings [n, D]) of `n` training scenes and captions."""
    images, texts = [], []
    for _ in range(max(1, n // batch)):
        scenes, captions = cond.sampler.scenes(batch)
        images.append(cond.image(render(scenes, cond.clip.cfg.image_size)))
        texts.append(cond.bank.text(captions)[0].float())
    return torch.cat(images), torch.cat(texts)


def _quantile_buckets(values: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-mass buckets of each column of `values` [N, C]: (inner edges [C, buckets−1], the mean
    value in each bucket [C, buckets]; an empty bucket takes the middle of its edges)."""
    q = torch.linspace(0, 1, buckets + 1, dtype=values.dtype, device=values.device)
    bounds = torch.quantile(values, q, dim=0).t().contiguous()  # [C, buckets + 1]
    edges = bounds[:, 1:-1].contiguous()
    codes = torch.searchsorted(edges, values.t().contiguous())  # [C, N]
    sums = torch.zeros(values.shape[1], buckets, dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums.scatter_add_(1, codes, values.t())
    counts.scatter_add_(1, codes, torch.ones_like(values.t()))
    middle = (bounds[:, 1:] + bounds[:, :-1]) / 2
    return edges, torch.where(counts > 0, sums / counts.clamp(min=1), middle)


@torch.no_grad()
def fit_codebook(ar: ARPrior, image_embeds: torch.Tensor, text_embeds: torch.Tensor, held_back: int = 2048) -> dict:
    """Fit `ar`'s PCA, code buckets and similarity buckets on all but the last `held_back`
    embeddings; return the report measured on those last ones."""
    cfg = ar.cfg
    fit, test = image_embeds[:-held_back].double(), image_embeds[-held_back:].double()
    mean = fit.mean(0)
    _, singular, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    variance = singular**2 / (singular**2).sum()
    components = vh[: cfg.components]
    edges, values = _quantile_buckets((fit - mean) @ components.t(), cfg.buckets)
    cosine = F.cosine_similarity(text_embeds[:-held_back].double(), fit, dim=-1)
    sim_edges, _ = _quantile_buckets(cosine[:, None], cfg.similarity_buckets)
    for name, value in (("pca_mean", mean), ("pca_components", components), ("code_edges", edges),
                        ("code_values", values), ("similarity_edges", sim_edges[0])):
        getattr(ar, name).copy_(value.to(getattr(ar, name).dtype))
    rebuilt = ar.decode(ar.encode(test.float())).double()
    unquantised = (test - mean) @ components.t() @ components + mean
    explained = variance.cumsum(0)
    return {
        "fit_embeddings": len(fit), "held_back_embeddings": held_back, "components": cfg.components,
        "explained_variance": round(float(explained[cfg.components - 1]), 5),
        "explained_variance_by_count": {str(k): round(float(explained[k - 1]), 5)
                                        for k in (8, 16, 24, 32, 48, 64, 96) if k <= len(explained)},
        "reconstruction_cosine_mean": round(float(F.cosine_similarity(rebuilt, test).mean()), 5),
        "reconstruction_cosine_min": round(float(F.cosine_similarity(rebuilt, test).min()), 5),
        "unquantised_cosine_mean": round(float(F.cosine_similarity(unquantised, test).mean()), 5),
    }


def train_ar_prior(
    cfg: UnCLIPConfig, clip: ClipEncoder, settings: TrainSettings, device: torch.device, seed: int,
    init_state: dict | None = None, codebook_images: int = 65536,
) -> tuple[ARPrior, dict]:
    """Fit the codebook, train the transformer; return (EMA model, codebook report).

    :param init_state: weights to continue from (a previous run's AR prior, codebook included)."""
    if cfg.ar_prior is None:
        raise ValueError(f"config {cfg.name!r} has no ar_prior section")
    torch.manual_seed(seed)
    cond = Conditioner(clip, SceneSampler(device, seed))
    ar = ARPrior(cfg.ar_prior).to(device)
    image_embeds, text_embeds = training_pairs(cond, codebook_images)
    report = fit_codebook(ar, image_embeds, text_embeds, held_back=min(2048, codebook_images // 8))
    log.info("ar_prior codebook: %s", report)
    _load(ar, init_state)  # a resumed run keeps its own codebook (the codes it learned)
    loss_history: list[float] = []

    def loss_fn(step: int) -> torch.Tensor:
        scenes, captions = cond.sampler.scenes(settings.batch)
        image_embed = cond.image(render(scenes, cfg.clip.image_size))
        embed, seq, mask = cond.text(captions, CAPTION_DROP)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # codes from float32 coefficients
            codes = ar.encode(image_embed)
            similarity = ar.similarity_bucket(embed, image_embed)
        logits = ar(embed, seq, mask, similarity, codes)
        return F.cross_entropy(logits.float().reshape(-1, cfg.ar_prior.buckets), codes.reshape(-1))

    ema, loss_history = _fit(ar, settings, loss_fn, "ar_prior")
    report["final_loss"] = round(loss_history[-1], 4) if loss_history else None
    return ema, report
