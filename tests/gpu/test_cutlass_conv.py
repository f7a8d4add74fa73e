"""The CUTLASS Hopper convolution (`cpp_ext._cutlass_conv`, `models.implicit_conv`) against
cuDNN's on the UNets' shapes: every fp16 tile configuration, with and without bias, a CUDA-graph
replay equal to the eager call, the fused UNet with it, the convolution as one explicit product; the e4m3
configurations against the product of their operands, and `Fp8Conv`'s "cutlass" way against its
read-back way. Skipped where it was not built (UNCLIP_RT_CUTLASS=1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cpp_ext
from tests.gpu.common import rel

pytestmark = pytest.mark.gpu
if cpp_ext.cutlass_conv is None:
    pytest.skip("cpp_ext._cutlass_conv not built (UNCLIP_RT_CUTLASS=1 python setup.py build_ext --inplace)",
                allow_module_level=True)


def replayed(call) -> torch.Tensor:
    """`call()` captured into a CUDA graph on its own, its output zeroed, then replayed: what the
    replay wrote."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    out.fill_(0)
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize(("batch", "cin", "cout", "size", "kernel"),
                         [(1, 320, 320, 64, 3), (2, 640, 320, 32, 3), (1, 192, 384, 16, 1), (4, 64, 128, 24, 3)])
