"""ONNX graph → TensorRT plan, through polygraphy's builder API (kept thin on purpose).

One optimisation profile per stage over the dynamic batch axis, 1 … max (the max doubled for the
stages that run conditional and unconditional rows together), fp16 when asked, and a timing cache
shared by every build in the engine folder so rebuilds skip tactic timing.

TensorRT's builder cannot be installed on the machines this project is developed on (PyPI's
`tensorrt-cu13-libs` downloads from NVIDIA's index): this module is written against the documented
polygraphy/TensorRT API and has not been run here; `available()` is False there and the build
command says so.
"""

from __future__ import annotations

from pathlib import Path

from runtime.backends.signatures import StageSignature


def available() -> bool:
    """True when TensorRT's builder and polygraphy import."""
    try:
        import polygraphy.backend.trt  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def versions() -> dict[str, str]:
    import tensorrt

    return {"tensorrt": tensorrt.__version__}


def build_plan(
    onnx_path: Path, sig: StageSignature, plan_path: Path, max_images: int, fp16: bool, timing_cache: Path
) -> None:
    """Build and save `plan_path` (written to a temporary name, then renamed)."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    top = sig.max_batch(max_images)
    opt = sig.max_batch(1)
    profile = Profile()
    for spec in sig.inputs:
        profile.add(spec.name, min=spec.concrete(1), opt=spec.concrete(opt), max=spec.concrete(top))
    config = CreateConfig(fp16=fp16, profiles=[profile], load_timing_cache=str(timing_cache))
    engine = engine_from_network(network_from_onnx_path(str(onnx_path)), config=config,
                                 save_timing_cache=str(timing_cache))
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    save_engine(engine, path=str(tmp))
    tmp.replace(plan_path)


def compute_capability() -> str | None:
    """"major.minor" of GPU 0, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"
