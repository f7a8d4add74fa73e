"""A chain of two super-res stages on the GPU: the same images as on the CPU (fp32, TF32 off), whole
and tile-wise; CUDA-graph replay gives the eager images in fp32 and fp16; the paper's 256 → 1024
stage in fp16 within 1e-2 of fp32. Skipped without a CUDA GPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from export.build_engines import random_model
from runtime import UnCLIP
from tests.gpu.common import rel
from tests.test_super_res_chain import FAST, chain, tiled

pytestmark = pytest.mark.gpu
CHAINS = {"two stages": chain(2), "second stage tiled": tiled(64, 16)}


@pytest.mark.parametrize("name", CHAINS)
def test_a_two_stage_chain_on_cuda_gives_the_cpu_images(name, no_tf32):
    model = random_model(CHAINS[name])
    kw = {**FAST, "num_images_per_prompt": 2, "seed": 5, "output_type": "np"}
    cpu = UnCLIP(copy.deepcopy(model), device="cpu", progress=False).generate(["a red circle", "a cat"], **kw).images
    gpu = UnCLIP(copy.deepcopy(model), device="cuda", progress=False).generate(["a red circle", "a cat"], **kw).images
    assert cpu.shape == gpu.shape == (4, 128, 128, 3)
    err = np.abs(cpu - gpu)
    print(f"{name}: CPU vs CUDA fp32 max {err.max():.1e}, median {np.median(err):.1e}")
    assert (err <= 1e-3).mean() >= 0.999 and float(np.median(err)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", CHAINS)
def test_cuda_graph_replay_of_a_two_stage_chain_gives_the_eager_images(name, dtype):
    model = random_model(CHAINS[name])
    eager = UnCLIP(copy.deepcopy(model), device="cuda", dtype=dtype, progress=False, cuda_graphs=False)
    graphed = UnCLIP(copy.deepcopy(model), device="cuda", dtype=dtype, progress=False)
    for prompt, n, seed in (("a red circle", 1, 0), (["a", "b"], 2, 1), ("a red circle", 1, 0)):
        kw = {**FAST, "num_images_per_prompt": n, "seed": seed, "super_res_steps": [2, 3]}
        want, got = eager.generate(prompt, **kw).images, graphed.generate(prompt, **kw).images
        assert got.shape[-1] == 128 and torch.allclose(got, want, atol=1e-6), (prompt, (got - want).abs().max())
    # and stopping after the first stage replays that stage's graphs alone
    kw = {**FAST, "seed": 2, "size": 64}
    assert torch.allclose(graphed.generate("a", **kw).images, eager.generate("a", **kw).images, atol=1e-6)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.usefixtures("large_gpu_memory")
def test_the_papers_1024_stage_in_fp16_stays_within_1e2_of_fp32(no_tf32):
    from runtime.backends.engines import TorchEngine
    from runtime.backends.signatures import signatures

    model = random_model("paper", device="cuda")
    stage = "super_res_2_first"
    inputs = signatures(model.cfg)[stage].sample_inputs(1, device="cuda", generator=torch.Generator().manual_seed(0))
    ref = TorchEngine(model, stage)(*inputs.values())
    del model.prior, model.decoder
    half = copy.deepcopy(model).half()
    got = TorchEngine(half, stage)(*inputs.values())
    errors = [rel(g.float(), r) for g, r in zip(got, ref, strict=True) if r.is_floating_point()]
    print(f"paper 256 -> 1024 stage, fp16 vs fp32 max relative error: {max(errors):.1e}")
    assert max(errors) <= 1e-2
