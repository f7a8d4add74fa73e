"""A model replica: one `runtime.UnCLIP` on its device, its requests batched.

Text-to-image requests with equal sampling settings run as one `generate` call (see
`serve.batcher`); each request's noise is drawn from its own seed exactly as a lone
`UnCLIP.generate(prompt, num_images_per_prompt=n, seed=seed)` draws it, so its images are that
call's images (bit for bit on the CPU, where the runtime's products are row-invariant). Variations
run alone. Noise is drawn and images encoded (`serve.encoding`) on helper threads while the runner
thread keeps the device busy. Bad input is refused before a job is queued, so one request never fails a batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from serve.batcher import Batcher, BatchInfo, DeadlineExceeded, Job
from serve.encoding import check as check_encoding
from serve.encoding import encode, requested
from serve.metrics import WorkerMetrics
from serve.options import DEFAULT_PRIOR_BATCH, ServeOptions

log = logging.getLogger("serve.worker")

SETTINGS = ("prior_steps", "decoder_steps", "super_res_steps", "prior_guidance_scale", "decoder_guidance_scale",
            "size")


def load_pipelines(options: ServeOptions) -> dict[str, Any]:
    """The replica's `UnCLIP` per prior kind ("diffusion", and "ar" where the model has one)."""
    from runtime import UnCLIP
    from runtime.__main__ import DTYPES
    from runtime.pipeline import DEFAULT_MODEL, load_folder

    kind, folder = options.model_source
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "random_weights":
        from models.configs import get_config
        from models.unclip import UnCLIPModel

        torch.manual_seed(0)
        with torch.device(device):
            model = UnCLIPModel(get_config(folder))
    elif kind == "karlo":
        from models.configs import KARLO
        from models.convert.karlo import load_karlo

        model = load_karlo(folder, KARLO)
    elif kind == "diffusers":
        from models.convert.diffusers_folder import load_diffusers

        model = load_diffusers(folder)
    else:
        model = load_folder(folder or DEFAULT_MODEL)
    dtype = DTYPES[options.dtype] if options.dtype else (torch.float16 if device.startswith("cuda") else None)
    common = {"device": device, "dtype": dtype, "progress": False, "engine_dir": options.engine_dir,
              "backend": options.backend, "precision": options.precision}
    # the prior's guided loop amplifies rounding, and kernels round differently at each batch size:
    # at one fixed batch a request's embedding does not depend on the requests beside it
    common["prior_batch"] = options.prior_batch or min(DEFAULT_PRIOR_BATCH, options.max_batch)
    if options.prior_dtype:
        common["prior_dtype"] = DTYPES[options.prior_dtype]
    scales = None  # FP8: the model folder's calibrated activation scales, where it has them
    if options.precision == "fp8" and kind == "model":
        from models.fp8.scales import folder_scales

        scales = folder_scales(folder or DEFAULT_MODEL)
    pipes = {"diffusion": UnCLIP(model, prior="diffusion", fp8_scales=scales, **common)}
    try:
        converted = pipes["diffusion"].model  # on the device in its dtype already: shared, not copied
        pipes["ar"] = UnCLIP(converted if converted is not None else model, prior="ar", **common)
    except ValueError:  # the model has no autoregressive prior (Karlo)
        pass
    return pipes


@dataclass
class GenerationJob:
    prompt: str
    n: int
    seed: int
    steps: dict[str, int]
    noise: concurrent.futures.Future | None  # its SamplingNoise from the seed, drawn ahead; None: not yet


@dataclass
class VariationJob:
    image: np.ndarray  # H×W×3 uint8
    n: int
    seed: int
    steps: int | None
    decoder_guidance_scale: float | None


