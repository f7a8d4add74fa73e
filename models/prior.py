"""The diffusion prior: a causal transformer that predicts a CLIP image embedding from text.

Architecture of Karlo's `karlo/modules/xf.py: PriorTransformer` (itself after DALL-E 2 §2.2):
the sequence is [77 projected text tokens, text embedding, time embedding, x_t, learned `prd`],
81 tokens with a learned positional embedding, a causal mask plus the text padding mask, 20
pre-LN blocks, a final LayerNorm, and the `prd` position's output projected to a CLIP embedding.
It predicts x0 in *standardised* CLIP space; `clip_mean`/`clip_std` (persistent buffers here,
Karlo's `ViT-L-14_stats.th`) map it back to a raw CLIP image embedding.
Parameter names follow Karlo's checkpoint (without its `model.` prefix).

The first 78 tokens (text tokens and text embedding) see only each other under the causal
mask, so they are the same at every denoising step: `context_kv` runs them once per prompt and
keeps every layer's keys and values, and `step` then runs only the 3 step-dependent tokens (time,
x_t, `prd`) against that cache — the same result as `forward`, with 3/81 of the token work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import cpp_ext
from models.configs import PriorConfig
from models.layers import (
    DerivedTensors,
    LayerNorm32,
    additive_mask,
    causal_bias,
    fused_kernels_available,
    timestep_embedding,
    work_dtype,
)

SKINNY_GELU = 1  # cpp_ext.skinny_linear's activation code for exact GELU

# Whether the fused step path takes the time token from a table of every training timestep's
# embedding (one lookup instead of the sinusoid and the time MLP); a switch for tests and benchmarks.
TIME_TABLE = True

# The SMs `skinny_block` spreads a layer's blocks over: the current CUDA device's, or an H100's
# without CUDA (the rule is then still defined, e.g. for tests on the CPU).
H100_SMS = 132


_device_properties = functools.cache(torch.cuda.get_device_properties)  # per device index


def multiprocessors() -> int:
    """The current CUDA device's streaming multiprocessors (`H100_SMS` without CUDA)."""
    if not torch.cuda.is_available():
        return H100_SMS
    return _device_properties(torch.cuda.current_device()).multi_processor_count


def skinny_block(rows: int, width: int, features: int) -> int | None:
    """The output features per block with which a linear layer of the prior (`rows` input rows of
    `width`, `features` outputs) runs `cpp_ext.skinny_linear` where `staged_plan` (Hopper) does not
    take it, or None for cuBLAS: up to 16 rows (two tiles of the tensor-core step; above that
    cuBLAS was faster). The blocks: the largest of 32, 16 and 8 features whose grid still gives
    every SM of the current GPU a block (`multiprocessors`), else 8, because in the step's chain of
    overlapped kernels (pdl.cuh) a kernel can start only once every block of the one before it is
    resident, so a layer that needs more than one wave of blocks (two per SM) holds back the
    kernels after it. Measurements: docs/speed.md."""
    if rows < 1 or rows > 16 or width % 32:
        return None
    sms = multiprocessors()
    for block in (32, 16):
        if features % block == 0 and features // block >= sms:
            return block
    return 8


# Whether the fused step's linear layers stream their weights through shared memory where
# `staged_plan` allows (`cpp_ext.skinny_linear_staged`); a switch for tests and benchmarks.
STAGED_WEIGHTS = True
# Weight rows of 512 columns a staged block holds (its ring: block features × stages, ~70 KB), so
# that three blocks — of one kernel or of consecutive ones — fit in an SM's shared memory.
STAGED_ROWS = 64
STAGED_MAX_ROWS = 24  # three 8-row tiles of the mma: four images' step (batch 8 × 3 tokens)


def staged_capable() -> bool:
    """Whether the current CUDA device runs `skinny_linear_staged` (Hopper, sm_90, or newer)."""
    if not torch.cuda.is_available():
        return False
    return _device_properties(torch.cuda.current_device()).major >= 9


