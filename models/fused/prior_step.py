"""The prior's cached denoising step (`Prior.step`) on `cpp_ext`'s kernels.

The step tokens form one [B·3, W] residual stream. Per layer: the layer norm kernel (adding the
bias still pending from the projection before it), the QKV projection, the attention of the step
tokens over the cached caption keys and their own (`prior_step_attention`: the QKV output and the
cache read in place, the masks built in), and the output projections accumulating into the
stream in place. Each linear layer runs a skinny kernel where `linear_plan` picks one (bias, GELU
and the residual add in its epilogue), else cuBLAS without its bias, which then joins the stream
in the next layer norm's kernel. 7 to 8 launches per layer where the reference's torch ops take 25.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cpp_ext
from models.fp8.policy import holds_fp8
from models.fused.availability import fused_kernels_available
from models.fused.derived import derived
from models.fused.linear_plan import SKINNY_GELU, FewRowsLinear, few_rows_linear, skinny_fits
from models.fused.options import DEFAULT, FusedOptions
from models.layers import timestep_embedding, work_dtype
from models.prior import Prior


def attention_head_fits(head: int) -> bool:
    """Whether `cpp_ext.prior_step_attention` takes heads of this size: a power of two, 8 to 256."""
    return 8 <= head <= 256 and head & (head - 1) == 0


def serves(prior: Prior, x_t: torch.Tensor) -> bool:
    """Whether the fused step runs `prior` on `x_t`: the kernels serve it, heads the attention
    kernel takes, rows of at most 8192, no FP8 layers (the fused step reads the weights itself)."""
    cfg = prior.cfg
    return (fused_kernels_available(x_t, prior.positional_embedding) and not holds_fp8(prior)
            and attention_head_fits(cfg.width // cfg.heads) and cfg.width <= 8192)


def prior_step(prior: Prior, x_t: torch.Tensor, timesteps: torch.Tensor, context_kv: torch.Tensor,
               text_mask: torch.Tensor, options: FusedOptions = DEFAULT) -> torch.Tensor:
    """`prior.step(x_t, timesteps, context_kv, text_mask)`: the fused step where it `serves`, else
    the reference. Predicts standardised x0 [B, clip_dim]."""
    if not serves(prior, x_t):
        return prior.step(x_t, timesteps, context_kv, text_mask)
    rows = step_rows(prior, x_t, timesteps, options)
    return _predict(prior, _blocks(prior, rows, context_kv, text_mask, options))


def step_rows(prior: Prior, x_t: torch.Tensor, timesteps: torch.Tensor,
              options: FusedOptions = DEFAULT) -> torch.Tensor:
    """The step tokens with their positions, [B, 3, W]: the reference's values, the time token
    looked up in `time_table` where it serves (integer timesteps) — 6 small launches where the
    sinusoid, the time MLP and the tokens' assembly take 15."""
    n = prior.context_len
    table = time_table(prior) if options.time_table and not timesteps.is_floating_point() else None
    if table is None:
        return prior.step_tokens(x_t, timesteps) + prior.positional_embedding[:, n:]
    pos = prior.positional_embedding[0, n:]
    time_row = table.index_select(0, timesteps.clamp(0, table.shape[0] - 1))
    proj = prior.clip_img_proj
    if skinny_fits(x_t, proj):
        image_row = cpp_ext.kernels.skinny_linear(x_t, proj.weight, proj.bias)
    else:
        image_row = proj(x_t)
    prd_row = (prior.prd_emb[0, 0] + pos[2]).expand_as(time_row)
    return torch.stack([time_row, image_row + pos[1], prd_row], dim=1)


def time_table(prior: Prior) -> torch.Tensor | None:
    """[T, W]: `time_embed(timestep_embedding(t)) + positional_embedding[n]` for every training
    timestep t (the time token of the step with its position added, rounded as there), computed
    on first use and again whenever the time MLP or the positional embedding changes (storage or
    in-place update). None while a CUDA graph is being captured without a current table (the
    caller computes the token instead). A graph captured with the table keeps reading it: capture
    again after changing those weights, as for any captured step."""
    def build() -> torch.Tensor:
        steps, dtype = prior.cfg.diffusion.num_train_timesteps, prior.positional_embedding.dtype
        t = torch.arange(steps, device=prior.positional_embedding.device)
        emb = prior.time_embed(timestep_embedding(t, prior.cfg.width, dtype=work_dtype(dtype)).to(dtype))
        return emb + prior.positional_embedding[0, prior.context_len]

    params = (*prior.time_embed.parameters(), prior.positional_embedding)
    extra = tuple((p.dtype, p.device) for p in params)
    return derived(prior, "time_table").get(params, extra, build)


def _predict(prior: Prior, h: torch.Tensor) -> torch.Tensor:
    """The reference's prediction from the final stream: the `prd` rows only, through the layer
    norm kernel and `skinny_linear` where they fit (the reference runs all three tokens)."""
    last = h[:, -1].contiguous()
    proj, ln = prior.out_proj, prior.final_ln
    if skinny_fits(last, proj) and ln is not None and ln.weight is not None and ln.bias is not None:
        normed = cpp_ext.kernels.residual_layer_norm(last, None, ln.weight, ln.bias, ln.eps)
        return cpp_ext.kernels.skinny_linear(normed, proj.weight, proj.bias)
    return prior.predict(h)


def _project_into(rows: torch.Tensor, x: torch.Tensor, linear: nn.Linear,
                  run: FewRowsLinear | None) -> torch.Tensor | None:
    """rows += linear(x) in place: by `run` with the bias (returns None), or by cuBLAS (run None)
    without it (returns the bias, still to be added)."""
    if run is not None:
        run(x, linear, 0, rows)
        return None
    rows.addmm_(x, linear.weight.t())
    return linear.bias


def _blocks(prior: Prior, x: torch.Tensor, context_kv: torch.Tensor, text_mask: torch.Tensor,
            options: FusedOptions) -> torch.Tensor:
    """The block stack over the step tokens [B, 3, W] given the cache: the module docstring's
    layer, the same function as the reference's loop in `Prior.step`."""
    b, t, w = x.shape
    rows = x.reshape(b * t, w).contiguous()
    keep = text_mask.bool().contiguous()
    kernels = cpp_ext.kernels
    n, first = b * t, prior.transformer.resblocks[0]
    qkv_run = few_rows_linear(n, w, first.attn.c_qkv.out_features, options)
    proj_run = few_rows_linear(n, w, w, options)
    fc_run = few_rows_linear(n, w, first.mlp.c_fc.out_features, options)
    out_run = few_rows_linear(n, 4 * w, w, options)
    pending = None  # the bias of the last projection into `rows`, not yet added
    for i, block in enumerate(prior.transformer.resblocks):
        attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
        h = kernels.residual_layer_norm(rows, pending, ln_1.weight, ln_1.bias, ln_1.eps)
        qkv = qkv_run(h, attn.c_qkv, 0, None) if qkv_run is not None else attn.c_qkv(h)
        mixed = kernels.prior_step_attention(qkv, context_kv[:, i], keep, attn.heads)
        pending = _project_into(rows, mixed, attn.c_proj, proj_run)
        h = kernels.residual_layer_norm(rows, pending, ln_2.weight, ln_2.bias, ln_2.eps)
        hidden = fc_run(h, mlp.c_fc, SKINNY_GELU, None) if fc_run is not None else F.gelu(mlp.c_fc(h))
        pending = _project_into(rows, hidden, mlp.c_proj, out_run)
    if pending is not None:
        rows.add_(pending)
    return rows.view(b, t, w)
