"""`UnCLIP`: the public text→image API (load a model, validate inputs, run the stages).

    pipe = UnCLIP.from_karlo("/weights/karlo")          # or from_diffusers / UnCLIP("our-folder")
    images = pipe.generate("a red circle", seed=0).images
    pipe = UnCLIP(engine_dir="engines/default", backend="onnxruntime")   # the exported engines
    pipe = UnCLIP(prior="ar")                            # the paper's autoregressive prior

Every stage runs through an `Engine` (`runtime.backends.engines`): the torch modules, or the engines of
a folder built by `python -m export.build_engines`; the sampling loops do not know which.

Every argument is checked here, at the boundary, so bad input fails with a clear message
before any network runs.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

import cpp_ext
from models import fp8
from models.checkpoint import load_tensors
from models.clip import KarloTokenizer
from models.config_schema import read_config
from models.configs import DiffusionConfig, UnCLIPConfig, with_prior_clip_range
from models.file_integrity import CHECKSUMS, IntegrityError, read_checksums, verify_files
from models.fused.options import DEFAULT as DEFAULT_FUSED
from models.fused.options import FusedOptions
from models.layers import work_dtype
from models.unclip import UnCLIPModel
from runtime.backends.choose import choose_backend, measured_engines, open_engines
from runtime.backends.engines import Engine, EngineFolder
from runtime.backends.measured import StageChoice
from runtime.backends.signatures import super_res_stages
from runtime.batch_invariance import row_invariant
from runtime.call_limits import MAX_GUIDANCE, check_host_memory, check_noise, default_chunk, host_bytes_per_image
from runtime.constants import ModelConstants
from runtime.image_tools import ImageTools
from runtime.outputs import OUTPUT_TYPES, UnCLIPOutput, queue_host_copy, queue_output
from runtime.sampling import loops
from runtime.sampling.ar_loop import ARNoise, ARSettings, sample_ar_prior
from runtime.sampling.fixed_batch import in_fixed_batches
from runtime.sampling.graphs import GraphCache
from runtime.sampling.inputs import SamplingNoise, StageNoise, TextConditioning, to_device
from runtime.sampling.loops import PendingChecks
from runtime.sampling.schedules import StepTable, make_step_table
from runtime.serial import serialised
from runtime.validate import check_chain, check_int, check_scale, check_seed

log = logging.getLogger(__name__)

PRIORS = ("diffusion", "ar")
# The small model trained on generated shapes that ships in the repository (see train/).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "default"
NO_DEFAULT_MODEL = (
    f"the shipped default model is missing ({DEFAULT_MODEL}); run from a checkout of unclip-rt, or load "
    "weights explicitly with UnCLIP.from_karlo(DIR) (Kakao Brain's original files), UnCLIP.from_diffusers(DIR) "
    "(a kakaobrain/karlo-v1-alpha folder) or UnCLIP(DIR) (a folder written by models.checkpoint.save_model)"
)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The chunks of a run's results as one batch (the tensor itself for one chunk: no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return list(prompts)


class UnCLIP(ImageTools):
    """A loaded unCLIP model on one device, ready to generate; the image tools (`encode_image`,
    `invert`, `decode`, `variations`, `interpolate`, `text_diff`) come from `ImageTools`.

    Thread-safe by serialisation: calls from several threads run one at a time (see
    `runtime.serial`) and each returns what it would have returned alone."""

    def __init__(
        self,
        model: UnCLIPModel | str | Path | None = None,
        *,
        engine_dir: str | Path | None = None,
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        cuda_graphs: bool | None = None,
        channels_last: bool | None = None,
        max_batch: int | None = None,
        prior: str = "diffusion",
        fused: FusedOptions | None = None,
        prior_dtype: torch.dtype | None = None,
        precision: str | None = None,
        fp8_scales: str | Path | None = None,
        fp8_networks: Sequence[str] | None = None,
        prior_batch: int | None = None,
    ) -> None:
        """
        :param model: an `UnCLIPModel`, or a folder with `config.json` + `model.safetensors`;
            None loads the shipped default model (`weights/default`, trained on generated shapes).
        :param engine_dir: a folder built by `python -m export.build_engines` from this model; its
            manifest must match the model's config and weights, or it is refused as stale.
        :param backend: "torch" (the modules), "onnxruntime" or "tensorrt" (the engines of
            `engine_dir`), "measured" (each stage on torch or on ONNX Runtime with the folder's
            graph, whichever is faster here, timed at start-up; `backend_choice` says what ran
            where and why), or "auto": the fastest this machine can run (see docs/engines.md,
            "Backends"; on a GPU with ONNX Runtime's CUDA provider and an engine folder, "measured").
        :param device: where to run (default: CUDA if available, else CPU).
        :param dtype: network dtype for the torch backend (float32 default, float16, bfloat16;
            float64 for reference checks). Engines run in the precision they were built in; a
            dtype that differs from it is an error. Sampling math runs in float32 (float64 with
            float64 networks).
        :param progress: show tqdm progress bars (not with CUDA graphs: a captured loop has no host-side steps).
        :param cuda_graphs: capture each sampling loop as a CUDA graph on first use and replay it
            (None: on when the device is CUDA and the backend's engines can be captured — torch
            and tensorrt; ONNX Runtime cannot). The first call per batch size and step count
            captures (about three eager runs); later calls replay.
        :param channels_last: run the decoder and super-res UNets in channels-last memory (torch
            backend). None: on for CUDA in half precision when `cpp_ext` is built (its group norm
            reads channels-last natively; measured faster, see docs/performance.md), else off.
        :param max_batch: most images per network call; `generate` runs larger requests in chunks
            of this many, each with its own slice of the noise (the same images as one call). None:
            no limit, or the engine folder's `--max-batch` for TensorRT plans (their profiles end there).
        :param prior: "diffusion" (the diffusion prior, as Karlo) or "ar" (the paper's autoregressive
            prior, for models that have one, such as the shipped default model; see docs/ar-prior.md).
        :param fused: the fused path's switches (`models.fused.FusedOptions`; torch backend on CUDA in
            half precision). None: the default, every fusion on.
        :param prior_dtype: network dtype of the conditioning stages — CLIP's encoders and the prior
            (diffusion or autoregressive) — for the torch backend; None: `dtype`. float32 under a
            float16 `dtype` makes an image's embedding independent of the batch it runs in: the
            prior's guided loop amplifies rounding, and fp16 kernels round differently at different
            batch sizes. A service that joins requests runs so (docs/serving.md).
        :param precision: None (the networks in `dtype`) or "fp8": the large linear maps of
            `fp8_networks` (`models.fp8.policy`: the UNets' convolutions and attention
            projections, the prior's transformer linears) with e4m3 weights (a scale per output channel) and e4m3
            inputs (a scale per tensor), everything else in `dtype`; torch backend. Its error
            against fp32 is measured in docs/fp8.md.
        :param fp8_scales: the activation scales of `precision="fp8"`: None — calibrated ones
            from the model folder's `fp8_scales.safetensors` where it has one (the default model
            does; `python -m runtime.fp8_calibration` writes it), else each input's own;
            "dynamic" — each input's own; or the path of a scales file for these weights.
        :param fp8_networks: which networks `precision="fp8"` converts, of "decoder", "super_res"
            and "prior" (None: the super-res chain; docs/fp8.md measures each).
        :param prior_batch: run the text encoder and the prior on exactly this many prompts /
            images per call (fewer padded, more in several calls; None: as many as the call has).
            Their rows never mix, so at a fixed batch every row takes the same kernels: an image's
            embedding is then the same alone or batched with others on any device and dtype (the
            prior's guided loop amplifies the rounding differences other batch sizes would bring).
            A service that joins requests sets it (`python -m serve --prior-batch`, default 4;
            docs/serving.md); the padding rows cost little next to the decoder and super-res,
            which run unpadded.
        """
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if fused is not None and not isinstance(fused, FusedOptions):
            raise TypeError(f"fused must be a models.fused.FusedOptions or None, got {type(fused).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        given = [name for name, value in (("fp8_scales", fp8_scales), ("fp8_networks", fp8_networks))
                 if value is not None]
        if precision is None and given:
            raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for precision='fp8'")
        if fp8_networks is not None:
            fp8_networks = fp8.check_groups(fp8_networks)
        if model is None:
            if not (DEFAULT_MODEL / "model.safetensors").is_file():
                raise FileNotFoundError(NO_DEFAULT_MODEL)
            model = DEFAULT_MODEL
        model_folder = Path(model) if isinstance(model, (str, Path)) else None
        if precision is None and isinstance(model, UnCLIPModel) and fp8.fp8_layers(model):
            precision = "fp8"  # a model converted by another UnCLIP: it runs as it is
        if isinstance(model, (str, Path)):
            model = load_folder(model)
        if not isinstance(model, UnCLIPModel):
            raise TypeError(f"model must be an UnCLIPModel or a folder path, got {type(model).__name__}")
        for name, value in (("max_batch", max_batch), ("prior_batch", prior_batch)):
            if value is not None:
                check_int(name, value, 1, 1 << 20)
        for name, value in (("dtype", dtype), ("prior_dtype", prior_dtype)):
            if value is not None and value not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {value}")
        self.device = torch.device(device) if device is not None else _default_device()
        self.cfg: UnCLIPConfig = model.cfg
        self.tokenizer = KarloTokenizer(self.cfg.clip.context_length)
        self.progress = progress
        if precision == "fp8" and (backend not in ("torch", "auto") or engine_dir is not None):
            raise ValueError("precision='fp8' runs the torch modules: leave engine_dir unset and backend torch or auto")
        if precision == "fp8" and dtype == torch.float64:
            raise ValueError("precision='fp8' takes dtype float32, float16 or bfloat16 (not float64) for what "
                             "stays unquantised")
        self.backend = choose_backend(backend, engine_dir, self.device, dtype)
        self.backend_choice: list[StageChoice] = []  # per stage, where the backend is `measured`
        if self.backend in ("torch", "measured"):
            folder = None
            if self.backend == "measured":
                if prior_dtype is not None:
                    raise ValueError("prior_dtype is for the torch backend; the measured backend runs every stage "
                                     "in the engine folder's precision")
                folder = _checked_folder(model, engine_dir, dtype)
                dtype = folder.float_dtype
            self.dtype = dtype or torch.float32
            self.prior_dtype = prior_dtype or self.dtype
            self.model: UnCLIPModel | None = _converted(model, self.device, self.dtype, self.prior_dtype)
            self.precision, self.fp8_scales = precision, None
            if precision == "fp8":
                self.model, self.fp8_scales = _fp8_model(self.model, model, model_folder, fp8_scales,
                                                          fp8_networks or fp8.DEFAULT_GROUPS)
            if channels_last is None:
                channels_last = (self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
                                 and cpp_ext.kernels is not None)
            self.channels_last = bool(channels_last)
            if folder is None:
                self.engines: dict[str, Engine] = open_engines("torch", self.model, None, self.device,
                                                               self.channels_last, fused or DEFAULT_FUSED)
            else:
                self.engines, self.backend_choice = measured_engines(self.model, folder, self.device,
                                                                     self.channels_last, fused or DEFAULT_FUSED)
                log.info("backend measured on %s: %s", self.device,
                         "; ".join(c.describe() for c in self.backend_choice))
            self.constants = ModelConstants.from_model(self.model).to(self.device)
            engine_limit = None
        else:
            if prior_dtype is not None:
                raise ValueError(f"prior_dtype is for the torch backend; the {self.backend} engines run in the "
                                 "precision they were built in")
            self.engines, self.constants, self.dtype, engine_limit = _engines_for(
                model, engine_dir, self.backend, self.device, dtype)
            self.prior_dtype = self.dtype
            self.precision, self.fp8_scales = None, None
            self.model = None  # the engines run every stage; the torch modules are not kept
            self.channels_last = False
        limits = [v for v in (max_batch, engine_limit) if v is not None]
        self.max_batch: int | None = min(limits) if limits else None
        if prior_batch is not None and engine_limit is not None and prior_batch > engine_limit:
            raise ValueError(f"prior_batch {prior_batch} is beyond the engines' batch limit {engine_limit} "
                             "(the engine folder's --max-batch)")
        self.prior = prior
        self.prior_batch = prior_batch
        if prior == "ar":
            _check_ar_prior(self.engines, self.constants, engine_dir)
        self.graphs = _graph_cache(cuda_graphs, self.device, self.engines)
        self._empty_prompt: TextConditioning | None = None  # computed once, on first use
        self._step_tables: dict[tuple[str, int], StepTable] = {}  # on the device, per (stage, steps)

    @classmethod
    def from_karlo(
        cls, folder: str | Path, *, prior_clip_range: float | None = None, trust_pickle: bool = False, **kwargs
    ) -> UnCLIP:
        """Load Kakao Brain's original Karlo files (see `models.convert.karlo`).

        :param prior_clip_range: prior x0 clamp; default ±5 as diffusers (Karlo itself uses 10).
        :param trust_pickle: allow files that need full unpickling (runs code: trusted files only).
        """
        from models.configs import KARLO
        from models.convert.karlo import load_karlo

        cfg = KARLO if prior_clip_range is None else with_prior_clip_range(KARLO, prior_clip_range)
        return cls(load_karlo(folder, cfg, trust_pickle=trust_pickle), **kwargs)

    @classmethod
    def from_diffusers(cls, folder: str | Path, **kwargs) -> UnCLIP:
        """Load a diffusers unCLIP folder such as `kakaobrain/karlo-v1-alpha`."""
        from models.convert.diffusers_folder import load_diffusers

        return cls(load_diffusers(folder), **kwargs)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """diffusers-style switch for the progress bars."""
        self.progress = not disable

    @serialised
    @row_invariant
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextConditioning:
        """Tokenise (Karlo's way) and run the CLIP text encoder (replayed from a CUDA graph when
        graphs are on; the empty prompt, which every guided call needs, is encoded once)."""
        if prompts == [""] and self._empty_prompt is not None:
            return self._empty_prompt  # the unconditional branch's text, the same on every call
        tok = self.tokenizer(prompts)
        keep = self.cfg.clip.context_length - 2  # SOT and EOT take two of the context's places
        for i, cut in enumerate(tok.truncated):
            if cut:
                ids = self.tokenizer.ids(prompts[i])
                decode = self.tokenizer.bpe.decode
                log.warning("prompt cut to %d tokens; dropped: %r (kept: %r)", self.cfg.clip.context_length,
                            decode(list(ids[keep:])).strip(), decode(list(ids[:keep])).strip())
        tokens = to_device(tok.tokens, self.device)
        engine = self.engines["clip_text"]

        def encode(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return engine(tokens) if self.graphs is None else self.graphs.run(("clip_text",), engine, (tokens,))

        embed, seq = in_fixed_batches(encode, len(prompts), self.prior_batch, tokens)
        work = work_dtype(self.dtype)
        text = TextConditioning(embed.to(work), seq.to(work), to_device(tok.mask, self.device))
        if prompts == [""]:
            self._empty_prompt = text
        return text

    @property
    def _pin_noise(self) -> bool:
        """Whether noise is drawn into page-locked memory (a CUDA run: its uploads need no staging copy)."""
        return self.device.type == "cuda"

    def draw_noise(
        self, batch: int, prior_steps: int, decoder_steps: int, super_res_steps: int | Sequence[int],
        generator: torch.Generator | None,
    ) -> SamplingNoise:
        """All noise of one run, drawn on the CPU (so a seed gives the same images on any device):
        the prior's, the decoder's, then each super-res stage's in the chain's order.
        `super_res_steps`: the steps of each stage that runs (one integer: the first stage only,
        for a model of one stage; a sequence: one per stage, from the first). With the
        autoregressive prior, its noise is an `ARNoise` and `prior_steps` is not used."""
        chain = (super_res_steps,) if isinstance(super_res_steps, int) else tuple(super_res_steps)
        prior_noise = self._draw_prior_noise(batch, prior_steps, generator)
        return SamplingNoise(prior_noise, self._draw_decoder_noise(batch, decoder_steps, generator),
                             self._draw_super_res_noise(batch, chain, generator))

    def _draw_prior_noise(self, batch: int, steps: int, generator: torch.Generator | None) -> StageNoise | ARNoise:
        """The prior's part of `draw_noise` (drawn first)."""
        if self.prior == "ar":
            return ARNoise.draw(batch, self.cfg.ar_prior.components, generator)
        return StageNoise.draw((batch, self.cfg.prior.clip_dim), steps, generator, self._pin_noise)

    def _draw_decoder_noise(self, batch: int, steps: int, generator: torch.Generator | None) -> StageNoise:
        """The decoder's part of `draw_noise` (drawn after the prior's)."""
        d = self.cfg.decoder.image_size
        return StageNoise.draw((batch, 3, d, d), steps, generator, self._pin_noise)

    def _draw_super_res_noise(self, batch: int, steps: tuple[int, ...],
                              generator: torch.Generator | None) -> tuple[StageNoise, ...]:
        """The super-res part of `draw_noise` (drawn last): each stage's that runs, in order."""
        sizes = self.cfg.image_sizes[1:]
        return tuple(StageNoise.draw((batch, 3, size, size), n, generator, self._pin_noise)
                     for size, n in zip(sizes, steps, strict=False))

    @serialised
    @row_invariant
    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        super_res_steps: int | Sequence[int] | None = None,
        prior_guidance_scale: float | None = None,
        decoder_guidance_scale: float | None = None,
        output_type: str = "pil",
        return_image_embeds: bool = False,
        noise: SamplingNoise | None = None,
        return_decoder_images: bool = False,
        size: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        similarity_quantiles: tuple[float, float] | None = None,
    ) -> UnCLIPOutput:
        """Text → images.

        :param prompt: a prompt or a list of prompts; "" asks for an unconditional image.
        :param num_images_per_prompt: images per prompt.
        :param seed: seed of a CPU generator for all the noise (ignored if `generator` or `noise`).
        :param generator: a `torch.Generator` (CPU) to draw the noise from.
        Steps and guidance scales left as None take the model's `cfg.sampling` (Karlo's 25/25/7
        steps and guidance 4/8 unless the model's config.json says otherwise).

        :param prior_steps: prior denoising steps (1..1000).
        :param decoder_steps: decoder denoising steps (1..1000).
        :param super_res_steps: steps of each super-res stage that runs (2..1000; the last runs the
            stage's last-step model where it has one): one integer for every stage, or one per stage
            in the chain's order; None: each stage's own (`cfg.super_res[i].steps`).
        :param prior_guidance_scale: classifier-free guidance on the prior's x0 (1 = none).
        :param decoder_guidance_scale: classifier-free guidance on the decoder's output (1 = none).
        :param output_type: "pil" (list of PIL images), "np" ([B, H, W, 3]) or "pt" ([B, 3, H, W]).
        :param return_image_embeds: also return the prior's CLIP image embeddings [B, D].
        :param noise: all noise of the run, pre-drawn with `draw_noise` (a `SamplingNoise` of
            `StageNoise`s: x_T and one noise tensor per step for each stage, the prior's an
            `ARNoise` with `prior="ar"`); overrides seeds. `draw_noise(n, steps…, generator)` gives
            exactly the noise `generate` draws from that generator, so a run can be replayed or
            split. Each part is checked (type, shape) before any network runs.
        :param return_decoder_images: also return the decoder's images (before super-resolution)
            as `decoder_images`, in `output_type`.
        :param size: the images' size: the decoder's or a super-res stage's (`cfg.image_sizes`); the
            chain stops at that stage. None: the model's default (`cfg.sampling.image_size`, else
            the last stage's).
        :param temperature: autoregressive prior only: logits are divided by it (default 1).
        :param top_k: autoregressive prior only: draw each code from the k most likely (default: all).
        :param top_p: autoregressive prior only: draw from the smallest set of codes holding this
            much probability (default: all).
        :param similarity_quantiles: autoregressive prior only: (low, high), the range of quantiles
            of the training text–image similarity the similarity token is drawn from (default
            (0.5, 1.0), the top half, as the paper; higher asks for images that fit the caption closer).
        The prior steps and guidance scale belong to the diffusion prior; with `prior="ar"` they
        are an error, as are temperature/top_k/top_p with the diffusion prior.
        :return: `UnCLIPOutput`.
        """
        prompts = _check_prompts(prompt)
        ar_settings = self._ar_settings(temperature, top_k, top_p, similarity_quantiles, prior_steps,
                                        prior_guidance_scale)
        n = check_int("num_images_per_prompt", num_images_per_prompt, 1, 1024)
        s = self.cfg.sampling.with_overrides(
            prior_steps=prior_steps, decoder_steps=decoder_steps,
            prior_guidance_scale=prior_guidance_scale, decoder_guidance_scale=decoder_guidance_scale,
        )
        steps = {
            "prior_steps": check_int("prior_steps", s.prior_steps, 1, 1000),
            "decoder_steps": check_int("decoder_steps", s.decoder_steps, 1, 1000),
            "super_res_steps": check_chain(size, super_res_steps, self.cfg),
        }
        prior_scale = check_scale("prior_guidance_scale", s.prior_guidance_scale, MAX_GUIDANCE)
        decoder_scale = check_scale("decoder_guidance_scale", s.decoder_guidance_scale, MAX_GUIDANCE)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        want = ARNoise if ar_settings is not None else StageNoise
        if noise is not None and (not isinstance(noise, SamplingNoise) or not isinstance(noise.prior, want)):
            raise TypeError(f"noise must be a SamplingNoise whose prior noise is a {want.__name__} for the "
                            f"{self.prior} prior (see UnCLIP.draw_noise)")
        images = len(prompts) * n
        if noise is not None:
            check_noise(noise, images, steps, self.cfg, ar_settings is not None)
        check_host_memory(images, host_bytes_per_image(self.cfg, steps, ar_settings is not None))
        if noise is None and generator is None and seed is not None:
            generator = torch.Generator().manual_seed(check_seed(seed))

        text = self.encode_prompts(prompts)
        text = TextConditioning(*(t.repeat_interleave(n, dim=0) for t in (text.embed, text.tokens, text.mask)))
        b = text.embed.shape[0]
        if ar_settings is not None:
            prior_scale = 1.0  # the AR prior is not guided: its similarity token asks for caption fit
        need_uncond = prior_scale != 1.0 or decoder_scale != 1.0
        uncond = None
        if need_uncond:
            uncond = self.encode_prompts([""]).expand(b)
        # Noise drawn here comes in the order of draw_noise (prior, decoder, super-res), each stage's
        # on the CPU while the GPU runs the stage before it (the prior's during the text encoder):
        # at Karlo's sizes drawing the super-res noise takes about as long as the whole prior loop.
        later_draws: list[Callable[[], StageNoise]] = []
        if noise is None:
            noise = SamplingNoise(self._draw_prior_noise(b, steps["prior_steps"], generator), None, None)
            later_draws = [functools.partial(self._draw_decoder_noise, b, steps["decoder_steps"], generator),
                           functools.partial(self._draw_super_res_noise, b, steps["super_res_steps"], generator)]

        chunk = self.max_batch or default_chunk(self.device)
        prior_table = self._step_table("prior", steps["prior_steps"])
        # On a GPU every stage is queued without a host wait: each uploads its inputs from pinned
        # memory without blocking, and the loops' non-finite records are read once, at the end.
        pending = PendingChecks() if self.device.type == "cuda" else None
        all_images, all_embeds, all_small = [], [], []
        for start in range(0, b, chunk):  # images beyond the engines' batch limit run in more calls
            stop = min(b, start + chunk)
            part = text.rows(start, stop)
            part_uncond = uncond.rows(start, stop) if uncond is not None else None
            image_embeds = self.sample_image_embeds(part, part_uncond if prior_scale != 1.0 else None,
                                                    noise.prior.rows(start, stop), prior_scale, prior_table,
                                                    ar_settings, pending)
            if later_draws:  # the decoder's noise, while the GPU runs the prior
                noise = replace(noise, decoder=later_draws.pop(0)())
            # each stage uploads its own noise (pinned, non-blocking)
            decoder_uncond = part_uncond if decoder_scale != 1.0 else None
            small = self._sample_decoder(image_embeds, part, decoder_uncond, decoder_scale, steps["decoder_steps"],
                                         noise.decoder.rows(start, stop), pending)
            if later_draws:  # the super-res noise, while the GPU runs the decoder
                noise = replace(noise, super_res=later_draws.pop(0)())
            all_images.append(self.sample_super_res_chain(small, steps["super_res_steps"],
                                                          noise.super_res, start, stop, pending))
            if return_decoder_images:
                all_small.append(small)
            all_embeds.append(image_embeds)
        # the outputs' conversions and downloads are queued behind the last loop before the one
        # host wait (the non-finite records' read), so the GPU runs them without host gaps
        images = queue_output(_joined(all_images), output_type)
        small = queue_output(_joined(all_small), output_type) if return_decoder_images else None
        embeds = queue_host_copy(_joined(all_embeds)) if return_image_embeds else None
        if pending is not None:
            pending.check()
        return UnCLIPOutput(images.result(), embeds.result() if embeds is not None else None,
                            small.result() if small is not None else None)

    def _step_table(self, stage: str, steps: int, diffusion: DiffusionConfig | None = None) -> StepTable:
        """The stage's ancestral step table on the device, built once per step count (a host →
        device copy per call would wait for the GPU's queue). `diffusion`: the stage's settings,
        where `stage` does not name a config field (a super-res stage's)."""
        key = (stage, steps)
        if key not in self._step_tables:
            diffusion = diffusion or getattr(self.cfg, stage).diffusion
            self._step_tables[key] = make_step_table(diffusion, steps).to(self.device)
        return self._step_tables[key]

    def sample_image_embeds(
        self, text: TextConditioning, uncond: TextConditioning | None, noise: StageNoise | ARNoise, scale: float,
        table: StepTable, ar_settings: ARSettings | None, pending: PendingChecks | None = None,
    ) -> torch.Tensor:
        """The prior alone on encoded text, one chunk of a `generate` call: CLIP image embeddings
        [B, D]. The autoregressive prior with `ar_settings` (and its `ARNoise`), else the diffusion
        prior with guidance `scale` (`uncond`: the empty prompt's text, None without guidance) over
        `table`'s steps. `generate` calls it; `train.evaluate` times it alone. `pending`: leave the
        non-finite check with it (read once per run)."""
        cfg, e = self.cfg, self.engines

        def run(text: TextConditioning, uncond: TextConditioning | None, noise: StageNoise | ARNoise) -> torch.Tensor:
            if ar_settings is not None:
                return sample_ar_prior(e["ar_prior_context"], e["ar_prior_step"], self.constants, text, noise,
                                       ar_settings, cfg.ar_prior.similarity_buckets, self.progress, self.graphs,
                                       pending)[0]
            return loops.sample_prior(e["prior_context"], e["prior_step"], cfg.prior.diffusion, self.constants, text,
                                      uncond, table, noise.to(self.device), scale, self.progress, self.graphs, pending)

        return in_fixed_batches(run, text.embed.shape[0], self.prior_batch, text, uncond, noise)

    def _ar_settings(
        self, temperature: float | None, top_k: int | None, top_p: float | None,
        similarity_quantiles: tuple[float, float] | None, prior_steps: int | None, prior_guidance_scale: float | None,
    ) -> ARSettings | None:
        """The AR prior's checked sampling settings (None with the diffusion prior); arguments of
        the other prior are refused rather than silently ignored."""
        if self.prior == "diffusion":
            given = [n for n, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                    ("similarity_quantiles", similarity_quantiles)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply to the autoregressive prior; this UnCLIP runs the "
                                 "diffusion prior (load it with UnCLIP(..., prior='ar'))")
            return None
        given = [n for n, v in (("prior_steps", prior_steps), ("prior_guidance_scale", prior_guidance_scale))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to the diffusion prior; this UnCLIP runs the autoregressive "
                             "prior (its settings: temperature, top_k, top_p, similarity_quantiles)")
        return ARSettings.from_arguments(temperature, top_k, top_p, similarity_quantiles, self.cfg.ar_prior.buckets)

    def _sample_decoder(
        self, image_embeds: torch.Tensor, text: TextConditioning, uncond: TextConditioning | None, scale: float,
        steps: int, noise: StageNoise, pending: PendingChecks | None = None,
    ) -> torch.Tensor:
        """CLIP image embeddings → 64² decoder images [B, 3, d, d] in [−1, 1] (queued, not waited for)."""
        e = self.engines
        return loops.sample_decoder(
            e["decoder_context"], e["decoder_step"], self.cfg.decoder.diffusion, self.constants, image_embeds, text,
            uncond, self._step_table("decoder", steps), noise.to(self.device), scale, self.progress,
            graphs=self.graphs, pending=pending,
        )

    def sample_super_res_chain(
        self, images: torch.Tensor, steps: tuple[int, ...], noise: tuple[StageNoise, ...], start: int = 0,
        stop: int | None = None, pending: PendingChecks | None = None,
    ) -> torch.Tensor:
        """Decoder images [B, 3, d, d] in [−1, 1] through the first `len(steps)` super-res stages
        of the chain, each with its steps and its noise (rows `start:stop` of each stage's noise:
        one chunk of a call); returns the last stage's images (the input when no stage runs)."""
        for i, n in enumerate(steps):
            names = super_res_stages(self.cfg, i)
            first, last = self.engines[names[0]], self.engines[names[-1]]
            stage = self.cfg.super_res[i]
            part = noise[i].rows(start, images.shape[0] + start if stop is None else stop)
            images = loops.sample_super_res(
                first, last, stage.diffusion, images, self._step_table(names[0], n, stage.diffusion),
                part.to(self.device), self.progress, graphs=self.graphs, pending=pending, size=stage.image_size,
                tile=stage.tile, tile_overlap=stage.tile_overlap,
            )
        return images