def staged_plan(rows: int, width: int, features: int) -> tuple[int, int] | None:
    """(output features per block, ring stages) with which a linear layer of the prior's step runs
    `cpp_ext.skinny_linear_staged`, or None (then `skinny_block`'s rule, or cuBLAS). Up to 24 rows, a
    width of 512s, on Hopper: 16-feature blocks of 4 stages (a 2048-wide layer's whole tile
    requested before the block waits for its input), or 32-feature blocks of 2 where 16-feature
    ones would need more than one wave at three blocks per SM (`multiprocessors`). Above 16 rows a
    layer narrower than its input (the MLP's output projection, whose blocks then read more input
    than weights) goes to cuBLAS, which is faster there. Measurements: docs/speed.md."""
    if not STAGED_WEIGHTS or rows < 1 or rows > STAGED_MAX_ROWS or width % 512 or not staged_capable():
        return None
    if rows > 16 and width > features:  # the MLP's narrowing output projection: cuBLAS was faster there
        return None
    for block in (16, 32):
        if features % block == 0 and features // block <= 3 * multiprocessors():
            return block, STAGED_ROWS // block
    return None


# A few-row linear layer of the step: run(x, linear, activation, out) → act(x·Wᵀ + b), or out += it.
FewRowsLinear = Callable[[torch.Tensor, nn.Linear, int, torch.Tensor | None], torch.Tensor]


def few_rows_linear(rows: int, width: int, features: int) -> FewRowsLinear | None:
    """How the step runs a linear layer of `rows` input rows of `width` and `features` outputs:
    `skinny_linear_staged` with `staged_plan`'s blocks, else `skinny_linear` with `skinny_block`'s,
    else None (cuBLAS). Chosen once per step for each kind of layer."""
    plan = staged_plan(rows, width, features)
    if plan is not None:
        def staged(x, linear, activation, out):
            return cpp_ext.kernels.skinny_linear_staged(x, linear.weight, linear.bias, activation, out, *plan)
        return staged
    block = skinny_block(rows, width, features)
    if block is None:
        return None

    def skinny(x, linear, activation, out):
        return cpp_ext.kernels.skinny_linear(x, linear.weight, linear.bias, activation, out, block_features=block)
    return skinny


def _attention_head_fits(head: int) -> bool:
    """Whether `cpp_ext.prior_step_attention` takes heads of this size: a power of two, 8 to 256."""
    return 8 <= head <= 256 and head & (head - 1) == 0


