"""`UnCLIP(model, …)` never changes the caller's model: a second `UnCLIP` in another dtype leaves
the first one's images and the model's tensors as they were, and a model already in the wanted
dtype and device is used as it is (no copy)."""

from __future__ import annotations

import torch

from runtime import UnCLIP

FAST = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2, "output_type": "pt"}


def test_a_second_unclip_in_another_dtype_leaves_the_first_and_the_model_intact(ours):
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    first = UnCLIP(ours, device="cpu", progress=False)
    assert first.model is ours  # already float32 on the CPU: used as it is
    images = first.generate("a red circle", seed=3, **FAST).images
    second = UnCLIP(ours, device="cpu", dtype=torch.bfloat16, progress=False)
    assert second.model is not ours and next(second.model.parameters()).dtype == torch.bfloat16
    second.generate("a red circle", seed=3, **FAST)
    after = ours.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(first.generate("a red circle", seed=3, **FAST).images, images)


def test_a_model_in_training_mode_is_not_switched_for_the_caller(ours):
    ours.train()
    try:
        pipe = UnCLIP(ours, device="cpu", progress=False)
        assert ours.training and not pipe.model.training
    finally:
        ours.eval()
