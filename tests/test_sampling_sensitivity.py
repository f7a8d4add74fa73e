"""`benchmarks/sampling_sensitivity.py`'s perturbed engines: no error changes nothing, an error in
one stage's network moves the images, and the engine's other attributes pass through."""

from __future__ import annotations

import torch

from benchmarks.sampling_sensitivity import Perturbed
from runtime import UnCLIP

FAST = {"prior_steps": 3, "decoder_steps": 3, "super_res_steps": 2, "seed": 0, "output_type": "pt"}


def test_a_perturbed_stage_moves_the_images_and_no_perturbation_does_not():
    want = UnCLIP(device="cpu", progress=False).generate("a red circle", **FAST).images
    for eps, same in ((0.0, True), (1e-2, False)):
        pipe = UnCLIP(device="cpu", progress=False)
        engine = pipe.engines["prior_step"]
        pipe.engines["prior_step"] = Perturbed(engine, eps, torch.Generator().manual_seed(0))
        assert pipe.engines["prior_step"].float_dtype == engine.float_dtype
        got = pipe.generate("a red circle", **FAST).images
        assert torch.equal(got, want) == same