def _skinny_fits(x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether `skinny_linear` takes `linear` (with a bias) of the rows `x`: `skinny_block`'s rows and
    width, contiguous 16-byte-aligned rows, features of 16s."""
    return (x.dim() == 2 and skinny_block(x.shape[0], linear.in_features, linear.out_features) is not None
            and x.is_contiguous() and x.data_ptr() % 16 == 0
            and linear.out_features % 16 == 0 and linear.bias is not None)


def _project_into(rows: torch.Tensor, x: torch.Tensor, linear: nn.Linear,
                  run: FewRowsLinear | None) -> torch.Tensor | None:
    """rows += linear(x) in place: by `run` (`few_rows_linear`) with the bias (returns None), or by
    cuBLAS (run None) without it (returns the bias, still to be added)."""
    if run is not None:
        run(x, linear, 0, rows)
        return None
    rows.addmm_(x, linear.weight.t())
    return linear.bias


class PriorAttention(nn.Module):
    """Multi-head self-attention with Karlo's per-head interleaved [q|k|v] projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N, W] → q, k, v, each [B, H, N, ch]."""
        b, n, _ = x.shape
        qkv = self.c_qkv(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, N, 3*ch]
        return qkv.chunk(3, dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Queries [B, H, Nq, ch] over keys/values [B, H, Nk, ch] → projected output [B, Nq, W]."""
        b, _, n, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.c_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.project(x), bias)


class PriorMLP(nn.Module):
    """Width → 4·width → width with exact GELU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class PriorBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm32(width)
        self.attn = PriorAttention(width, heads)
        self.ln_2 = LayerNorm32(width)
        self.mlp = PriorMLP(width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.forward_with_kv(x, bias)[0]

    def forward_with_kv(
        self, x: torch.Tensor, bias: torch.Tensor, past: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block on tokens `x` that also attend to cached keys/values `past` ([B, 2, H, Np, ch],
        placed before them); returns (output, this call's own keys, its own values [B, H, N, ch])."""
        q, k, v = self.attn.project(self.ln_1(x))
        keys, values = k, v
        if past is not None:
            keys, values = torch.cat([past[:, 0], k], dim=2), torch.cat([past[:, 1], v], dim=2)
        x = x + self.attn.attend(q, keys, values, bias)
        return x + self.mlp(self.ln_2(x)), k, v


class PriorTransformerStack(nn.Module):
    """The block stack (own module so checkpoint keys read `transformer.resblocks.{i}`)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(PriorBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, bias)
        return x

    def keys_values(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Every layer's keys and values of tokens `x` [B, N, W] (a prefix that later tokens attend
        to): [B, layers, 2, heads, N, head_dim], k at index 0 and v at 1."""
        cache = []
        for block in self.resblocks:
            x, k, v = block.forward_with_kv(x, bias)
            cache.append(torch.stack([k, v], dim=1))
        return torch.stack(cache, dim=1)


class Prior(nn.Module):
    """Diffusion prior network; `forward` predicts standardised x0 from standardised x_t."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.text_enc_proj = nn.Linear(cfg.text_width, w)
        self.text_emb_proj = nn.Linear(cfg.clip_dim, w)
        self.clip_img_proj = nn.Linear(cfg.clip_dim, w)
        self.out_proj = nn.Linear(w, cfg.clip_dim)
        self.transformer = PriorTransformerStack(w, cfg.layers, cfg.heads)
        self.final_ln = LayerNorm32(w) if cfg.final_ln else None
        self.positional_embedding = nn.Parameter(nn.init.normal_(torch.empty(1, cfg.seq_len, w), std=0.01))
        self.prd_emb = nn.Parameter(nn.init.normal_(torch.empty(1, 1, w), std=0.01))
        self._time_table_cache = DerivedTensors()  # `_time_table`'s table
        self.register_buffer("clip_mean", torch.zeros(1, cfg.clip_dim))
        self.register_buffer("clip_std", torch.ones(1, cfg.clip_dim))
        self.register_buffer("causal_bias", causal_bias(cfg.seq_len), persistent=False)

    def attention_bias(self, text_mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, N, N] additive bias: text padding keys and future positions masked."""
        keep = F.pad(text_mask.bool(), (0, 4), value=True)
        return additive_mask(keep)[:, None, None, :] + self.causal_bias

    def forward(
        self,
        x_t: torch.Tensor,
        timesteps: torch.Tensor,
        text_embed: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Predict x0.

        :param x_t: [B, clip_dim] noisy standardised image embedding.
        :param timesteps: [B] original-schedule timesteps (0..T-1).
        :param text_embed: [B, clip_dim] CLIP text embedding.
        :param text_tokens: [B, text_ctx, text_width] CLIP text tokens after `ln_final`.
        :param text_mask: [B, text_ctx] bool, True for real tokens (SOT..EOT).
        :return: [B, clip_dim] predicted standardised x0.
        """
        seq = torch.cat([self._context_tokens(text_embed, text_tokens), self._step_tokens(x_t, timesteps)], dim=1)
        h = self.transformer(seq + self.positional_embedding, self.attention_bias(text_mask))
        return self._predict(h)

    def _context_tokens(self, text_embed: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """The step-independent tokens [B, 78, W]: projected text tokens, then the text embedding."""
        return torch.cat([self.text_enc_proj(text_tokens), self.text_emb_proj(text_embed)[:, None]], dim=1)

    def _step_tokens(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The step-dependent tokens [B, 3, W]: time embedding, x_t, the learned `prd` query."""
        dtype = self.positional_embedding.dtype
        t_emb = self.time_embed(timestep_embedding(timesteps, self.cfg.width, dtype=work_dtype(dtype)).to(dtype))
        return torch.cat([t_emb[:, None], self.clip_img_proj(x_t)[:, None], self.prd_emb.expand(x_t.shape[0], -1, -1)],
                         dim=1)

    def _predict(self, h: torch.Tensor) -> torch.Tensor:
        """The `prd` position's output → standardised x0."""
        if self.final_ln is not None:
            h = self.final_ln(h)
        return self.out_proj(h[:, -1])

    @property
    def context_len(self) -> int:
        """Tokens that do not depend on the step: the text tokens and the text embedding."""
        return self.cfg.text_ctx + 1

    def context_kv(self, text_embed: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Keys and values of the step-independent tokens at every layer.

        :return: [B, layers, 2, heads, context_len, head_dim] (k at index 0, v at 1).
        """
        n = self.context_len
        x = self._context_tokens(text_embed, text_tokens) + self.positional_embedding[:, :n]
        return self.transformer.keys_values(x, self.attention_bias(text_mask)[:, :, :n, :n])

    def step(
        self, x_t: torch.Tensor, timesteps: torch.Tensor, context_kv: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """`forward` given the cache of `context_kv`: predict standardised x0 [B, clip_dim]."""
        n = self.context_len
        # the attention kernel takes heads of a power of two (8 to 256), the others rows of at most 8192
        if (fused_kernels_available(x_t, self.positional_embedding)
                and _attention_head_fits(self.cfg.width // self.cfg.heads) and self.cfg.width <= 8192):
            return self._predict_fused(self._blocks_fused(self._step_rows(x_t, timesteps), context_kv, text_mask))
        x = self._step_tokens(x_t, timesteps) + self.positional_embedding[:, n:]
        bias = self.attention_bias(text_mask)[:, :, n:, :]
        for i, block in enumerate(self.transformer.resblocks):
            x, _, _ = block.forward_with_kv(x, bias, context_kv[:, i])
        return self._predict(x)

    def _step_rows(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`_step_tokens(x_t, timesteps) + positional_embedding[:, n:]` for the fused path, the
        time token looked up in `_time_table` where it serves (integer timesteps): the same
        values, in 6 small launches where the sinusoid, the time MLP and the tokens' assembly took
        15."""
        table = self._time_table() if TIME_TABLE and not timesteps.is_floating_point() else None
        if table is None:
            return self._step_tokens(x_t, timesteps) + self.positional_embedding[:, self.context_len:]
        pos = self.positional_embedding[0, self.context_len:]
        time_row = table.index_select(0, timesteps.clamp(0, table.shape[0] - 1))
        proj = self.clip_img_proj
        if _skinny_fits(x_t, proj):
            image_row = cpp_ext.kernels.skinny_linear(x_t, proj.weight, proj.bias)
        else:
            image_row = proj(x_t)
        prd_row = (self.prd_emb[0, 0] + pos[2]).expand_as(time_row)
        return torch.stack([time_row, image_row + pos[1], prd_row], dim=1)

    def _time_table(self) -> torch.Tensor | None:
        """[T, W]: `time_embed(timestep_embedding(t)) + positional_embedding[n]` for every
        training timestep t (the time token of `step` with its position added, rounded as there),
        computed on first use and again whenever the time MLP or the positional embedding
        changes (storage or in-place update). None while a CUDA graph is being captured without
        a current table (the caller computes the token instead). A graph captured with the table
        keeps reading it: capture again after changing those weights, as for any captured step."""
        def build() -> torch.Tensor:
            steps, dtype = self.cfg.diffusion.num_train_timesteps, self.positional_embedding.dtype
            t = torch.arange(steps, device=self.positional_embedding.device)
            emb = self.time_embed(timestep_embedding(t, self.cfg.width, dtype=work_dtype(dtype)).to(dtype))
            return emb + self.positional_embedding[0, self.context_len]

        params = (*self.time_embed.parameters(), self.positional_embedding)
        extra = tuple((p.dtype, p.device) for p in params)
        return self._time_table_cache.get(params, extra, build)

    def _predict_fused(self, h: torch.Tensor) -> torch.Tensor:
        """`_predict` for the fused path: the `prd` rows only, through the final layer norm's kernel
        and `skinny_linear` where they fit (torch's norm and cuBLAS ran over all three tokens)."""
        last = h[:, -1].contiguous()
        proj, ln = self.out_proj, self.final_ln
        if _skinny_fits(last, proj) and ln is not None and ln.weight is not None and ln.bias is not None:
            normed = cpp_ext.kernels.residual_layer_norm(last, None, ln.weight, ln.bias, ln.eps)
            return cpp_ext.kernels.skinny_linear(normed, proj.weight, proj.bias)
        return self._predict(h)

    def _blocks_fused(self, x: torch.Tensor, context_kv: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The block stack of `step` with `cpp_ext`'s kernels (CUDA, half precision): the step
        tokens as one [B·3, W] residual stream; the attention over the cache reads the QKV output
        and the cache in place with the masks built in. Each linear layer whose input rows fit
        `skinny_linear` runs there, or on Hopper through shared memory (`staged_plan`) (weights
        streamed through the tensor cores; bias, GELU and the residual add in the epilogue; each
        kernel overlaps the one before it); the others
        run cuBLAS's GEMMs, the output projections accumulating into the stream in place without
        bias (beta = 1), each bias joining the stream in the next layer norm's kernel, which reads
        the row anyway. 7 (all skinny) to 8 launches per layer where the torch ops of
        `forward_with_kv` take 25. The same function as the loop in `step`."""
        b, t, w = x.shape
        rows = x.reshape(b * t, w).contiguous()
        keep = text_mask.bool().contiguous()
        kernels = cpp_ext.kernels
        n, first = b * t, self.transformer.resblocks[0]
        qkv_run, proj_run = few_rows_linear(n, w, first.attn.c_qkv.out_features), few_rows_linear(n, w, w)
        fc_run, out_run = few_rows_linear(n, w, first.mlp.c_fc.out_features), few_rows_linear(n, 4 * w, w)
        pending = None  # the bias of the last projection into `rows`, not yet added
        for i, block in enumerate(self.transformer.resblocks):
            attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
            h = kernels.residual_layer_norm(rows, pending, ln_1.weight, ln_1.bias, ln_1.eps)
            if qkv_run is not None:
                qkv = qkv_run(h, attn.c_qkv, 0, None)
            else:
                qkv = attn.c_qkv(h)
            mixed = kernels.prior_step_attention(qkv, context_kv[:, i], keep, attn.heads)
            pending = _project_into(rows, mixed, attn.c_proj, proj_run)
            h = kernels.residual_layer_norm(rows, pending, ln_2.weight, ln_2.bias, ln_2.eps)
            if fc_run is not None:
                hidden = fc_run(h, mlp.c_fc, SKINNY_GELU, None)
            else:
                hidden = F.gelu(mlp.c_fc(h))
            pending = _project_into(rows, hidden, mlp.c_proj, out_run)
        if pending is not None:
            rows.add_(pending)
        return rows.view(b, t, w)

    def unnormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised embedding → raw CLIP image embedding (`z·std + mean`), in ≥ float32."""
        work = work_dtype(z.dtype)
        return z.to(work) * self.clip_std.to(work) + self.clip_mean.to(work)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image embedding → standardised (`(z − mean)/std`), in ≥ float32."""
        work = work_dtype(z.dtype)
        return (z.to(work) - self.clip_mean.to(work)) / self.clip_std.to(work)
