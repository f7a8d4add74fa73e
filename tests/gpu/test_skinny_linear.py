"""The prior step's few-row linear kernels (`cpp_ext/skinny_linear.cu`, `skinny_staged.cu`)
against float64: every activation, accumulation, block width and warp count, the staged form on
Hopper, replays from CUDA graphs, and the arguments they refuse. Skipped without a CUDA GPU and
a built `cpp_ext`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cpp_ext
from tests.gpu.common import needs_hopper, needs_kernel, rel

pytestmark = pytest.mark.gpu


SKINNY_SHAPES = [(1, 32, 16), (6, 2048, 6144), (6, 8192, 2048), (24, 2048, 8192), (40, 768, 2048), (64, 96, 48),
                 (6, 256, 16384), (3, 2080, 4128)]


def _skinny_inputs(rows: int, width: int, features: int, dtype: torch.dtype, seed: int,
                   device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """x [rows, width], weight [features, width] (scaled by width^-1/2), bias [features] and an
    output to accumulate into [rows, features], drawn in that order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    weight = torch.randn(features, width, generator=g) / width**0.5
    bias = torch.randn(features, generator=g)
    out = torch.randn(rows, features, generator=g)
    return tuple(t.to(dtype).to(device) for t in (x, weight, bias, out))


@needs_kernel
@pytest.mark.parametrize("rows,width,features", SKINNY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("accumulate", [False, True])
def test_skinny_linear_matches_float64(rows, width, features, dtype, activation, accumulate):
    """act(x·Wᵀ + b) (and out += it) for few rows against float64 torch; repeated runs identical."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * width + activation)
    act = {0: lambda v: v, 1: F.gelu, 2: F.silu}[activation]
    ref = act(x.double() @ weight.double().t() + bias.double())
    if accumulate:
        ref = ref + out.double()
        start = out.clone()
        got = cpp_ext.kernels.skinny_linear(x, weight, bias, activation, out)
        assert got.data_ptr() == out.data_ptr()
        again = cpp_ext.kernels.skinny_linear(x, weight, bias, activation, start)
    else:
        got = cpp_ext.kernels.skinny_linear(x, weight, bias, activation)
        again = cpp_ext.kernels.skinny_linear(x, weight, bias, activation)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    assert rel(got, ref) <= tol, rel(got, ref)
    assert torch.equal(got, again)
    if not accumulate:
        assert torch.equal(cpp_ext.kernels.skinny_linear(x, weight, None, activation),
                           cpp_ext.kernels.skinny_linear(x, weight, None, activation))


@needs_kernel
@pytest.mark.parametrize("rows,width,features", SKINNY_SHAPES)
def test_skinny_linear_with_four_warps_matches_eight(rows, width, features):
    """The 4-warp blocks (a benchmark option) give the 8-warp result within fp16 rounding."""
    g = torch.Generator().manual_seed(rows + width)
    x = torch.randn(rows, width, generator=g).half().cuda()
    weight = (torch.randn(features, width, generator=g) / width**0.5).half().cuda()
    bias = torch.randn(features, generator=g).half().cuda()
    ref = F.gelu(x.double() @ weight.double().t() + bias.double())
    four = cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 4)
    assert rel(four, ref) <= 2e-3
    assert rel(four, cpp_ext.kernels.skinny_linear(x, weight, bias, 1)) <= 2e-3


@needs_kernel
@pytest.mark.parametrize("rows,width,features", [(1, 64, 32), (6, 2048, 96), (13, 160, 64), (24, 2048, 6144),
                                                  (24, 8192, 2048), (32, 4096, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("warps", [4, 8])
def test_skinny_linear_with_32_feature_blocks_matches_float64(rows, width, features, dtype, warps):
    """32 output features per block (two weight tiles per loaded input pack): GELU(x·Wᵀ + b) and
    out += x·Wᵀ + b against float64 torch, repeatable; refused beyond 32 rows or for a feature
    count that is not a multiple of 32."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * 7 + width)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    got = cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, warps, 32)
    ref = F.gelu(x.double() @ weight.double().t() + bias.double())
    assert rel(got, ref) <= tol, rel(got, ref)
    assert torch.equal(got, cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, warps, 32))
    ref_acc = out.double() + x.double() @ weight.double().t() + bias.double()
    acc = cpp_ext.kernels.skinny_linear(x, weight, bias, 0, out, warps, 32)
    assert acc.data_ptr() == out.data_ptr() and rel(acc, ref_acc) <= tol
    with pytest.raises(RuntimeError, match="block_features"):
        cpp_ext.kernels.skinny_linear(torch.zeros(33, width, dtype=dtype, device="cuda"), weight, bias, 0, None, warps,
                                      32)
    with pytest.raises(RuntimeError, match="block_features"):
        cpp_ext.kernels.skinny_linear(x, weight[:16], bias[:16], 0, None, warps, 32)