def test_every_configuration_gives_cudnns_convolution(batch, cin, cout, size, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(batch, cin, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    want = conv(x)
    for config, name in enumerate(cpp_ext.cutlass_conv.configs()):
        if not name.startswith("f16_"):
            continue
        got = cpp_ext.cutlass_conv.conv2d(x, conv.weight.detach(), conv.bias.detach(), kernel // 2, kernel // 2,
                                          config)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert rel(got, want) <= 2e-3, name
        plain = cpp_ext.cutlass_conv.conv2d(x, conv.weight.detach(), None, kernel // 2, kernel // 2, config)
        assert rel(plain, conv._conv_forward(x, conv.weight, None)) <= 2e-3, name


def test_the_wrapper_picks_a_configuration_and_replays_from_a_cuda_graph():
    from models import implicit_conv

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


def test_every_configuration_replays_from_a_cuda_graph_as_it_runs_eagerly():
    """Each configuration captured on its own (the stream-K ones clear and use their workspace
    inside the graph): the replay equals the eager call bit for bit, on a decoder-size shape that
    leaves most SMs without a whole output tile."""
    from models.fp8.e4m3 import E4M3

    torch.manual_seed(0)
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = (torch.randn(320, 320, 3, 3, device="cuda", dtype=torch.float16) / 30).to(memory_format=torch.channels_last)
    bias, scale = torch.randn(320, device="cuda", dtype=torch.float16), torch.rand(320, device="cuda") + 0.5
    xq, wq = x.to(E4M3), w.to(E4M3)
    for config, name in enumerate(cpp_ext.cutlass_conv.configs()):
        def call(config=config, name=name):
            if name.startswith("e4m3_"):
                return cpp_ext.cutlass_conv.conv2d_e4m3(xq, wq, scale, bias, 1, 1, config)
            return cpp_ext.cutlass_conv.conv2d(x, w, bias, 1, 1, config)

        eager = call()
        assert torch.equal(replayed(call), eager), name


@pytest.mark.parametrize("timing", ["eager", "graph"])
def test_cudnn_runs_in_the_fp16_race_and_the_winner_is_kept(monkeypatch, timing):
    """`implicit_conv.conv2d` times cuDNN beside every fp16 configuration on a new shape and keeps
    the fastest, either way of timing: the choice is cuDNN or one of the configurations, its result
    either's."""
    from models import implicit_conv

    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", timing)
    torch.manual_seed(0)
    conv = nn.Conv2d(320, 320, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(1, 320, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    got = implicit_conv.conv2d(x, conv.weight.detach(), conv.bias.detach(), 1)
    (key, chosen), = implicit_conv._best.items()
    names = cpp_ext.cutlass_conv.configs()
    assert chosen == implicit_conv.CUDNN or names[chosen].startswith("f16_")
    assert rel(got, conv(x)) <= 2e-3


@pytest.mark.parametrize("timing", ["eager", "graph"])
def test_a_fast_wrong_entry_never_wins_the_race(monkeypatch, timing):
    """An entry that returns at once with a wrong result (zeros) joins a real race beside cuDNN and
    every fp16 configuration: the agreement check leaves it out with a warning, and the shape keeps
    a correct kernel."""
    from models import implicit_conv

    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", timing)
    monkeypatch.setattr(implicit_conv.conv_choices, "save", lambda *a, **k: None)
    monkeypatch.setattr(implicit_conv.conv_choices, "load", lambda *a, **k: {})
    conv = nn.Conv2d(320, 320, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 320, 16, 16, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = conv.weight.detach()
    wrong = -7  # not an entry any race holds

    def launch(entry, x, w):
        if entry == wrong:
            return torch.zeros(2, 320, 16, 16, device="cuda", dtype=torch.float16)
        return implicit_conv.run_f16(entry, x, w, None, (1, 1))

    monkeypatch.setattr(implicit_conv, "describe", lambda e: "wrong" if e == wrong else str(e))
    with pytest.warns(UserWarning, match="wrong differs from cuDNN"):
        chosen = implicit_conv._fastest("f16", (tuple(x.shape), tuple(w.shape), (1, 1)), launch, (x, w),
                                        others=(implicit_conv.CUDNN, wrong))
    assert chosen != wrong


@pytest.mark.skipif(cpp_ext.kernels is None, reason="cpp_ext not built")
def test_the_fused_unet_with_cutlass_convolutions_gives_the_cudnn_forward(monkeypatch):
    """The default model's super-res UNet, fp16 channels-last, on the fused path with its residual
    blocks' 3×3 convolutions on CUTLASS (`FusedOptions(cutlass_convs=True)`) against the same
    path on cuDNN; the CUTLASS kernel must have run."""
    from models import fused, implicit_conv
    from models.fused import FusedOptions
    from runtime.pipeline import DEFAULT_MODEL, load_folder

    torch.manual_seed(0)
    model = load_folder(DEFAULT_MODEL).cuda().half().to(memory_format=torch.channels_last)
    unet = model.super_res[0].first_steps
    x = torch.randn(2, 6, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    t = torch.tensor([900, 10], device="cuda")
    # CUTLASS's configurations only (cuDNN out of the race), so that every served convolution runs on it
    race = implicit_conv._fastest
    monkeypatch.setattr(implicit_conv, "_fastest",
                        lambda kind, key, launch, operands, others=(): race(kind, key, launch, operands))
    monkeypatch.setattr(implicit_conv, "_best", {})
    calls = []
    kernel = cpp_ext.cutlass_conv.conv2d
    monkeypatch.setattr(cpp_ext.cutlass_conv, "conv2d", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    with torch.no_grad():
        want = fused.unet_forward(unet, x, t, options=FusedOptions(cutlass_convs=False))
        assert not calls
        fused.unet_forward(unet, x, t, options=FusedOptions(cutlass_convs=True))  # the race's first calls
        calls.clear()
        got = fused.unet_forward(unet, x, t, options=FusedOptions(cutlass_convs=True))
    assert calls  # the residual blocks' convolutions ran on CUTLASS
    # two fp16 convolutions that sum in different orders (each within 7e-4 of the other on these
    # shapes) through some 20 layers of the UNet
    assert rel(got, want) <= 1e-2


@pytest.mark.skipif(cpp_ext.kernels is None, reason="cpp_ext not built")
@pytest.mark.parametrize("timing", ["eager", "graph"])
def test_the_runtime_runs_its_unets_convolutions_through_the_race_by_default(monkeypatch, timing):
    """`UnCLIP()` (`FusedOptions.cutlass_convs` on by default) on the default model in fp16 with CUDA
    graphs: the decoder's and super-res UNets' residual-block convolutions go through
    `implicit_conv` (each shape's race ran: cuDNN against the configurations, timed either way; the
    graph race's own captures come before the runtime's), and the image is
    the cuDNN runtime's (`cutlass_convs=False`) to fp16 rounding through the sampling loops (fp16 against fp32 gives
    31.6 dB on this model: a summation order alone should change the image less)."""
    from models import implicit_conv
    from models.fused import FusedOptions
    from runtime import UnCLIP
    from tests.metrics import psnr

    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", timing)
    monkeypatch.setenv("UNCLIP_RT_CONV_CACHE", "off")  # race every shape in this process
    plain = UnCLIP(device="cuda", dtype=torch.float16, progress=False, fused=FusedOptions(cutlass_convs=False))
    want = plain.generate("a red circle on a blue background", seed=0, output_type="pt").images
    assert not implicit_conv._best
    raced = UnCLIP(device="cuda", dtype=torch.float16, progress=False)
    got = raced.generate("a red circle on a blue background", seed=0, output_type="pt").images
    channels = {key[2][1] for key in implicit_conv._best}  # every input channel count the race saw
    assert implicit_conv._best and channels >= {32, 64}, implicit_conv._best
    assert psnr(got, want) >= 30


@pytest.mark.parametrize(("batch", "cin", "cout", "size", "kernel"), [(1, 320, 320, 64, 3), (2, 192, 384, 16, 1)])
def test_every_e4m3_configuration_gives_the_product_of_its_operands(batch, cin, cout, size, kernel):
    from models.fp8.e4m3 import E4M3

    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size, device="cuda").to(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, kernel, kernel, device="cuda").to(memory_format=torch.channels_last) / 8
    xq, wq = x.to(E4M3), w.to(E4M3)  # on the grid already: the kernel's operands, exactly
    scale = torch.rand(cout, device="cuda") + 0.5
    bias = torch.randn(cout, device="cuda").half()
    ref = F.conv2d(xq.double(), wq.double(), padding=kernel // 2) * scale.double()[:, None, None] \
        + bias.double()[:, None, None]
    names = cpp_ext.cutlass_conv.configs()
    e4m3 = [i for i, name in enumerate(names) if name.startswith("e4m3_")]
    assert e4m3
    for config in e4m3:
        got = cpp_ext.cutlass_conv.conv2d_e4m3(xq, wq, scale, bias, kernel // 2, kernel // 2, config)
        assert got.dtype == torch.float16 and got.is_contiguous(memory_format=torch.channels_last)
        assert rel(got, ref) <= 5e-3, names[config]


def test_the_fp8_layers_cutlass_way_gives_their_read_back_way():
    from models.fp8 import layers as fp8_layers

    torch.manual_seed(0)
    layer = fp8_layers.Fp8Conv.from_float(nn.Conv2d(320, 320, 3, padding=1)).cuda().half()
    x = torch.randn(2, 320, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    got, want = layer(x, "cutlass"), layer(x, "readback")
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel(got, want) <= 5e-3


@pytest.mark.parametrize(("batch", "cin", "cout", "size"), [(2, 1280, 1280, 8), (2, 960, 640, 16), (1, 320, 320, 64)])
def test_every_split_count_gives_the_unsplit_convolution(batch, cin, cout, size):
    """The stream-K configurations in split-K mode (`splits` 2, 3, 4, 8 and 16 parts per output
    tile's K loop) on the decoder's small maps, where the GPU has more SMs than output tiles:
    fp16 within 2e-3 of cuDNN, e4m3 within 5e-3 of the exact product of its operands; the parts
    meet in a fixed order, so two calls agree bit for bit and a CUDA-graph replay equals the eager
    call. A configuration without a split count refuses one."""
    from models.fp8.e4m3 import E4M3

    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.float16) / 30).to(memory_format=torch.channels_last)
    bias, scale = torch.randn(cout, device="cuda", dtype=torch.float16), torch.rand(cout, device="cuda") + 0.5
    xq, wq = x.to(E4M3), w.to(E4M3)
    want = F.conv2d(x, w, bias, padding=1)
    exact = (F.conv2d(xq.double(), wq.double(), padding=1) * scale.double()[:, None, None]
             + bias.double()[:, None, None])
    names = cpp_ext.cutlass_conv.configs()
    splittable = cpp_ext.cutlass_conv.split_configs()
    assert splittable and all("streamk" in names[i] for i in splittable)
    for config in splittable:
        e4m3 = names[config].startswith("e4m3_")
        for splits in (2, 3, 4, 8, 16):
            def call(config=config, splits=splits, e4m3=e4m3):
                if e4m3:
                    return cpp_ext.cutlass_conv.conv2d_e4m3(xq, wq, scale, bias, 1, 1, config, splits)
                return cpp_ext.cutlass_conv.conv2d(x, w, bias, 1, 1, config, splits)

            label = f"{names[config]} splits {splits}"
            eager = call()
            assert rel(eager, exact if e4m3 else want) <= (5e-3 if e4m3 else 2e-3), label
            assert torch.equal(call(), eager), label
            assert torch.equal(replayed(call), eager), label
    plain = next(i for i, name in enumerate(names) if name.startswith("f16_") and i not in splittable)
    with pytest.raises(RuntimeError, match="takes no split count"):
        cpp_ext.cutlass_conv.conv2d(x, w, bias, 1, 1, plain, 2)


@pytest.mark.parametrize("timing", ["eager", "graph"])
def test_the_race_takes_split_counts_where_asked(monkeypatch, timing):
    """With `implicit_conv.SPLITS`, each stream-K configuration races once per split count (in the
    graph race each captured with its workspace); the kept entry's result is cuDNN's within fp16
    tolerance."""
    from models import implicit_conv

    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", timing)
    monkeypatch.setattr(implicit_conv, "SPLITS", (2, 4, 8))
    torch.manual_seed(0)
    conv = nn.Conv2d(1280, 1280, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1280, 8, 8, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    entries = implicit_conv._configs("f16")
    assert sum(isinstance(e, tuple) for e in entries) == 3 * sum(
        cpp_ext.cutlass_conv.configs()[i].startswith("f16_") for i in cpp_ext.cutlass_conv.split_configs())
    got = implicit_conv.conv2d(x, conv.weight.detach(), conv.bias.detach(), 1)
    (key, chosen), = implicit_conv._best.items()
    print(f"2x1280@8² kept ({timing} race):", implicit_conv.describe(chosen))
    assert rel(got, conv(x)) <= 2e-3


@pytest.mark.parametrize(("batch", "cin", "cout", "size"), [(2, 1280, 1280, 8), (2, 2560, 1280, 8), (2, 960, 960, 16)])
def test_the_gemm_way_gives_cudnns_convolution_and_replays_from_a_cuda_graph(batch, cin, cout, size):
    """`conv2d_as_gemm` on the decoder's small maps (one of them its widest skip concatenation):
    within 2e-3 of cuDNN with and without bias, channels-last out, and a CUDA-graph replay equal
    to the eager call."""
    from models import implicit_conv

    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.float16) / 30).to(memory_format=torch.channels_last)
    bias = torch.randn(cout, device="cuda", dtype=torch.float16)
    for b in (bias, None):
        eager = implicit_conv.conv2d_as_gemm(x, w, b, 1)
        assert eager.is_contiguous(memory_format=torch.channels_last)
        assert rel(eager, F.conv2d(x, w, b, padding=1)) <= 2e-3
        assert torch.equal(replayed(lambda b=b: implicit_conv.conv2d_as_gemm(x, w, b, 1)), eager)


def test_the_race_stores_its_choice_and_a_new_process_takes_it(monkeypatch, tmp_path):
    """The first call of a shape races and stores the winner (`models.conv_choices`); with the
    process's memory cleared, as in a new process, the next call takes the stored entry without
    timing any candidate, and gives the same output bit for bit."""
    from models import conv_choices, implicit_conv

    path = tmp_path / "choices.json"
    monkeypatch.setenv(conv_choices.ENV, str(path))
    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv, "_loaded", set())
    torch.manual_seed(0)
    conv = nn.Conv2d(320, 320, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(1, 320, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    first = implicit_conv.conv2d(x, conv.weight.detach(), conv.bias.detach(), 1)
    (key, chosen), = implicit_conv._best.items()
    environment = implicit_conv.environment(x.device)
    assert conv_choices.load(path, environment) == {key: implicit_conv.describe(chosen)}
    implicit_conv._best.clear()
    implicit_conv._loaded.clear()
    timed = []
    monkeypatch.setattr(torch.cuda, "Event", lambda **kw: timed.append(kw) or pytest.fail("a candidate was timed"))
    again = implicit_conv.conv2d(x, conv.weight.detach(), conv.bias.detach(), 1)
    assert implicit_conv._best == {key: chosen} and not timed
    assert torch.equal(again, first)


@pytest.mark.skipif(cpp_ext.kernels is None, reason="cpp_ext not built")
def test_overlapped_launches_give_the_serial_chains_results():
    """The persistent configurations built with CUTLASS's grid-dependency waits, launched by
    programmatic dependent launch (`set_overlapped(True)`; off by default until measured): a chain
    in which each kernel reads the one before (cpp_ext's group norm, itself overlapped, then the
    convolution, four times) gives, eager and replayed from a CUDA graph, the same bits as the
    chain launched serially."""
    kernel = cpp_ext.cutlass_conv
    kept = kernel.overlapped()
    names = kernel.configs()
    persistent = [i for i, n in enumerate(names) if n.startswith("f16_") and n.endswith("_persistent")]
    torch.manual_seed(0)
    x = torch.randn(1, 320, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    w = (torch.randn(320, 320, 3, 3, device="cuda") * 0.02).half().to(memory_format=torch.channels_last)
    gw, gb = torch.ones(320, device="cuda").half(), torch.zeros(320, device="cuda").half()

    def chain(config):
        h = x
        for _ in range(4):
            h = cpp_ext.kernels.group_norm(h, 32, gw, gb, silu=True)
            h = kernel.conv2d(h, w, None, 1, 1, config)
        return h

    try:
        for config in persistent:
            kernel.set_overlapped(True)
            overlapped = [chain(config) for _ in range(3)] + [replayed(lambda config=config: chain(config))]
            kernel.set_overlapped(False)
            serial = chain(config)
            print(names[config], "overlapped = serial:", all(torch.equal(o, serial) for o in overlapped))
            assert all(torch.equal(o, serial) for o in overlapped), names[config]
    finally:
        kernel.set_overlapped(kept)


@pytest.mark.parametrize("kind", ["f16", "e4m3"])
def test_every_configuration_adds_a_residual_in_its_epilogue(kind):
    """`residual=`: the epilogue adds an fp16 map of the output's shape (beta 1) to the scaled
    product and the bias, rounded once: against the exact sum (fp16 operands in float64, e4m3
    operands exactly), within the output's fp16 rounding; the same configuration without it,
    plus the residual, agrees to one more rounding. A residual of another shape is refused."""
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 320, 32, 32, device="cuda").to(memory_format=cl)
    w = (torch.randn(320, 320, 3, 3, device="cuda") * 0.02).to(memory_format=cl)
    bias = torch.randn(320, device="cuda").half()
    residual = torch.randn(2, 320, 32, 32, device="cuda").half().to(memory_format=cl)
    names = cpp_ext.cutlass_conv.configs()
    if kind == "e4m3":
        from models.fp8.e4m3 import quantize

        xq, wq = quantize(x, torch.tensor(1 / 64, device="cuda")), quantize(w, torch.tensor(1 / 4096, device="cuda"))
        scale = torch.full((320,), 1 / 64 / 4096, device="cuda")
        product = F.conv2d(xq.double(), wq.double(), padding=1) * scale.double()[:, None, None]

        def run(config, r=None):
            return cpp_ext.cutlass_conv.conv2d_e4m3(xq, wq, scale, bias, 1, 1, config, residual=r)
    else:
        xh, wh = x.half(), w.half()
        product = F.conv2d(xh.double(), wh.double(), padding=1)

        def run(config, r=None):
            return cpp_ext.cutlass_conv.conv2d(xh, wh, bias, 1, 1, config, residual=r)
    exact = product + bias.double()[:, None, None] + residual.double()
    for config in (i for i, n in enumerate(names) if n.startswith(kind + "_")):
        got = run(config, residual)
        assert got.is_contiguous(memory_format=cl)
        assert rel(got, exact) <= 2e-3, names[config]
        assert rel(got, run(config).double() + residual.double()) <= 2e-3, names[config]
    first = next(i for i, n in enumerate(names) if n.startswith(kind + "_"))
    with pytest.raises(RuntimeError, match="residual"):
        run(first, residual[:, :, :16].contiguous(memory_format=cl))


@pytest.mark.skipif(cpp_ext.kernels is None, reason="cpp_ext not built")
@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_the_fused_unet_joins_its_identity_skips_in_the_convolutions(monkeypatch, precision):
    """`FusedOptions(residual_in_conv=True)`: the default model's super-res UNet on the fused path
    (every served 3×3 on CUTLASS; FP8: calibrated scales, the norms writing e4m3 too) adds its
    identity skips and last biases in the convolutions' epilogue — the residual reaches the kernel —
    and gives the output without the option to rounding through the UNet (FP8: as near the fp16
    network's as without it)."""
    import copy

    from models import fp8, fused, implicit_conv
    from models.fp8.scales import observe
    from models.fused import FusedOptions
    from runtime.pipeline import DEFAULT_MODEL, load_folder

    torch.manual_seed(0)
    model = load_folder(DEFAULT_MODEL).cuda().half().to(memory_format=torch.channels_last)
    unet = model.super_res[0].first_steps
    x = torch.randn(2, 6, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    t = torch.tensor([900, 10], device="cuda")
    race = implicit_conv._fastest  # CUTLASS's configurations only, as in the test above
    monkeypatch.setattr(implicit_conv, "_fastest",
                        lambda kind, key, launch, operands, others=(): race(kind, key, launch, operands))
    monkeypatch.setattr(implicit_conv, "_best", {})
    base = {}
    unet16 = copy.deepcopy(unet)
    if precision == "fp8":
        fp8.convert(model, groups=("super_res",))
        unet = model.super_res[0].first_steps
        with torch.no_grad(), observe(model) as scales:
            unet(x, t)
        layers = fp8.fp8_layers(model)
        for name, scale in scales.items():
            layers[name].set_input_scale(scale)
        base = {"norm_writes_e4m3": True}
    joined = []
    for name in ("conv2d", "conv2d_e4m3"):
        kernel = getattr(cpp_ext.cutlass_conv, name)
        monkeypatch.setattr(cpp_ext.cutlass_conv, name, lambda *a, kernel=kernel, **kw: (
            joined.append(a[0].shape) if kw.get("residual") is not None else None) or kernel(*a, **kw))
    with torch.no_grad():
        ref16 = fused.unet_forward(unet16, x, t, options=FusedOptions(cutlass_convs=False))
        want = fused.unet_forward(unet, x, t, options=FusedOptions(**base))
        assert not joined
        got = fused.unet_forward(unet, x, t, options=FusedOptions(residual_in_conv=True, **base))
    errors = {"joins": rel(want, ref16), "in the epilogue": rel(got, ref16)}
    print(precision, len(joined), "joins in the epilogue; against fp16 on cuDNN:", errors)
    assert joined
    if precision == "fp16":
        assert rel(got, want) <= 1e-2
    else:  # FP8 turns a rounding difference into other e4m3 roundings downstream: compared through the error
        assert errors["in the epilogue"] <= max(1.5 * errors["joins"], 2e-2), errors


def test_the_graph_race_times_a_launch_as_its_work_and_frees_what_it_made():
    """`race_timing.graph_times` on a decoder shape: a launch that runs the convolution twice takes
    well over one that runs it once (the time is the launch's work, per operand copy), every entry
    that runs gets a time and one that raises is left out, and the copies and graphs are gone after
    (the memory allocated is as before)."""
    from models import race_timing

    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 1280, 8, 8, device="cuda", dtype=torch.float16).to(memory_format=cl)
    w = (torch.randn(1280, 1280, 3, 3, device="cuda", dtype=torch.float16) / 100).to(memory_format=cl)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    def launch(entry, x, w):
        if entry == "refused":
            raise RuntimeError("this tile shape cannot implement the shape")
        out = F.conv2d(x, w, padding=1)
        return F.conv2d(out, w, padding=1) if entry == "twice" else out

    times = race_timing.graph_times(["once", "twice", "refused"], launch, (x, w))
    assert set(times) == {"once", "twice"} and all(t > 0 for t in times.values())
    assert times["twice"] > 1.4 * times["once"], times
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_the_e4m3_race_timed_by_graphs_gives_the_product_of_its_operands(monkeypatch):
    """The e4m3 race with `RACE_TIMING = "graph"`: it keeps one of the e4m3 configurations, whose
    output is the scaled product of its operands (as the eager race's), and a later CUDA-graph
    capture of the same call replays it bit for bit."""
    from models import implicit_conv
    from models.fp8.e4m3 import E4M3

    monkeypatch.setattr(implicit_conv, "_best", {})
    monkeypatch.setattr(implicit_conv, "RACE_TIMING", "graph")
    monkeypatch.setenv("UNCLIP_RT_CONV_CACHE", "off")
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(2, 640, 16, 16, device="cuda", dtype=torch.float16).to(memory_format=cl)
    w = (torch.randn(640, 640, 3, 3, device="cuda", dtype=torch.float16) / 30).to(memory_format=cl)
    xq, wq = x.to(E4M3), w.to(E4M3)
    scale = torch.rand(640, device="cuda") + 0.5
    bias = torch.randn(640, device="cuda", dtype=torch.float16)
    got = implicit_conv.conv2d_e4m3(xq, wq, scale, bias, 1)
    (key, chosen), = implicit_conv._best.items()
    assert key[0] == "e4m3" and implicit_conv.describe(chosen).startswith("e4m3_")
    want = F.conv2d(xq.double(), wq.double(), padding=1) * scale.double()[:, None, None] + bias.double()[:, None, None]
    assert rel(got, want) <= 5e-3
    assert torch.equal(replayed(lambda: implicit_conv.conv2d_e4m3(xq, wq, scale, bias, 1)), got)
