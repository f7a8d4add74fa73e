"""The fused per-step update kernel (`cpp_ext/guided_update.cu`) against its torch reference
(`runtime.sampling.update`): every stage's update, guided or not, in each output dtype, repeatable to the
bit; the first non-finite step recorded. Skipped without a CUDA GPU and a built `cpp_ext`."""

from __future__ import annotations

import pytest
import torch

import cpp_ext
from models.configs import DiffusionConfig
from runtime.sampling.schedules import make_step_table
from runtime.sampling.update import UpdateSpec, guided_update, implementation, packed_coefficients
from tests.gpu.common import needs_kernel, rel

pytestmark = pytest.mark.gpu


CASES = {
    "prior": (DiffusionConfig("sample", "fixed_small_log", 5.0), (2, 768), 768),
    "decoder": (DiffusionConfig("epsilon", "learned_range", 1.0), (2, 3, 64, 64), 6),
    "super_res": (DiffusionConfig("epsilon", "fixed_small_log", 1.0), (1, 3, 256, 256), 3),
    "unaligned": (DiffusionConfig("epsilon", "learned_range", 1.0), (3, 3, 5, 5), 6),  # the scalar path
}


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("guided", [False, True])
def test_fused_kernel_matches_the_reference_and_repeats_exactly(case, out_dtype, guided):
    config, shape, out_channels = CASES[case]
    learned = config.variance == "learned_range"
    spec = UpdateSpec(config.prediction, config.clip_range, learned, guided)
    coefs = packed_coefficients(make_step_table(config, 25), torch.float32, "cuda")
    g = torch.Generator(device="cuda").manual_seed(hash((case, guided)) % 2**31)
    b = shape[0]
    for i in (0, 12, 24):
        x = torch.randn(shape, generator=g, device="cuda")
        noise = torch.randn(shape, generator=g, device="cuda")
        out = torch.randn((spec.copies * b, out_channels, *shape[2:]), generator=g, device="cuda")
        if learned:
            out[:, shape[1]:] = out[:, shape[1]:].tanh()
        out = out.to(out_dtype)
        scale = torch.full((1,), 4.0, device="cuda")
        results = []
        for use_kernel in (False, True, True):
            first_bad = torch.full((1,), -1, dtype=torch.int32, device="cuda")
            x_new, x_in = guided_update(out, x, noise, coefs[i], scale, first_bad, i, spec, torch.float16,
                                        use_kernel=use_kernel)
            results.append((x_new, x_in, int(first_bad)))
        (ref, ref_in, _), (got, got_in, bad), (again, again_in, _) = results
        assert rel(got, ref) <= 1e-3 and rel(got_in, ref_in) <= 1e-3, (case, i)
        assert torch.equal(got, again) and torch.equal(got_in, again_in)  # deterministic
        assert bad == -1 and got_in.shape == (spec.copies * b, *shape[1:])


@needs_kernel
def test_fused_kernel_records_the_first_non_finite_step():
    config, shape, _ = CASES["decoder"]
    spec = UpdateSpec("epsilon", 1.0, True, True)
    coefs = packed_coefficients(make_step_table(config, 25), torch.float32, "cuda")
    x, noise = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
    out = torch.zeros((4, 6, 64, 64), device="cuda", dtype=torch.float16)
    first_bad = torch.full((1,), -1, dtype=torch.int32, device="cuda")
    scale = torch.ones(1, device="cuda")
    guided_update(out, x, noise, coefs[3], scale, first_bad, 3, spec, torch.float16, use_kernel=True)
    assert int(first_bad) == -1
    out[1, 0, 5, 5] = float("nan")
    guided_update(out, x, noise, coefs[4], scale, first_bad, 4, spec, torch.float16, use_kernel=True)
    out[0, 0, 0, 0] = float("inf")
    guided_update(out, x, noise, coefs[9], scale, first_bad, 9, spec, torch.float16, use_kernel=True)
    assert int(first_bad) == 4


def test_the_runtime_says_which_update_runs():
    assert implementation("cuda") == ("cpp_ext" if cpp_ext.kernels is not None else "torch")
