"""The fused UNet's block protocol pieces that need no kernels: the skip concatenation with the
biases left to it by the block before, and the weights' derived copies; the reference forward."""

from __future__ import annotations

import torch

from models.configs import UNetConfig
from models.fused.derived import DerivedTensors
from models.fused.unet_blocks import DeferredBias, SkipConcat
from models.unet import UNet


def test_skip_concat_adds_deferred_biases_to_the_first_part_rounded_once():
    g = torch.Generator().manual_seed(0)
    h, skip = torch.randn(2, 8, 4, 4, generator=g).half(), torch.randn(2, 16, 4, 4, generator=g).half()
    b1, b2 = torch.randn(8, generator=g).half(), torch.randn(8, generator=g).half()
    cat = DeferredBias(h, b1, b2).concat(skip).tensor()
    want = (h.float() + (b1.float() + b2.float()).view(1, -1, 1, 1)).half()
    assert torch.equal(cat[:, :8], want) and torch.equal(cat[:, 8:], skip)
    assert torch.equal(SkipConcat(h, skip).tensor(), torch.cat([h, skip], dim=1))
    assert torch.equal(SkipConcat(h, skip, b1).tensor()[:, :8], (h.float() + b1.float().view(1, -1, 1, 1)).half())


def test_the_reference_unet_forward_runs_on_cpu():
    cfg = UNetConfig(image_size=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                     num_res_blocks=1)
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        out = net(x, t)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_derived_tensors_are_kept_until_their_sources_change():
    """`DerivedTensors` builds once, keeps the value while its tensors keep their storage, version
    and extra key, builds again after an in-place write, a new storage or another extra key, and
    keeps nothing for inference tensors (no version counter)."""
    weight = torch.randn(4, 3)
    builds = []

    def build():
        builds.append(1)
        return weight.sum() * 2

    cache = DerivedTensors()
    first = cache.get([weight], (torch.float32,), build)
    assert torch.equal(first, weight.sum() * 2) and cache.get([weight], (torch.float32,), build) is first
    assert len(builds) == 1
    weight.add_(1.0)  # in place: version changes
    assert torch.equal(cache.get([weight], (torch.float32,), build), weight.sum() * 2) and len(builds) == 2
    cache.get([weight], (torch.float16,), build)  # another extra key
    assert len(builds) == 3
    weight = weight.clone()  # new storage
    cache.get([weight], (torch.float16,), build)
    assert len(builds) == 4
    with torch.inference_mode():
        frozen = torch.randn(2)
    assert cache.get([frozen], (), build) is None and len(builds) == 4