@needs_kernel
@pytest.mark.parametrize("rows,width,features", SKINNY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_linear_with_8_feature_blocks_matches_float64(rows, width, features, dtype):
    """8 output features per block (the mma's other 8 rows repeat them): GELU(x·Wᵀ + b) and
    out += x·Wᵀ + b against float64 torch, repeatable, and the same bits as 16-feature blocks
    (each feature's sums run in the same order)."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * 5 + width)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    got = cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 8, 8)
    ref = F.gelu(x.double() @ weight.double().t() + bias.double())
    assert rel(got, ref) <= tol, rel(got, ref)
    assert torch.equal(got, cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 8, 8))
    assert torch.equal(got, cpp_ext.kernels.skinny_linear(x, weight, bias, 1, None, 8, 16))
    ref_acc = out.double() + x.double() @ weight.double().t() + bias.double()
    acc = cpp_ext.kernels.skinny_linear(x, weight, bias, 0, out, 8, 8)
    assert acc.data_ptr() == out.data_ptr() and rel(acc, ref_acc) <= tol




STAGED_SHAPES = [(1, 512, 16), (6, 2048, 6144), (12, 2048, 8192), (3, 8192, 2048), (16, 1024, 96), (6, 8192, 2048),
                 (9, 1536, 64), (24, 2048, 6144), (20, 8192, 2048)]


@needs_kernel
@needs_hopper
@pytest.mark.parametrize("rows,width,features,block,stages",
                         [(*shape, block, stages) for shape in STAGED_SHAPES
                          for block, stages in [(8, 1), (8, 8), (16, 2), (16, 4), (32, 2), (32, 3)]
                          if shape[2] % block == 0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_linear_staged_matches_float64(rows, width, features, block, stages, dtype):
    """The weights through a ring of shared-memory stages (bulk copies, mbarriers): act(x·Wᵀ + b)
    for every activation and out += x·Wᵀ + b against float64 torch, repeated runs identical, from
    one stage (each chunk waits for the one before to be consumed) to more stages than chunks."""
    x, weight, bias, out = _skinny_inputs(rows, width, features, dtype, seed=rows * 11 + width + block)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    run = cpp_ext.kernels.skinny_linear_staged
    for activation, act in ((0, lambda v: v), (1, F.gelu), (2, F.silu)):
        ref = act(x.double() @ weight.double().t() + bias.double())
        got = run(x, weight, bias, activation, None, block, stages)
        assert rel(got, ref) <= tol, (activation, rel(got, ref))
        assert torch.equal(got, run(x, weight, bias, activation, None, block, stages))
    ref_acc = out.double() + x.double() @ weight.double().t() + bias.double()
    acc = run(x, weight, bias, 0, out, block, stages)
    assert acc.data_ptr() == out.data_ptr() and rel(acc, ref_acc) <= tol
    no_bias = run(x, weight, None, 0, None, block, stages)
    assert rel(no_bias, x.double() @ weight.double().t()) <= tol


@needs_kernel
@needs_hopper
def test_skinny_linear_staged_chain_replays_from_a_cuda_graph():
    """Staged linears launched overlapped after one another (the second reading the first's
    output, the third accumulating into the stream), captured and replayed: the eager bits."""
    x, w1, b1, _ = _skinny_inputs(6, 2048, 8192, torch.float16, seed=21)
    _, w2, b2, _ = _skinny_inputs(6, 8192, 2048, torch.float16, seed=22)
    stream_rows = torch.randn(6, 2048, dtype=torch.float16, device="cuda")
    start = stream_rows.clone()
    run = cpp_ext.kernels.skinny_linear_staged

    def chain():
        hidden = run(x, w1, b1, 1, None, 32, 2)
        run(hidden, w2, b2, 0, stream_rows, 16, 4)
        return hidden

    eager_hidden = chain().clone()
    eager = stream_rows.clone()
    stream_rows.copy_(start)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_hidden = chain()
    stream_rows.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_hidden, eager_hidden) and torch.equal(stream_rows, eager)


@needs_kernel
@needs_hopper
def test_skinny_linear_staged_refuses_what_it_cannot_run():
    """Widths not a multiple of 512, more than 24 rows, block sizes other than 8/16/32 or not
    dividing the features, 0 or 9 stages, a ring larger than the GPU's shared memory, mismatched
    tensors: a clear error before any launch."""
    x, w, b, _ = _skinny_inputs(6, 1024, 64, torch.float16, seed=3)
    run = cpp_ext.kernels.skinny_linear_staged
    with pytest.raises(RuntimeError, match="multiple of 512"):
        run(x[:, :256].contiguous(), w[:, :256].contiguous(), b)
    with pytest.raises(RuntimeError, match="24 rows"):
        run(torch.zeros(25, 1024, dtype=torch.float16, device="cuda"), w, b)
    with pytest.raises(RuntimeError, match="block_features"):
        run(x, w, b, 0, None, 24, 2)
    with pytest.raises(RuntimeError, match="block_features"):
        run(x, w[:48].contiguous(), b[:48].contiguous(), 0, None, 32, 2)
    with pytest.raises(RuntimeError, match="stages"):
        run(x, w, b, 0, None, 16, 0)
    with pytest.raises(RuntimeError, match="stages"):
        run(x, w, b, 0, None, 16, 9)
    with pytest.raises(RuntimeError, match="shared memory"):
        run(x, w, b, 0, None, 32, 8)
    with pytest.raises(RuntimeError, match="weight"):
        run(x, w.bfloat16(), b)
    with pytest.raises(RuntimeError, match="out"):
        run(x, w, b, 0, torch.zeros(6, 32, dtype=torch.float16, device="cuda"))


@needs_kernel
def test_skinny_linear_chain_replays_from_a_cuda_graph():
    """The overlapped launches (programmatic dependent launch) of a chain of layer norms and
    skinny linears, captured in a CUDA graph and replayed, give the eager chain's result exactly."""
    g = torch.Generator().manual_seed(5)
    width = 256
    rows = torch.randn(6, width, generator=g).half().cuda()

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).half().cuda()

    layers = [(rand(3 * width, width, scale=1 / 16), rand(3 * width), rand(width, 3 * width, scale=1 / 28), rand(width))
              for _ in range(4)]
    ones, zeros = torch.ones(width).half().cuda(), torch.zeros(width).half().cuda()

    def chain(stream_rows: torch.Tensor) -> None:
        for w1, b1, w2, b2 in layers:
            h = cpp_ext.kernels.residual_layer_norm(stream_rows, None, ones, zeros, 1e-5)
            hidden = cpp_ext.kernels.skinny_linear(h, w1, b1, 1)
            cpp_ext.kernels.skinny_linear(hidden, w2, b2, 0, stream_rows)

    eager = rows.clone()
    chain(eager)
    static = rows.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(static.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(static)
    for _ in range(3):
        static.copy_(rows)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static, eager)
    assert not torch.equal(eager, rows)


@needs_kernel
def test_skinny_linear_refuses_what_it_cannot_run():
    """Shapes outside the kernel's reach get a clear error, not a wrong answer."""
    x = torch.randn(65, 64).half().cuda()
    w = torch.randn(32, 64).half().cuda()
    with pytest.raises(RuntimeError, match="1 to 64 rows"):
        cpp_ext.kernels.skinny_linear(x, w)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpp_ext.kernels.skinny_linear(x[:4, :40].contiguous(), w[:, :40].contiguous())
    with pytest.raises(RuntimeError, match="activation"):
        cpp_ext.kernels.skinny_linear(x[:4], w, None, 3)
    square = torch.randn(4, 64).half().cuda()
    with pytest.raises(RuntimeError, match="must not overlap"):
        cpp_ext.kernels.skinny_linear(square, torch.randn(64, 64).half().cuda(), None, 0, square)
    with pytest.raises(RuntimeError, match="warps"):
        cpp_ext.kernels.skinny_linear(x[:4], w, None, 0, None, 6)
