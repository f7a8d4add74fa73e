"""unclip-rt: fast unCLIP (DALL-E 2 / Karlo) inference on NVIDIA GPUs.

Extras: `[onnx]` ONNX export + ONNX Runtime (CPU), `[onnx-gpu]` ONNX Runtime CUDA provider,
`[tensorrt]` TensorRT engines, `[serve]` the images service (Ray Serve), `[test]` the test suite
(diffusers is the reference there), `[bench]` the peer pipelines used by `benchmarks/latency.py`.
"""

import glob
import os
import sys

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
    if os.environ.get("UNCLIP_RT_CUTLASS") == "only":  # the CUTLASS convolution alone, the kernels untouched
        return cutlass_extensions(CUDAExtension), {"build_ext": BuildExtension}
    sources = ["bindings.cpp", "guided_update.cu", "group_norm.cu", "group_norm_stats.cu", "group_norm_normalize.cu",
               "group_norm_one_pass.cu", "residual.cu", "prior_step.cu", "attention_kv.cu", "layer_norm.cu",
               "skinny_linear.cu", "skinny_staged.cu"]
    ext = CUDAExtension("cpp_ext._C", [f"cpp_ext/{name}" for name in sources],
                        depends=["cpp_ext/elementwise.cuh", "cpp_ext/half_tensors.h", "cpp_ext/pdl.cuh",
                                 "cpp_ext/wide_stats.cuh", "cpp_ext/tensor_core.cuh",
                                 "cpp_ext/group_norm_parts.cuh"],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]})
    return [ext, *cutlass_extensions(CUDAExtension)], {"build_ext": BuildExtension}


def cutlass_include() -> list[str] | None:
    """CUTLASS's C++ header folders (include/ and tools/util/include/, which its conv collectives
    also need): under UNCLIP_RT_CUTLASS_ROOT (a CUTLASS checkout), else as the `nvidia-cutlass`
    wheel ships them; None when they are not there."""
    import importlib.util

    root = os.environ.get("UNCLIP_RT_CUTLASS_ROOT")
    if not root:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    found = os.path.isfile(os.path.join(dirs[0], "cutlass", "cutlass.h")) and os.path.isfile(
        os.path.join(dirs[1], "cutlass", "util", "packed_stride.hpp"))
    return dirs if found else None


def cutlass_extensions(CUDAExtension) -> list:
    """The CUTLASS Hopper convolution (cpp_ext/cutlass/), opt-in with UNCLIP_RT_CUTLASS=1 (=only: it alone) and
    CUTLASS's headers at hand (`cutlass_include`): sm_90a only (wgmma and TMA), a minute or two of nvcc per file."""
    if not os.environ.get("UNCLIP_RT_CUTLASS"):
        return []
    include = cutlass_include()
    if include is None:  # asked for and not buildable: say so rather than build without it unnoticed
        print("UNCLIP_RT_CUTLASS is set but CUTLASS's headers were not found (pip install nvidia-cutlass, or point "
              "UNCLIP_RT_CUTLASS_ROOT at a CUTLASS checkout): building without the CUTLASS convolutions",
              file=sys.stderr)
        return []
    configs = sorted(glob.glob("config_*.cu", root_dir="cpp_ext/cutlass"), key=lambda n: int(n[7:-3]))
    sources = ["bindings.cpp", *configs]  # config_N.cu, one per entry of conv_shape.h's kConfigs
    # CUTLASS's half types need the CUDA half conversions that torch's extension flags switch off;
    # CuTe's extended wgmma shapes give tiles whose width is no power of two (160) one instruction
    # of that width instead of five narrow ones
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a",
            "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return [CUDAExtension("cpp_ext._cutlass_conv", [f"cpp_ext/cutlass/{name}" for name in sources],
                          include_dirs=[*include, os.path.abspath("cpp_ext/cutlass")],
                          depends=[f"cpp_ext/cutlass/{name}" for name in (
                              "conv_fprop.cuh", "conv_fprop_persistent.cuh", "conv_common.cuh", "conv_shape.h")],
                          extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc})]


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