def _engines_for(
    model: UnCLIPModel, engine_dir: str | Path, backend: str, device: torch.device, dtype: torch.dtype | None
) -> tuple[dict[str, Engine], ModelConstants, torch.dtype, int | None]:
    """The engines of a folder checked against `model`, its constants, its precision and the most
    images per call its engines take (TensorRT plans: the `--max-batch` they were built for)."""
    folder = _checked_folder(model, engine_dir, dtype)
    engines = open_engines(backend, None, folder, device)
    limit = folder.manifest.get("max_images") if backend == "tensorrt" else None
    return engines, folder.constants().to(device), folder.float_dtype, limit


def _checked_folder(model: UnCLIPModel, engine_dir: str | Path, dtype: torch.dtype | None) -> EngineFolder:
    """The engine folder at `engine_dir`, checked against `model` and the asked `dtype`."""
    folder = EngineFolder.open(engine_dir)
    folder.check_model(model)
    if dtype is not None and dtype != folder.float_dtype:
        raise ValueError(f"{engine_dir} holds {folder.manifest['precision']} engines; leave dtype unset or pass "
                         f"{folder.float_dtype}, or build the other precision with {folder.rebuild_command}")
    return folder


PRECISIONS = (None, "fp8")


def _fp8_model(converted: UnCLIPModel, original: UnCLIPModel, folder: Path | None,
               scales: str | Path | None, groups: tuple[str, ...]) -> tuple[UnCLIPModel, str]:
    """`converted` (or a copy, if it is the caller's model) with its FP8 layers
    (`models.fp8.policy.convert`), and where its activation scales come from."""
    from models.checkpoint import weights_sha256
    from models.fp8.scales import folder_scales, load_scales

    if fp8.fp8_layers(converted):  # a model another UnCLIP converted (a service's second prior shares it)
        if scales is not None:
            raise ValueError("fp8_scales: this model's FP8 layers are converted already, with their own scales")
        return converted, "as converted"
    path = None
    if scales is None and folder is not None:
        path = folder_scales(folder)
    elif scales is not None and scales != "dynamic":
        path = Path(scales)
        if not path.is_file():
            raise FileNotFoundError(f"fp8_scales: {path} is not a file "
                                    "(write one with python -m runtime.fp8_calibration)")
    input_scales = None
    if path is not None:
        input_scales = load_scales(path, weights_sha256(original), fp8.fp8_layer_names(converted, groups))
    model = copy.deepcopy(converted) if converted is original else converted
    fp8.convert(model, groups, input_scales=input_scales)
    return model, f"calibrated ({path})" if path is not None else "dynamic"


