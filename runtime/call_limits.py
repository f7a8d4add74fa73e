"""Checks of a `generate` call's size and pre-drawn noise, made before any network runs.

A call's host memory grows with its images: each image's noise for every step of every stage is
drawn up front (so a seed gives the same images however the call is chunked), and its output is
kept until the call returns. `check_host_memory` refuses a call whose estimate exceeds half of the
memory the machine has available, naming the figures, rather than letting it reach the allocator
mid-run; device memory is bounded by running images in chunks (`UnCLIP.max_batch`, or
`default_chunk`). `check_noise` verifies the type and shape of every part of a caller's `noise=`.
"""

from __future__ import annotations

import torch

from models.configs import UnCLIPConfig
from runtime.sampling.inputs import StageNoise

MAX_GUIDANCE = 1000.0  # beyond this the guided difference overflows in fp16 and fp32 sampling math
CPU_CHUNK, CUDA_CHUNK = 16, 64  # images per network call when the caller set no max_batch


def default_chunk(device: torch.device) -> int:
    return CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_bytes_per_image(cfg: UnCLIPConfig, steps: dict, ar_prior: bool) -> int:
    """Float32 bytes one image holds on the host through a call: its noise and its output.
    `steps["super_res_steps"]`: the steps of each super-res stage that runs."""
    sizes = cfg.image_sizes
    prior = (cfg.ar_prior.components + 1) if ar_prior else (steps["prior_steps"] + 1) * cfg.prior.clip_dim
    decoder = (steps["decoder_steps"] + 1) * 3 * sizes[0] ** 2
    super_res = sum((n + 1) * 3 * size**2 for n, size in zip(steps["super_res_steps"], sizes[1:], strict=False))
    out = 3 * sizes[len(steps["super_res_steps"])] ** 2
    return 4 * (prior + decoder + super_res + out)


def check_host_memory(images: int, per_image: int, available: int | None = None) -> None:
    available = available_host_bytes() if available is None else available
    need = images * per_image
    if available is not None and need > available // 2:
        raise ValueError(
            f"this call would hold {need / 2**30:.1f} GiB of noise and images on the host ({images} images × "
            f"{per_image / 2**20:.1f} MiB), over half of the {available / 2**30:.1f} GiB available: ask for fewer "
            "images per call (fewer prompts or a smaller num_images_per_prompt) and call again")


def check_noise(noise, images: int, steps: dict, cfg: UnCLIPConfig, ar_prior: bool) -> None:
    """Every part of a caller's `SamplingNoise`: its type, dtype and shape for this call."""
    sizes, chain = cfg.image_sizes, steps["super_res_steps"]
    stages = [("decoder", noise.decoder, (3, sizes[0], sizes[0]), steps["decoder_steps"])]
    super_res = noise.super_res
    if not isinstance(super_res, tuple) or len(super_res) != len(chain):
        got = f"{len(super_res)} stages" if isinstance(super_res, tuple) else type(super_res).__name__
        raise ValueError(f"noise.super_res must hold one StageNoise per super-res stage that runs ({len(chain)}), "
                         f"got {got}")
    stages += [(f"super_res[{i}]", part, (3, size, size), count)
               for i, (part, size, count) in enumerate(zip(super_res, sizes[1:], chain, strict=False))]
    if ar_prior:
        prior = noise.prior
        want = {"similarity": (images,), "codes": (images, cfg.ar_prior.components)}
        for name, shape in want.items():
            t = getattr(prior, name, None)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"noise.prior.{name} must be a tensor of shape {shape}, got {got}")
    else:
        stages.insert(0, ("prior", noise.prior, (cfg.prior.clip_dim,), steps["prior_steps"]))
    for name, part, shape, count in stages:
        if not isinstance(part, StageNoise):
            raise TypeError(f"noise.{name} must be a StageNoise (see UnCLIP.draw_noise), got {type(part).__name__}")
        for field, want in (("init", (images, *shape)), ("steps", (count, images, *shape))):
            t = getattr(part, field)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"noise.{name}.{field} must be a floating-point tensor, got {type(t).__name__}")
            if tuple(t.shape) != want:
                raise ValueError(f"noise.{name}.{field} must have shape {want} for {images} images and {count} steps, "
                                 f"got {tuple(t.shape)}")
