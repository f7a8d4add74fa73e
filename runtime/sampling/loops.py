"""The denoising loops (prior, decoder, one super-res stage), each a few lines around
`update.guided_update`, and the noise they consume.

What a run consumes (text conditioning, `StageNoise`/`SamplingNoise`) lives in
`runtime.sampling.inputs`.

The loops call stage engines (`runtime.backends.engines.Engine`: torch modules, ONNX Runtime sessions or
TensorRT plans, all with the positional I/O of `runtime.backends.signatures`) and never know which
backend runs; what they need besides the networks comes from `ModelConstants`.

All noise of a run is drawn before the loops start (`SamplingNoise`), so the loops hold no
RNG state, a run is reproducible from its noise alone, and a caller (a test, DDIM inversion)
can inject its own. Engines run in their own dtype (they cast float inputs); samples and updates
stay float32 (float64 when the engines are float64, for reference checks).

Each loop is a function of tensors only (conditioning, noise, step coefficients, guidance scale)
with no host sync, so on CUDA `runtime.sampling.graphs.GraphCache` captures the whole loop (context stage
and every step) once per shape and replays it; without a cache the same function runs eagerly.
The non-finite check runs on the device and is read once, after the loop.
"""

from __future__ import annotations

import functools

import torch
from tqdm.auto import tqdm

from models.configs import DiffusionConfig
from models.layers import work_dtype
from models.super_res import upsample_low_res
from runtime.backends.engines import Engine
from runtime.backends.signatures import LoopStep, tile_starts
from runtime.constants import ModelConstants
from runtime.sampling.graphs import GraphCache
from runtime.sampling.inputs import StageNoise, TextConditioning
from runtime.sampling.schedules import StepTable
from runtime.sampling.update import UpdateSpec, guided_update, network_input, packed_coefficients

# The prior steps at which a new CUDA graph of its loop begins (see sample_prior): graphs of
# steps [0, 3) with the context, [3, 8), [8, 15) and [15, n).
PRIOR_GRAPH_SPLITS = (3, 8, 15)


class NumericalError(FloatingPointError):
    """A stage produced NaN or infinite values; names the stage and the first bad step."""


def _raise_if_bad(step: int, stage: str, steps: int) -> None:
    if step >= 0:
        raise NumericalError(f"the {stage} produced NaN or infinite values at step {step + 1} of "
                             f"{steps}; no image was returned (check the inputs, or run in float32)")