class ImageWorker:
    """The model replica (wrapped by `serve.app` as a Ray Serve deployment)."""

    def __init__(self, options: ServeOptions, cpus: float | None = None) -> None:
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
        self.options = options
        self.pipes = load_pipelines(options)
        self.pipe = self.pipes["diffusion"]
        self.metrics = WorkerMetrics()
        self.batcher = Batcher(self._run, options.max_batch, options.batch_wait_ms / 1000, self._on_batch)
        self._helpers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="unclip-helper")
        self.started = time.time()
        self.served_images = 0  # images returned by this replica
        self.calls = 0  # model calls run
        self.replica = f"pid-{os.getpid()}"
        try:
            from ray import serve

            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Ray Serve (tests): the process id names the replica
            pass
        self.node_id = ""
        try:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray
            pass
        if self.pipe.device.type == "cuda" and options.warmup:
            self._warm_up()
        log.info("replica %s ready: %s on %s, %d torch threads", self.replica, options.model_id, self.pipe.device,
                 torch.get_num_threads())

    def _warm_up(self) -> None:
        """One call per batch size at the model's default settings, so CUDA graphs are captured
        before the first request rather than inside a client's latency."""
        start = time.monotonic()
        for n in range(1, self.options.max_batch + 1):
            self.pipe.generate("warm-up", num_images_per_prompt=n, seed=0, output_type="pil")
        log.info("warmed up batch sizes 1-%d in %.1f s", self.options.max_batch, time.monotonic() - start)

    # --- facts -----------------------------------------------------------------------------
    async def info(self) -> dict:
        """What the ingress checks requests against, and where this replica runs."""
        cfg = self.pipe.cfg
        return {
            "model_id": self.options.model_id, "size": cfg.default_image_size, "sizes": list(cfg.image_sizes),
            "priors": sorted(self.pipes), "defaults": _defaults(cfg), "device": str(self.pipe.device),
            "dtype": str(self.pipe.dtype).removeprefix("torch."),
            "prior_dtype": str(self.pipe.prior_dtype).removeprefix("torch."), "prior_batch": self.pipe.prior_batch,
            "torch_threads": torch.get_num_threads(),
            "precision": self.pipe.precision or "", "backend": self.pipe.backend,
            "stage_backends": {c.stage: c.backend for c in self.pipe.backend_choice},
            "max_batch": self.options.max_batch, "pid": os.getpid(), "node_id": self.node_id, "replica": self.replica,
            "created": int(self.started), "queued_jobs": len(self.batcher.pending),
            "served_images": self.served_images, "calls": self.calls,
        }

    # --- requests --------------------------------------------------------------------------
    async def generate(self, request: dict) -> dict:
        """{prompt, n, seed, prior, settings: {prior_steps, …}, timeout_s} → {images, seed, batch…}
        or {error: {message, param}} for input the runtime refuses."""
        prior = request.get("prior", "diffusion")
        if prior not in self.pipes:
            return _error(f"prior {prior!r} is not available for this model (available: {sorted(self.pipes)})",
                          "prior")
        pipe = self.pipes[prior]
        try:  # the ingress checked the encoding already; a direct caller hears of a bad ask here too
            check_encoding(*requested(request))
            steps, call = self._settings(pipe, prior, request.get("settings", {}))
            n, seed = int(request["n"]), int(request["seed"])
        except (ValueError, TypeError) as exc:
            return _error(str(exc), getattr(exc, "param", None))
        noise = None
        if self.batcher.pending or self.batcher.running:
            # the replica is busy, so this request may share a call: draw its noise now, on a helper
            # thread, while the device runs the call before it (an idle replica's lone request lets
            # generate draw it from the seed, overlapped with the prior)
            noise = self._helpers.submit(pipe.draw_noise, n, steps["prior_steps"], steps["decoder_steps"],
                                         steps["super_res_steps"], torch.Generator().manual_seed(seed))
        key = (prior, tuple(sorted(call.items())))  # requests share a call when these are equal
        job = Job(key, n, GenerationJob(request["prompt"], n, seed, steps, noise), _deadline(request))
        return await self._submit(job, seed, "generation", request)

    async def variations(self, request: dict) -> dict:
        """{image (H×W×3 uint8), n, seed, steps, decoder_guidance_scale, timeout_s} → like `generate`."""
        try:
            check_encoding(*requested(request))
        except ValueError as exc:
            return _error(str(exc), getattr(exc, "param", None))
        n, seed = int(request["n"]), int(request["seed"])
        job = Job(("variations",), n, VariationJob(request["image"], n, seed, request.get("steps"),
                                                   request.get("decoder_guidance_scale")),
                  _deadline(request), batchable=False)
        return await self._submit(job, seed, "variation", request)

    async def _submit(self, job: Job, seed: int, kind: str, request: dict) -> dict:
        """Run the job, then encode its images as the request asks (`output_format`, `output_compression`,
        checked by the caller before the job was made)."""
        fmt, compression = requested(request)
        self.metrics.queue_depth.set(len(self.batcher.pending) + 1)
        try:
            images, batch = await self.batcher.submit(job)
        except DeadlineExceeded as exc:
            return {"error": {"message": str(exc), "type": "timeout", "param": None, "code": "deadline_exceeded"}}
        except (ValueError, TypeError) as exc:
            return _error(str(exc), None)
        start = time.monotonic()
        encoded = await asyncio.get_running_loop().run_in_executor(
            self._helpers, lambda: [encode(im, fmt, compression) for im in images])
        encode_s = time.monotonic() - start
        self.metrics.stage_seconds.observe(batch.queued_s, tags={"stage": "queued"})
        self.metrics.stage_seconds.observe(batch.run_s, tags={"stage": "generate"})
        self.metrics.stage_seconds.observe(encode_s, tags={"stage": "encode"})
        self.metrics.images.inc(len(encoded), tags={"kind": kind})
        self.served_images += len(encoded)
        return {"images": encoded, "output_format": fmt, "seed": seed, "batch_images": batch.images,
                "batch_requests": batch.jobs, "queued_s": batch.queued_s, "run_s": batch.run_s, "encode_s": encode_s,
                "replica": self.replica, "node_id": self.node_id}

    def _settings(self, pipe, prior: str, given: dict) -> tuple[dict, dict]:
        """The request's steps resolved against the model's defaults (all three, for drawing its
        noise), and the settings its `generate` call takes (the prior's only with `prior="diffusion"`)."""
        from runtime.validate import check_chain, check_int, check_scale

        unknown = sorted(set(given) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        cfg = pipe.cfg
        resolved = cfg.sampling.with_overrides(**{k: given.get(k) for k in SETTINGS if k not in ("super_res_steps",
                                                                                                 "size")})
        steps = {k: check_int(k, getattr(resolved, k), 1, 1000) for k in ("prior_steps", "decoder_steps")}
        steps["super_res_steps"] = check_chain(given.get("size"), given.get("super_res_steps"), cfg)
        scales = {k: check_scale(k, getattr(resolved, k)) for k in ("prior_guidance_scale", "decoder_guidance_scale")}
        if prior == "ar":
            given_prior = [k for k in ("prior_steps", "prior_guidance_scale") if given.get(k) is not None]
            if given_prior:
                raise ValueError(f"{', '.join(given_prior)} apply to the diffusion prior, not prior='ar'")
        call = {**steps, **scales, "size": cfg.image_sizes[len(steps["super_res_steps"])]}
        if prior == "ar":
            del call["prior_steps"], call["prior_guidance_scale"]
        return steps, call

    # --- the runner thread ---------------------------------------------------------------------
    def _run(self, key: tuple, payloads: list) -> list[list[Image.Image]]:
        if key[0] == "variations":
            (job,) = payloads
            out = self.pipe.variations(job.image, job.n, seed=job.seed, steps=job.steps,
                                       decoder_guidance_scale=job.decoder_guidance_scale, output_type="pil")
            return [out.images]
        from runtime.sampling.inputs import SamplingNoise

        prior, call = key[0], dict(key[1])
        pipe = self.pipes[prior]
        if len(payloads) == 1:  # alone: exactly the lone call
            (job,) = payloads
            return [pipe.generate(job.prompt, num_images_per_prompt=job.n, seed=job.seed, output_type="pil",
                                  **call).images]
        prompts = [job.prompt for job in payloads for _ in range(job.n)]
        noise = SamplingNoise.cat([self._noise(pipe, job) for job in payloads])
        images = pipe.generate(prompts, noise=noise, output_type="pil", **call).images
        out, start = [], 0
        for job in payloads:
            out.append(images[start : start + job.n])
            start += job.n
        return out

    @staticmethod
    def _noise(pipe, job: GenerationJob):
        """The job's noise: drawn ahead on a helper thread, or now, from its seed as generate would."""
        if job.noise is not None:
            return job.noise.result()
        s = job.steps
        return pipe.draw_noise(job.n, s["prior_steps"], s["decoder_steps"], s["super_res_steps"],
                               torch.Generator().manual_seed(job.seed))

    def _on_batch(self, batch: BatchInfo, waiting: int) -> None:
        self.calls += 1
        self.metrics.batch_images.observe(batch.images)
        self.metrics.queue_depth.set(waiting)


def _defaults(cfg) -> dict:
    """The sampling settings a request without them gets."""
    from runtime.validate import check_chain

    s = cfg.sampling
    return {"prior_steps": s.prior_steps, "decoder_steps": s.decoder_steps,
            "super_res_steps": list(check_chain(None, None, cfg)),
            "prior_guidance_scale": s.prior_guidance_scale, "decoder_guidance_scale": s.decoder_guidance_scale,
            "size": cfg.default_image_size}


def _deadline(request: dict) -> float:
    return time.monotonic() + float(request.get("timeout_s", 120.0))


def _error(message: str, param: str | None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
