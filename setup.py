"""unclip-rt: fast unCLIP (DALL-E 2 / Karlo) inference on NVIDIA GPUs.

Extras: `[onnx]` ONNX export + ONNX Runtime (CPU), `[onnx-gpu]` ONNX Runtime CUDA provider,
`[tensorrt]` TensorRT engines, `[test]` the test suite (diffusers is the reference there),
`[bench]` the peer pipelines used by `benchmarks/latency.py`.
"""

from setuptools import find_packages, setup

setup(
    name="unclip-rt",
    version="0.1.0",
    description="Fast unCLIP (DALL-E 2 architecture, Karlo-compatible) inference runtime",
    python_requires=">=3.10",
    packages=find_packages(include=["models", "models.*", "runtime", "runtime.*", "export", "export.*", "train",
                                    "train.*"]),
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
        "test": ["pytest", "hypothesis", "ruff", "diffusers==0.42.1", "transformers>=4.40", "onnx", "onnxruntime"],
        "bench": ["diffusers==0.42.1", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["unclip-rt=runtime.__main__:main"]},
)
