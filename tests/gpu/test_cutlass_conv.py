"""The CUTLASS Hopper convolution (`cpp_ext._cutlass_conv`, `models.fused.implicit_conv`) against
cuDNN's on the UNets' shapes: every tile configuration, with and without bias, and a CUDA-graph
replay equal to the eager call. Skipped where it was not built (UNCLIP_RT_CUTLASS=1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cpp_ext
from tests.gpu.common import rel

pytestmark = pytest.mark.gpu
if cpp_ext.cutlass_conv is None:
    pytest.skip("cpp_ext._cutlass_conv not built (UNCLIP_RT_CUTLASS=1 python setup.py build_ext --inplace)",
                allow_module_level=True)


@pytest.mark.parametrize(("batch", "cin", "cout", "size", "kernel"),
                         [(1, 320, 320, 64, 3), (2, 640, 320, 32, 3), (1, 192, 384, 16, 1), (4, 64, 128, 24, 3)])
def test_every_configuration_gives_cudnns_convolution(batch, cin, cout, size, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    want = conv(x)
    for config, name in enumerate(cpp_ext.cutlass_conv.configs()):
        got = cpp_ext.cutlass_conv.conv2d(x, conv.weight.detach(), conv.bias.detach(), kernel // 2, kernel // 2,
                                          config)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert rel(got, want) <= 2e-3, name
        plain = cpp_ext.cutlass_conv.conv2d(x, conv.weight.detach(), None, kernel // 2, kernel // 2, config)
        assert rel(plain, conv._conv_forward(x, conv.weight, None)) <= 2e-3, name


def test_the_wrapper_picks_a_configuration_and_replays_from_a_cuda_graph():
    from models.fused import implicit_conv

    conv = nn.Conv2d(320, 320, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(1, 320, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w, b = conv.weight.detach(), conv.bias.detach()
    eager = implicit_conv.conv2d(x, w, b, 1)
    assert implicit_conv.serves(x, w) and rel(eager, conv(x)) <= 2e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = implicit_conv.conv2d(x, w, b, 1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    with pytest.raises(RuntimeError, match="channel counts must be multiples of 8"):
        cpp_ext.cutlass_conv.conv2d(x[:, :12].contiguous(memory_format=torch.channels_last), w[:, :12].contiguous(
            memory_format=torch.channels_last), b, 1, 1, 0)


@pytest.mark.skipif(cpp_ext.kernels is None, reason="cpp_ext not built")
def test_the_fused_unet_with_cutlass_convolutions_gives_the_cudnn_forward(monkeypatch):
    """The default model's super-res UNet, fp16 channels-last, on the fused path with its residual
    blocks' 3×3 convolutions on CUTLASS (`FusedOptions(cutlass_convs=True)`) against the same
    path on cuDNN; the CUTLASS kernel must have run."""
    from models import fused
    from models.fused import FusedOptions
    from runtime.pipeline import DEFAULT_MODEL, load_folder

    model = load_folder(DEFAULT_MODEL).cuda().half().to(memory_format=torch.channels_last)
    unet = model.super_res[0].first_steps
    x = torch.randn(2, 6, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    t = torch.tensor([900, 10], device="cuda")
    calls = []
    kernel = cpp_ext.cutlass_conv.conv2d
    monkeypatch.setattr(cpp_ext.cutlass_conv, "conv2d", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with torch.no_grad():
        want = fused.unet_forward(unet, x, t)
        assert not calls
        got = fused.unet_forward(unet, x, t, options=FusedOptions(cutlass_convs=True))
    assert calls  # the residual blocks' convolutions ran on CUTLASS
    assert rel(got, want) <= 5e-3