CONDITIONING_MODULES = ("clip", "prior", "ar_prior")  # the stages `prior_dtype` sets


def _converted(model: UnCLIPModel, device: torch.device, dtype: torch.dtype,
               prior_dtype: torch.dtype | None = None) -> UnCLIPModel:
    """`model` on `device` in `dtype` (its `CONDITIONING_MODULES` in `prior_dtype`, default
    `dtype`), in eval mode, never changing the caller's model: it is used as it is when it already
    is so, else its tensors are converted into a new model (built on the meta device, so only the
    converted copy takes memory), leaving other `UnCLIP`s built on it intact."""
    prior_dtype = prior_dtype or dtype

    def wanted(name: str, t: torch.Tensor) -> torch.dtype:
        if not t.is_floating_point() or t.dtype == torch.float8_e4m3fn:  # FP8 layers keep their e4m3 weights
            return t.dtype
        return prior_dtype if name.split(".", 1)[0] in CONDITIONING_MODULES else dtype

    tensors = [*model.named_parameters(), *model.named_buffers()]
    ready = not model.training and all(t.device == device and t.dtype == wanted(k, t) for k, t in tensors)
    if ready or not tensors:
        return model
    state = {k: v.detach().to(device=device, dtype=wanted(k, v), copy=True) for k, v in model.state_dict().items()}
    copy = UnCLIPModel.empty(model.cfg, with_vision=model.clip.has_vision, with_ar_prior=model.ar_prior is not None)
    copy.load_state_dict(state, assign=True)
    copy.materialize_buffers()  # on the loaded weights' device
    for name, part in copy.named_children():  # the materialized buffers too
        part.to(dtype=prior_dtype if name in CONDITIONING_MODULES else dtype)
    return copy.eval()


