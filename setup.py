"""unclip-rt: fast unCLIP (DALL-E 2 / Karlo) inference on NVIDIA GPUs.

Extras: `[onnx]` ONNX export + ONNX Runtime (CPU), `[onnx-gpu]` ONNX Runtime CUDA provider,
`[tensorrt]` TensorRT engines, `[serve]` the images service (Ray Serve), `[test]` the test suite
(diffusers is the reference there), `[bench]` the peer pipelines used by `benchmarks/latency.py`.
"""

import os

from setuptools import find_packages, setup


def cuda_extensions() -> tuple[list, dict]:
    """The fused CUDA kernels (cpp_ext/), when torch with CUDA and nvcc are importable/present at build
    time: `pip install --no-build-isolation .` or `python setup.py build_ext --inplace`. Under pip's
    default build isolation torch is absent, so a plain install stays pure Python and the runtime
    uses its torch reference (runtime.sampling.update says which runs). UNCLIP_RT_NO_CUDA_EXT=1 skips it."""
    if os.environ.get("UNCLIP_RT_NO_CUDA_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    sources = ["bindings.cpp", "guided_update.cu", "group_norm.cu", "group_norm_stats.cu", "group_norm_normalize.cu",
               "group_norm_one_pass.cu", "residual.cu", "prior_step.cu", "attention_kv.cu", "layer_norm.cu",
               "skinny_linear.cu", "skinny_staged.cu"]
    ext = CUDAExtension("cpp_ext._C", [f"cpp_ext/{name}" for name in sources],
                        depends=["cpp_ext/elementwise.cuh", "cpp_ext/half_tensors.h", "cpp_ext/pdl.cuh",
                                 "cpp_ext/wide_stats.cuh", "cpp_ext/tensor_core.cuh",
                                 "cpp_ext/group_norm_parts.cuh"],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension}


EXTENSIONS, COMMANDS = cuda_extensions()
SERVE = ["ray[serve]>=2.40", "fastapi", "python-multipart", "pyyaml"]

setup(
    name="unclip-rt",
    version="0.1.0",
    description="Fast unCLIP (DALL-E 2 architecture, Karlo-compatible) inference runtime",
    python_requires=">=3.10",
    packages=find_packages(include=["models", "models.*", "runtime", "runtime.*", "export", "export.*", "train",
                                    "train.*", "cpp_ext", "serve", "serve.*"]),
    package_data={"serve": ["static/*.html", "*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "open_clip_torch>=2.24",
        "numpy",
        "safetensors",
        "tqdm",
        "Pillow",
    ],
    extras_require={
        "onnx": ["onnx", "onnxruntime"],
        "onnx-gpu": ["onnx", "onnxruntime-gpu"],
        "tensorrt": ["tensorrt", "polygraphy", "cuda-python"],
        "serve": SERVE,
        "test": ["pytest", "hypothesis", "ruff", "diffusers==0.42.1", "transformers>=4.40", "onnx", "onnxruntime",
                 *SERVE, "openai", "selenium"],
        "bench": ["diffusers==0.42.1", "transformers>=4.40"],
    },
    ext_modules=EXTENSIONS,
    cmdclass=COMMANDS,
    entry_points={"console_scripts": ["unclip-rt=serve.cli:main"]},
)
