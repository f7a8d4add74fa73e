"""The paper's autoregressive prior (DALL-E 2 §2.2): text → CLIP image embedding as a sequence of
discrete codes predicted one at a time.

The CLIP image embedding is rotated onto its principal components (PCA of training embeddings),
the leading `components` coefficients are kept and each is quantised into `buckets` equal-mass
buckets (edges at the training distribution's quantiles; a code decodes to the mean of the
training values in its bucket). A causal transformer reads the caption as a prefix — the CLIP
text tokens and the text embedding, as the diffusion prior does — then a token for the quantised
text–image cosine similarity, then the codes, and predicts each code from everything before it.
Conditioning on the similarity lets sampling ask for images that match their caption well (the
paper samples it from the top half of its distribution).

The 78 prefix tokens do not depend on the codes: `context_kv` runs them once per prompt and keeps
every layer's keys and values (the transformer stack is the diffusion prior's, `models.prior`);
`step` then runs one token against that cache and the codes' own cache slots, so sampling costs
one token per code. `forward` runs the whole sequence at once (training, and the reference the
cached path is checked against).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import ARPriorConfig
from models.layers import LayerNorm32, additive_mask, causal_bias, concrete_default_device
from models.prior import PriorTransformerStack


def codes_to_embedding(
    codes: torch.Tensor, code_values: torch.Tensor, components: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """Codes [B, k] → CLIP image embeddings [B, D] (in the codebook's dtype): each code's bucket
    value ([k, buckets] table), rotated back from the principal components ([k, D]) around `mean` [D]."""
    coefficients = code_values.gather(1, codes.t().long()).t()  # [B, k]
    return coefficients @ components + mean


class ARPrior(nn.Module):
    """Autoregressive prior network and its codebook (PCA and quantisation, as buffers)."""

    def __init__(self, cfg: ARPriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.text_enc_proj = nn.Linear(cfg.text_width, w)
        self.text_emb_proj = nn.Linear(cfg.clip_dim, w)
        self.similarity_emb = nn.Embedding(cfg.similarity_buckets, w)
        self.code_emb = nn.Embedding(cfg.buckets, w)
        self.positional_embedding = nn.Parameter(nn.init.normal_(torch.empty(1, cfg.seq_len, w), std=0.01))
        self.transformer = PriorTransformerStack(w, cfg.layers, cfg.heads)
        self.final_ln = LayerNorm32(w)
        self.head = nn.Linear(w, cfg.buckets)
        k, d = cfg.components, cfg.clip_dim
        # The codebook, fitted on training embeddings (train.ar_prior) and shipped with the weights.
        self.register_buffer("pca_mean", torch.zeros(d))
        self.register_buffer("pca_components", torch.eye(k, d, device=concrete_default_device()))
        self.register_buffer("code_edges", torch.linspace(-1, 1, cfg.buckets - 1).repeat(k, 1))
        self.register_buffer("code_values", torch.linspace(-1, 1, cfg.buckets).repeat(k, 1))
        self.register_buffer("similarity_edges", torch.linspace(-1, 1, cfg.similarity_buckets - 1))
        self.register_buffer("causal_bias", causal_bias(cfg.seq_len), persistent=False)

    # --- codebook -------------------------------------------------------------------------------

    def encode(self, image_embed: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [B, D] → codes [B, k] (int64)."""
        coefficients = (image_embed.to(self.pca_mean.dtype) - self.pca_mean) @ self.pca_components.t()
        return torch.searchsorted(self.code_edges, coefficients.t().contiguous()).t()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, k] → CLIP image embeddings [B, D]."""
        return codes_to_embedding(codes, self.code_values, self.pca_components, self.pca_mean)

    def similarity_bucket(self, text_embed: torch.Tensor, image_embed: torch.Tensor) -> torch.Tensor:
        """The quantised cosine similarity of text and image embeddings, [B] int64."""
        cosine = F.cosine_similarity(text_embed.float(), image_embed.float(), dim=-1)
        return torch.searchsorted(self.similarity_edges.float(), cosine[:, None].contiguous())[:, 0]

    # --- network --------------------------------------------------------------------------------

    def _prefix_tokens(self, text_embed: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """[B, 78, W]: projected text tokens, then the text embedding."""
        return torch.cat([self.text_enc_proj(text_tokens), self.text_emb_proj(text_embed)[:, None]], dim=1)

    def _prefix_keep(self, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 78] bool: real text tokens and the text embedding (padding tokens are never attended)."""
        return F.pad(text_mask.bool(), (0, 1), value=True)

    def forward(
        self, text_embed: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor, similarity: torch.Tensor,
        codes: torch.Tensor,
    ) -> torch.Tensor:
        """Teacher-forced logits of every code.

        :param text_embed: [B, clip_dim]; :param text_tokens: [B, text_ctx, text_width];
        :param text_mask: [B, text_ctx] bool; :param similarity: [B] similarity bucket;
        :param codes: [B, k] the codes (the last is only predicted, never read).
        :return: [B, k, buckets] logits; position i predicts code i from the similarity and codes < i.
        """
        x = torch.cat([self._prefix_tokens(text_embed, text_tokens), self.similarity_emb(similarity)[:, None],
                       self.code_emb(codes[:, :-1])], dim=1)
        keep = F.pad(self._prefix_keep(text_mask), (0, self.cfg.components), value=True)
        bias = additive_mask(keep)[:, None, None, :] + self.causal_bias
        h = self.transformer(x + self.positional_embedding, bias)
        return self.head(self.final_ln(h[:, self.cfg.prefix_len :]))

    def context_kv(self, text_embed: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Keys and values of the prefix at every layer: [B, layers, 2, heads, 78, head_dim]."""
        n = self.cfg.prefix_len
        x = self._prefix_tokens(text_embed, text_tokens) + self.positional_embedding[:, :n]
        bias = additive_mask(self._prefix_keep(text_mask))[:, None, None, :] + self.causal_bias[:n, :n]
        return self.transformer.keys_values(x, bias)

    def step(
        self, token: torch.Tensor, position: torch.Tensor, prefix_kv: torch.Tensor, codes_kv: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step: the logits of code `position` and the step token's keys and values.

        :param token: [B] the similarity bucket at position 0, else the code at `position − 1`.
        :param position: [B] which code is predicted (0..k−1; the same for every row in practice).
        :param prefix_kv: [B, layers, 2, heads, 78, head_dim] from `context_kv`.
        :param codes_kv: [B, layers, 2, heads, k, head_dim]: slot j holds the keys/values of step j's
            token for j < position (the caller writes each step's `new_kv` there); later slots are ignored.
        :param text_mask: [B, text_ctx] bool.
        :return: logits [B, buckets], new_kv [B, layers, 2, heads, 1, head_dim].
        """
        cfg = self.cfg
        first = (position == 0)[:, None]
        x = torch.where(first, self.similarity_emb(token.clamp(0, cfg.similarity_buckets - 1)),
                        self.code_emb(token.clamp(0, cfg.buckets - 1)))
        x = (x + self.positional_embedding[0, cfg.prefix_len + position])[:, None]
        slots = torch.arange(cfg.components, device=position.device)[None] < position[:, None]
        keep = torch.cat([self._prefix_keep(text_mask), slots, torch.ones_like(first)], dim=1)
        bias = additive_mask(keep)[:, None, None, :]
        new_kv = []
        for i, block in enumerate(self.transformer.resblocks):
            x, k, v = block.forward_with_kv(x, bias, torch.cat([prefix_kv[:, i], codes_kv[:, i]], dim=3))
            new_kv.append(torch.stack([k, v], dim=1))
        return self.head(self.final_ln(x[:, 0])), torch.stack(new_kv, dim=1)