def _check_ar_prior(engines: dict[str, Engine], constants: ModelConstants, engine_dir: str | Path | None) -> None:
    """Refuse `prior="ar"` for a model (or engine folder) without an autoregressive prior."""
    if "ar_prior_step" in engines and constants.has_ar_prior:
        return
    if engine_dir is not None:
        raise ValueError(f"prior='ar': the engine folder {engine_dir} has no autoregressive prior stages; rebuild it "
                         "with python -m export.build_engines from a model that has one (the default model does)")
    raise ValueError("prior='ar': this model has no autoregressive prior (Karlo ships only the diffusion prior; the "
                     "shipped default model has both); use prior='diffusion'")


def _graph_cache(requested: bool | None, device: torch.device, engines: dict[str, Engine]) -> GraphCache | None:
    """A CUDA graph cache when asked for (or by default where it works), else None (eager loops)."""
    capturable = all(getattr(e, "capturable", False) for e in engines.values())
    if requested is None:
        requested = device.type == "cuda" and capturable
    if not requested:
        return None
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}")
    if not capturable:
        raise ValueError("cuda_graphs=True: this backend's engines cannot be captured in a CUDA graph "
                         "(ONNX Runtime synchronises inside a run); use backend='torch' or 'tensorrt'")
    return GraphCache(device)


def load_folder(folder: str | Path) -> UnCLIPModel:
    """Load our own format: `config.json` + `model.safetensors` (see `models.checkpoint.save_model`)."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{folder} is not an unclip-rt model folder (needs config.json and model.safetensors)")
    hint = ("write the folder again (models.checkpoint.save_model, or copy it again from where it came from)")
    recorded = read_checksums(folder, hint)
    if recorded is None:
        log.warning("%s has no %s: its files are not verified (save it again with models.checkpoint.save_model "
                    "to record their SHA-256)", folder, CHECKSUMS)
    else:
        missing = sorted({"config.json", "model.safetensors"} - set(recorded))
        if missing:
            raise IntegrityError(f"{folder / CHECKSUMS}: records no SHA-256 for {', '.join(missing)}; {hint}")
        verify_files(folder, recorded, hint)
    cfg = read_config(config_path)
    state = load_tensors(weights_path)
    return UnCLIPModel.from_state(cfg, state, f"model folder {folder}")