class PendingChecks:
    """Non-finite records of loops already queued on the device, read together: one host sync for
    a whole text→image run instead of one after each loop, so the host queues every stage
    without waiting and the GPU never idles between loops. `check` raises for the first stage
    (in run order) that went bad."""

    def __init__(self) -> None:
        self._items: list[tuple[torch.Tensor, str, int]] = []

    def add(self, first_bad: torch.Tensor, stage: str, steps: int) -> None:
        self._items.append((first_bad.reshape(-1)[:1], stage, steps))

    def check(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        flags = torch.cat([f.to(torch.int64) for f, _, _ in items]).tolist()  # the one host read
        for step, (_, stage, steps) in zip(flags, items, strict=True):
            _raise_if_bad(int(step), stage, steps)


def check_finite(first_bad: torch.Tensor, stage: str, steps: int, pending: PendingChecks | None = None) -> None:
    """Raise `NumericalError` if the loop recorded a non-finite sample (one host read per loop),
    or leave the record with `pending` to be read with the run's others."""
    if pending is not None:
        pending.add(first_bad, stage, steps)
        return
    _raise_if_bad(int(first_bad.reshape(-1)[0]), stage, steps)


def progress_bar(steps: int, desc: str, enabled: bool):
    return tqdm(range(steps), desc=desc, disable=not enabled, leave=False)


def _check_noise(noise: StageNoise, table: StepTable, shape: tuple[int, ...], stage: str) -> None:
    want = (len(table), *shape)
    if tuple(noise.init.shape) != shape or tuple(noise.steps.shape) != want:
        raise ValueError(
            f"{stage} noise has shapes {tuple(noise.init.shape)}/{tuple(noise.steps.shape)}, "
            f"expected {shape}/{want}"
        )


def timesteps_at(table: StepTable, i: int, batch: int, device: torch.device) -> torch.Tensor:
    return table.timesteps[i].expand(batch).to(device)


def _loop_tensors(table: StepTable, noise: StageNoise, scale: float, work: torch.dtype, device: torch.device):
    """The tensors every loop reads: x_T, per-step noise, coefficients, timesteps, guidance scale."""
    return (noise.init.to(device, work), noise.steps.to(device, work), packed_coefficients(table, work, device),
            table.timesteps.to(device), torch.full((1,), float(scale), dtype=work, device=device))


class TileBlend:
    """Tiles of side `tile` placed at `cut` (their top-left corners) blended into one `size` image:
    each pixel the weighted mean of the tiles covering it, a tile's weight ramping from near 0 to 1
    over its `overlap` border pixels (1 inside), so tiles meet without seams. The weights and their
    sum over the image are made once; calling it blends one set of tiles."""

    def __init__(self, cut: list[tuple[int, int]], tile: int, size: int, overlap: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        ramp = torch.ones(tile, dtype=dtype, device=device)
        if overlap:
            edge = torch.linspace(0, 1, overlap + 2, dtype=dtype, device=device)[1:-1]
            ramp[:overlap], ramp[tile - overlap :] = edge, edge.flip(0)
        self.cut, self.tile, self.size = cut, tile, size
        self.weight = ramp[:, None] * ramp[None]
        self.total = torch.zeros(1, 1, size, size, dtype=dtype, device=device)
        for i, j in cut:
            self.total[:, :, i : i + tile, j : j + tile] += self.weight

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tiles [n, B, C, T, T] (in `cut`'s order) → [B, C, size, size]."""
        t = self.tile
        out = tiles.new_zeros(*tiles.shape[1:3], self.size, self.size)
        for k, (i, j) in enumerate(self.cut):
            out[:, :, i : i + t, j : j + t] += tiles[k] * self.weight
        return out / self.total


def loop_steps(engine: Engine, timesteps: torch.Tensor, batch: int, *invariant: torch.Tensor) -> LoopStep:
    """`engine`'s call at each step of a loop over `timesteps` at `batch` rows, `step(i, *inputs)`:
    prepared for the whole loop where the engine can (`prepare_loop`: the torch UNets make every
    step's time-embedding projections at once), else the engine's own call. `invariant`: the
    inputs the loop keeps (the decoder's `emb_add`)."""
    prepare = getattr(engine, "prepare_loop", None)
    step = prepare(timesteps, batch, *invariant) if prepare is not None else None
    return step if step is not None else (lambda i, *inputs: engine(*inputs))


def _run(graphs: GraphCache | None, tag: tuple, loop, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Run `loop(*args)` eagerly, or as a CUDA graph replay from `graphs`."""
    return loop(*args) if graphs is None else graphs.run(tag, loop, args)


def _steps(n: int, desc: str, progress: bool, graphs: GraphCache | None):
    return progress_bar(n, desc, progress and graphs is None)  # a captured loop has no host-side steps


@torch.no_grad()
def sample_prior(
    prior_context: Engine,
    prior_step: Engine,
    diffusion: DiffusionConfig,
    constants: ModelConstants,
    text: TextConditioning,
    uncond: TextConditioning | None,
    table: StepTable,
    noise: StageNoise,
    guidance_scale: float,
    progress: bool = False,
    graphs: GraphCache | None = None,
    pending: PendingChecks | None = None,
) -> torch.Tensor:
    """Run the prior; return raw (de-standardised) CLIP image embeddings [B, D] (float32 or float64).

    The step-independent tokens go through `prior_context` once; each step runs `prior_step`
    against their cached keys and values.

    :param uncond: text conditioning of the empty prompt, batch B (None: no guidance).
    :param graphs: capture/replay the loop as a CUDA graph (None: run eagerly).
    :param pending: leave the non-finite check with it (read once per run) instead of reading it now.
    """
    b = text.embed.shape[0]
    _check_noise(noise, table, (b, constants.prior_clip_mean.shape[-1]), "prior")
    cond = TextConditioning.cat([text, uncond]) if uncond is not None else text
    spec = UpdateSpec(diffusion.prediction, diffusion.clip_range, False, uncond is not None)
    work, net = work_dtype(prior_step.float_dtype), prior_step.float_dtype
    n = len(table)

    def step_range(start: int, stop: int, x, x_in, first_bad, context_kv, mask, steps_noise, coefs, timesteps, scale):
        for i in _steps(stop - start, "prior", progress, graphs):
            i += start
            (out,) = prior_step(x_in, timesteps[i].expand(x_in.shape[0]), context_kv, mask)
            x, x_in = guided_update(out, x, steps_noise[i], coefs[i], scale, first_bad, i, spec, net)
        return x, x_in, first_bad

    # Graphs of growing length on CUDA: the context and the first steps, then the rest in three.
    # Launching a graph costs the host time per kernel before the GPU starts it, and the prior's
    # loop is the first large graph of a call: as one graph after the head, its launch outlasted
    # the head's GPU work and left the GPU idle; each launch here is covered by the GPU work of the
    # graphs launched before it (docs/performance.md).
    bounds = [0, *(s for s in PRIOR_GRAPH_SPLITS if s < n), n] if graphs is not None else [0, n]

    def first(embed, tokens, mask, init, steps_noise, coefs, timesteps, scale):
        (context_kv,) = prior_context(embed, tokens, mask)
        first_bad = torch.full((1,), -1, dtype=torch.int32, device=init.device)
        state = step_range(0, bounds[1], init, network_input(init, spec.copies, net), first_bad, context_kv, mask,
                           steps_noise, coefs, timesteps, scale)
        return (*state, context_kv)

    loop_args = _loop_tensors(table, noise, guidance_scale, work, cond.embed.device)
    x, x_in, first_bad, context_kv = _run(graphs, ("prior", spec, bounds[1]), first,
                                          (cond.embed, cond.tokens, cond.mask, *loop_args))
    for start, stop in zip(bounds[1:-1], bounds[2:], strict=True):
        rest = functools.partial(step_range, start, stop)
        x, x_in, first_bad = _run(graphs, ("prior_rest", spec, start, stop), rest,
                                  (x, x_in, first_bad, context_kv, cond.mask, *loop_args[1:]))
    x = constants.unnormalize(x)
    check_finite(first_bad, "prior", n, pending)
    return x


def decoder_conditioning(
    constants: ModelConstants, image_embed: torch.Tensor, text: TextConditioning, uncond: TextConditioning | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, TextConditioning]:
    """The decoder's conditioning rows in `dtype`: the given ones, then (with guidance, `uncond` the
    empty prompt's text) the learned unconditional image embedding with the empty prompt."""
    image_embed = image_embed.to(dtype)
    if uncond is None:
        return image_embed, text
    uncond_embed = constants.uncond_image_embed(image_embed.shape[0], dtype).to(image_embed.device)
    return torch.cat([image_embed, uncond_embed]), TextConditioning.cat([text, uncond])


@torch.no_grad()
def sample_decoder(
    decoder_context: Engine,
    decoder_step: Engine,
    diffusion: DiffusionConfig,
    constants: ModelConstants,
    image_embed: torch.Tensor,
    text: TextConditioning,
    uncond: TextConditioning | None,
    table: StepTable,
    noise: StageNoise,
    guidance_scale: float,
    progress: bool = False,
    learned_variance: bool = True,
    graphs: GraphCache | None = None,
    pending: PendingChecks | None = None,
) -> torch.Tensor:
    """Run the 64×64 decoder; return images [B, 3, S, S] in [−1, 1] (float32 or float64).

    `decoder_context` computes the conditioning (text projection, every attention block's context
    keys and values) once; `decoder_step` runs each step against it. The unconditional branch uses
    the learned unconditional image embedding and the empty prompt; guidance applies to the
    prediction, the variance comes from the conditional half. `learned_variance=False` ignores a
    learned-range variance (DDIM tables carry their own σ).
    """
    b = image_embed.shape[0]
    size = decoder_step.signature.outputs[0].shape[-1]
    _check_noise(noise, table, (b, 3, size, size), "decoder")
    net = decoder_step.float_dtype
    work = work_dtype(net)
    image_embed, text = decoder_conditioning(constants, image_embed, text, uncond, work)
    learned = diffusion.variance == "learned_range" and learned_variance
    spec = UpdateSpec(diffusion.prediction, diffusion.clip_range, learned, uncond is not None)
    n = len(table)

    def loop(embed_in, embed, tokens, mask, init, steps_noise, coefs, timesteps, scale):
        emb_add, context_kv, context_bias = decoder_context(embed_in, embed, tokens, mask)
        x, x_in = init, network_input(init, spec.copies, net)
        first_bad = torch.full((1,), -1, dtype=torch.int32, device=init.device)
        step = loop_steps(decoder_step, timesteps, x_in.shape[0], emb_add)
        for i in _steps(n, "decoder", progress, graphs):
            (out,) = step(i, x_in, timesteps[i].expand(x_in.shape[0]), emb_add, context_kv, context_bias)
            x, x_in = guided_update(out, x, steps_noise[i], coefs[i], scale, first_bad, i, spec, net)
        return x.clamp(-1, 1), first_bad

    args = (image_embed, text.embed, text.tokens, text.mask,
            *_loop_tensors(table, noise, guidance_scale, work, image_embed.device))
    x, first_bad = _run(graphs, ("decoder", spec), loop, args)
    check_finite(first_bad, "decoder", n, pending)
    return x


@torch.no_grad()
def sample_super_res(
    first_steps: Engine,
    last_step: Engine,
    diffusion: DiffusionConfig,
    low_res: torch.Tensor,
    table: StepTable,
    noise: StageNoise,
    progress: bool = False,
    graphs: GraphCache | None = None,
    pending: PendingChecks | None = None,
    size: int | None = None,
    tile: int | None = None,
    tile_overlap: int = 0,
) -> torch.Tensor:
    """One super-res stage: [B, 3, s, s] images in [−1, 1] → [B, 3, S, S] at the stage's `size`
    (None: its engines' size); `last_step` runs the final step (the same engine as `first_steps`
    for a stage without a last-step model). With `tile`, the engines see `tile`×`tile` tiles
    overlapping by `tile_overlap` pixels, every tile of every image in one batch, and their outputs
    are blended back with weights that ramp down over the overlaps (`tile_starts` places them)."""
    b = low_res.shape[0]
    size = size or first_steps.signature.outputs[0].shape[-1]
    _check_noise(noise, table, (b, 3, size, size), "super_res")
    net = first_steps.float_dtype
    work = work_dtype(net)
    spec = UpdateSpec(diffusion.prediction, diffusion.clip_range, False, False)
    n = len(table)
    starts = tile_starts(size, tile, tile_overlap) if tile else []
    cut = [(i, j) for i in starts for j in starts]

    def tiles_of(x: torch.Tensor) -> torch.Tensor:
        """Every tile of every image of x, tile-major: [n·B, C, tile, tile]."""
        return torch.cat([x[:, :, i : i + tile, j : j + tile] for i, j in cut])

    def network(step: LoopStep, i: int, x_in: torch.Tensor, t: torch.Tensor, low_in: torch.Tensor,
                blend: TileBlend | None) -> torch.Tensor:
        if blend is None:
            return step(i, x_in, t.expand(b), low_in)[0]
        (out,) = step(i, tiles_of(x_in), t.expand(low_in.shape[0]), low_in)
        return blend(out.to(work).view(len(cut), b, *out.shape[1:])).to(out.dtype)

    def loop(small, init, steps_noise, coefs, timesteps, scale):
        low_res_up = upsample_low_res(small.to(work), size).to(net)
        blend = None  # the tiles' blend and the conditioning's tiles: the same at every step
        if cut:
            blend, low_res_up = TileBlend(cut, tile, size, tile_overlap, work, init.device), tiles_of(low_res_up)
        x, x_in = init, network_input(init, 1, net)
        first_bad = torch.full((1,), -1, dtype=torch.int32, device=init.device)
        # the first steps' UNet prepared for the loop; a last-step UNet of its own runs once, as it is
        first = loop_steps(first_steps, timesteps, low_res_up.shape[0])
        last = first if last_step is first_steps else (lambda i, *inputs: last_step(*inputs))
        for i in _steps(n, "super-res", progress, graphs):
            out = network(last if i == n - 1 else first, i, x_in, timesteps[i], low_res_up, blend)
            x, x_in = guided_update(out, x, steps_noise[i], coefs[i], scale, first_bad, i, spec, net)
        return x.clamp(-1, 1), first_bad

    args = (low_res.to(work), *_loop_tensors(table, noise, 1.0, work, low_res.device))
    x, first_bad = _run(graphs, ("super_res", first_steps.signature.name, spec), loop, args)
    check_finite(first_bad, "super-res", n, pending)
    return x
