"""The runtime on the GPU: CUDA-graph replay gives the eager images; fp16 against fp32 on the
trained default model (PSNR) and per stage at Karlo size. Skipped without a CUDA GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from runtime import UnCLIP
from tests.gpu.common import rel
from tests.metrics import psnr

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_gives_the_eager_images(ours, dtype):
    steps = {"prior_steps": 10, "decoder_steps": 4, "super_res_steps": 3}
    eager = UnCLIP(copy.deepcopy(ours), device="cuda", dtype=dtype, progress=False, cuda_graphs=False)
    graphed = UnCLIP(copy.deepcopy(ours), device="cuda", dtype=dtype, progress=False)
    assert eager.graphs is None and graphed.graphs is not None
    calls = (("a red circle", 1, 0), ("a green square", 1, 1), (["a", "b"], 2, 2), ("a red circle", 1, 0))
    for prompt, n, seed in calls:
        kw = {"num_images_per_prompt": n, "seed": seed, "output_type": "pt", "return_image_embeds": True, **steps}
        want, got = eager.generate(prompt, **kw), graphed.generate(prompt, **kw)
        assert torch.allclose(got.images, want.images, atol=1e-6), prompt
        assert torch.allclose(got.image_embeds, want.image_embeds, atol=1e-6)
    # the prior (10 steps: graphs of steps [0, 3) with the context, [3, 8) and [8, 10)), decoder
    # and super-res at batch 1 and at batch 4, and the text encoder at 1 and 2 prompts
    assert len(graphed.graphs) == 12


def test_fp16_default_model_matches_fp32_on_the_same_noise():
    prompts = ["a red circle on a blue background", "a yellow triangle on a white background",
               "a green square on a black background", "a blue star on a red background"]
    fp32 = UnCLIP(device="cuda", progress=False).generate(prompts, seed=3, output_type="pt").images
    fp16 = UnCLIP(device="cuda", dtype=torch.float16, progress=False).generate(prompts, seed=3, output_type="pt").images
    values = [psnr(a, b) for a, b in zip(fp16, fp32, strict=True)]
    print("fp16 vs fp32 PSNR per image (dB):", [round(v, 1) for v in values])
    assert min(values) >= 35.0


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.usefixtures("large_gpu_memory")
def test_karlo_size_stages_in_fp16_stay_within_1e2_of_fp32():
    from export.build_engines import random_model
    from runtime.backends.engines import TorchEngine
    from runtime.backends.signatures import signatures

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model = random_model("karlo", device="cuda")
        half = copy.deepcopy(model).half()
        sigs = signatures(model.cfg)
        errors = {}
        for name in ("clip_text", "prior_context", "prior_step", "decoder_context", "decoder_step", "super_res_first",
                     "super_res_last"):
            inputs = sigs[name].sample_inputs(2, device="cuda", generator=torch.Generator().manual_seed(0))
            ref = TorchEngine(model, name)(*inputs.values())
            got = TorchEngine(half, name)(*inputs.values())
            errors[name] = max(rel(g.float(), r) for g, r in zip(got, ref, strict=True) if r.is_floating_point())
        print("Karlo-size fp16 vs fp32 max relative error per stage:", {k: f"{v:.1e}" for k, v in errors.items()})
        assert all(e <= 1e-2 for e in errors.values()), errors
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
