"""Convolutions through CUTLASS's Hopper implicit GEMM (`cpp_ext._cutlass_conv`): the
activation read by TMA in im2col mode (no gathered copy), wgmma with fp32 accumulation, a
per-channel scale and bias in the epilogue, channels-last in and out; fp16 operands (`conv2d`) or
e4m3 ones (`conv2d_e4m3`, the FP8 path's "cutlass" way, `models.fp8.layers`).

The kernel comes in a few tile configurations per operand type, on CUTLASS's plain
warp-specialised kernel and on its persistent cooperative one (names ending "_persistent", some
with the stream-K scheduler); which is fastest depends on the shape, so the first call of each
shape times every configuration of its type (CUDA events, outside any CUDA-graph capture;
`RACE_TIMING` says how, `models.race_timing`: "graph", the default, each entry replayed from a
CUDA graph over copies of its operands that do not fit the L2 cache together, as the UNets run
and read their weights, or "eager", host launches on the one weight) and keeps the fastest. For fp16 cuDNN's
convolution runs in that race too, so a shape where cuDNN is faster keeps it.
Before an fp16 entry is timed, its first output is checked against cuDNN's on the same operands
(`AGREEMENT`): one that does not agree is left out with a warning, so a kernel that is wrong on
a shape can never win that shape's race by being fast. `conv2d_as_gemm`
is the convolution as one explicit product (neighbourhoods gathered, cuBLAS), a reference way
for the decoder's small maps' benchmarks (`benchmarks/conv_split_k.py`); it lost to cuDNN and
CUTLASS at every Karlo shape, so it is not in the race (docs/kernels.md). `PERSISTENT = False`
leaves the persistent configurations out (to measure what they add: `benchmarks/latency.py
--cutlass-plain`). `SPLITS` adds the stream-K configurations in split-K mode, each split count
an entry of the race (`(configuration, splits)`): for shapes with fewer output tiles than the
GPU has SMs, where a tile's long K loop runs on one SM while most idle (the decoder's small
maps). It is empty by default: CUTLASS 4.2's split-K meets its parts one after another, and it
never paid (`benchmarks/latency.py --cutlass-splits`; docs/kernels.md). `conv2d` falls back to
torch's (cuDNN's) convolution wherever the kernel does not serve: not built, not CUDA fp16
channels-last, stride or dilation other than 1, groups, channel counts not multiples of 8. It is
built only on request (UNCLIP_RT_CUTLASS=1 at `setup.py build_ext`, with CUTLASS's headers). The
race's choices are kept on disk (`models.conv_choices`): a later process on the same GPU and
software reads them instead of timing each shape again; `benchmarks/fp8_convs.py` times every
configuration against cuDNN; the fused UNets' residual blocks take `conv2d` by default
(`FusedOptions.cutlass_convs`), the FP8 layers the e4m3 one where `models.fp8.layers.CONV_PATH`
picks "cutlass".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import cpp_ext
from models import conv_choices, race_timing

Entry = int | tuple[int, int]  # a configuration's index (CUDNN: cuDNN's), or (stream-K configuration, splits)
_best: dict[tuple, Entry] = {}  # (kind, shape of x, shape of weight, padding) → fastest entry
PERSISTENT = True  # whether the persistent-kernel configurations join the choice (module docstring)
SPLITS: tuple[int, ...] = ()  # split-K counts the stream-K configurations join the choice with (module docstring)
CUDNN = -1  # the fp16 race's entry for torch's (cuDNN's) convolution
AGREEMENT = 1e-2  # the most an fp16 entry's output may differ from cuDNN's (relative to its largest value) to race
RACE_TIMING = "graph"  # how the race times its entries: "graph" or "eager" (models.race_timing; module docstring)
_loaded: set[str] = set()  # the environments whose stored choices this process has read


def serves(x: torch.Tensor, weight: torch.Tensor, stride=1, dilation=1, groups: int = 1) -> bool:
    """Whether the CUTLASS kernel runs this fp16 convolution."""
    return (cpp_ext.cutlass_conv is not None and x.is_cuda and x.dtype == torch.float16
            and weight.dtype == torch.float16 and x.dim() == 4 and weight.dim() == 4 and groups == 1
            and stride in (1, (1, 1)) and dilation in (1, (1, 1))
            and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0
            and x.is_contiguous(memory_format=torch.channels_last)
            and weight.is_contiguous(memory_format=torch.channels_last))


def serves_e4m3(channels_in: int, channels_out: int) -> bool:
    """Whether the kernel is built and takes e4m3 convolutions of these channel counts."""
    return cpp_ext.cutlass_conv is not None and channels_in % 16 == 0 and channels_out % 8 == 0


def _configs(kind: str) -> list[Entry]:
    """The entries of `kind` the choice takes: its configurations (the persistent ones with
    `PERSISTENT` only), then its stream-K ones once per count of `SPLITS`."""
    names = cpp_ext.cutlass_conv.configs()
    own = [i for i, name in enumerate(names)
           if name.startswith(kind + "_") and (PERSISTENT or not name.endswith("_persistent"))]
    split = [(i, s) for i in (cpp_ext.cutlass_conv.split_configs() if SPLITS else ()) if i in own for s in SPLITS]
    return [*own, *split]


def describe(entry: Entry) -> str:
    """An entry by name: "cudnn", a configuration's name, or that name with "_split" and the count."""
    if entry == CUDNN:
        return "cudnn"
    names = cpp_ext.cutlass_conv.configs()
    return f"{names[entry[0]]}_split{entry[1]}" if isinstance(entry, tuple) else names[entry]


def _entry_of(name: str, kind: str) -> Entry | None:
    """`describe`'s inverse among the entries the race of `kind` takes now (None: not one of them,
    e.g. a configuration this build lacks, or a split count `SPLITS` leaves out)."""
    if name == "cudnn":
        return CUDNN if kind == "f16" else None
    return next((entry for entry in _configs(kind) if describe(entry) == name), None)


def environment(device: torch.device) -> str:
    """What a choice depends on besides its shape: the GPU, torch, cuDNN, the configurations built
    and the race's settings (`conv_choices`' environment; other races stored beside the
    convolutions' take it too: `models.fused.upsampled_conv`)."""
    props = torch.cuda.get_device_properties(device)
    return "|".join([props.name, f"sm{props.major}{props.minor}", f"torch {torch.__version__}",
                     f"cudnn {torch.backends.cudnn.version()}", "cutlass " + ",".join(cpp_ext.cutlass_conv.configs()),
                     f"persistent {PERSISTENT}", "splits " + ",".join(map(str, SPLITS)), f"race {RACE_TIMING}"])


def _load_stored(environment: str) -> None:
    """The stored choices of `environment` into `_best` (once per environment and process; what
    `_best` holds already stays)."""
    if environment in _loaded:
        return
    _loaded.add(environment)
    for key, name in conv_choices.load(conv_choices.cache_path(), environment).items():
        entry = _entry_of(name, key[0])
        if entry is not None:
            _best.setdefault(key, entry)


def _split(entry: Entry) -> tuple[int, int]:
    """(configuration, splits) of a CUTLASS entry (splits 0: its own schedule)."""
    return entry if isinstance(entry, tuple) else (entry, 0)


def _fastest(kind: str, key: tuple, launch: Callable[..., torch.Tensor], operands: tuple[torch.Tensor, ...],
             others: tuple[Entry, ...] = ()) -> Entry:
    """The configuration of `kind` ("f16", "e4m3") or of `others` (entries such as `CUDNN`, which
    `launch(entry, *operands)` also takes; the first of them is the fallback) to run for `key` on
    the operands' device: stored from an earlier process (`conv_choices`), else timed once per
    shape the `RACE_TIMING` way (`models.race_timing`), outside any capture (inside one: the
    fallback, not remembered), and stored."""
    if (kind, *key) in _best:
        return _best[(kind, *key)]
    env = environment(operands[0].device)
    _load_stored(env)
    if (kind, *key) in _best:
        return _best[(kind, *key)]
    configs = [*others, *_configs(kind)]
    if torch.cuda.is_current_stream_capturing():
        return configs[0]
    timer = race_timing.graph_times if RACE_TIMING == "graph" else race_timing.eager_times
    accept = _agrees_with_cudnn(launch, operands, key) if CUDNN in others else None
    times = timer(configs, launch, operands, accept=accept)
    if not times:
        raise RuntimeError(f"no CUTLASS {kind} configuration implements {key}")
    _best[(kind, *key)] = best = min(times, key=times.__getitem__)
    conv_choices.save(conv_choices.cache_path(), env, {(kind, *key): describe(best)})
    return best


def _agrees_with_cudnn(launch: Callable[..., torch.Tensor], operands: tuple[torch.Tensor, ...],
                       key: tuple) -> race_timing.Accept | None:
    """The race's check of an entry's first output (`race_timing`'s `accept`): within `AGREEMENT` of
    cuDNN's output on the same operands, relative to its largest magnitude. Every entry computes
    the same convolution, so one that does not agree is wrong on this shape (a kernel's fault, not
    rounding: fp16 entries agree to a few 1e-3); it is left out of the race with a warning, where
    timing alone would keep a wrong kernel that happens to be fast. None (no check) where cuDNN
    itself refuses the operands: the race then leaves cuDNN out as it would any entry."""
    try:
        want = launch(CUDNN, *operands).float()
    except RuntimeError:
        return None
    scale = float(want.abs().max()) or 1.0

    def accept(entry: Entry, out: torch.Tensor) -> bool:
        if entry == CUDNN:
            return True
        error = float((out.float() - want).abs().max()) / scale
        if error <= AGREEMENT:  # a NaN is not
            return True
        warnings.warn(f"convolution race: {describe(entry)} differs from cuDNN by {error:.3g} of the output's "
                      f"largest value on x {list(key[0])}, weight {list(key[1])}; left out of the race", stacklevel=2)
        return False

    return accept


def _padding(padding: int | tuple[int, int]) -> tuple[int, int]:
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


def output_shape(x_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                 padding: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """(B, K, OH, OW): the output shape of a stride-1 convolution of x [B, C, H, W] by weight
    [K, C, kh, kw] with this padding."""
    ph, pw = _padding(padding)
    return (x_shape[0], weight_shape[0], x_shape[2] + 2 * ph - weight_shape[2] + 1,
            x_shape[3] + 2 * pw - weight_shape[3] + 1)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=padding)` (stride 1), on the CUTLASS kernel where it serves."""
    if not serves(x, weight):
        return F.conv2d(x, weight, bias, padding=padding)
    entry, launch = _f16_choice(x, weight, bias, _padding(padding))
    return launch(entry)


def conv2d_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    padding: int | tuple[int, int], residual: torch.Tensor) -> torch.Tensor | None:
    """`F.conv2d(x, weight, bias, padding=padding) + residual` with the residual (and the bias) added
    in the CUTLASS kernel's epilogue, rounded once: where the kernel serves this shape and its
    per-shape choice is a CUTLASS configuration (`conv2d`'s race); None where cuDNN runs it (the
    caller adds the residual its own way) or `residual` is not an fp16 channels-last map of the
    output's shape."""
    if not serves(x, weight) or not residual_fits(residual, x, weight, padding):
        return None
    entry, launch = _f16_choice(x, weight, bias, _padding(padding))
    return None if entry == CUDNN else launch(entry, residual)


def run_f16(entry: Entry, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pad: tuple[int, int],
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """The fp16 convolution (stride 1) the `entry` way: cuDNN's or a CUTLASS configuration's (the
    only ones that take a `residual`); `bias` fp16 or None."""
    if entry == CUDNN:
        return F.conv2d(x, weight, bias, padding=pad)
    return cpp_ext.cutlass_conv.conv2d(x, weight, bias, *pad, *_split(entry), residual=residual)


def _f16_choice(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                pad: tuple[int, int]) -> tuple[Entry, Callable[..., torch.Tensor]]:
    """The fp16 race's entry for this convolution (cuDNN's among them), and the launch of an
    entry, `launch(entry, residual=None)` (a residual: CUTLASS entries only)."""
    bias = None if bias is None else bias.to(torch.float16).contiguous()

    def run(entry: Entry, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return run_f16(entry, x, weight, bias, pad, residual)

    def launch(entry: Entry, residual: torch.Tensor | None = None) -> torch.Tensor:
        return run(entry, x, weight, residual)

    key = (tuple(x.shape), tuple(weight.shape), pad)
    return _fastest("f16", key, run, (x, weight), others=(CUDNN,)), launch


def conv2d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   padding: int | tuple[int, int]) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=padding)` (stride 1) for channels-last `x` and `weight` as
    one matrix product: every output pixel's neighbourhood gathered into a row, (kh, kw, C) in the
    order of the channels-last weight's memory, zeros where it reaches into the padding, times the
    weight viewed as [K, kh·kw·C], the bias added in the product's epilogue (`torch.addmm`);
    channels-last out."""
    rows, (b, oh, ow) = neighbourhood_rows(x, weight.shape[2:], padding)
    k = weight.shape[0]
    taps = weight.permute(0, 2, 3, 1).reshape(k, -1)  # a view where the weight is channels-last
    out = rows @ taps.t() if bias is None else torch.addmm(bias, rows, taps.t())
    return out.view(b, oh, ow, k).permute(0, 3, 1, 2)


def neighbourhood_rows(x: torch.Tensor, kernel: tuple[int, int], padding: int | tuple[int, int]
                       ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Every output pixel's kh × kw neighbourhood of `x` [B, C, H, W] (stride 1) as a row, (kh, kw,
    C) order, zeros where it reaches into the padding: [B·OH·OW, kh·kw·C] (a copy), and (B, OH, OW)."""
    ph, pw = _padding(padding)
    b, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [B, H + 2ph, W + 2pw, C], contiguous
    sb, sh, sw, sc = padded.stride()
    rows = padded.as_strided((b, oh, ow, kh, kw, c), (sb, sh, sw, sh, sw, sc)).reshape(b * oh * ow, kh * kw * c)
    return rows, (b, oh, ow)


def conv2d_e4m3(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                padding: int | tuple[int, int] = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """scale[k] · (x ⊛ weight)[k] + bias[k] (+ residual) for e4m3 channels-last `x` and `weight`
    (stride 1), fp32 accumulation, fp16 channels-last out; `scale` [K] fp32 (the input's scale
    times each channel's weight scale); `residual`, where given, added in the epilogue (see
    `residual_fits`). The caller checks `serves_e4m3` first."""
    pad = _padding(padding)
    bias = None if bias is None else bias.to(torch.float16).contiguous()
    scale = scale.to(torch.float32).contiguous()
    kernel = cpp_ext.cutlass_conv

    def run(entry: Entry, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return kernel.conv2d_e4m3(x, weight, scale, bias, *pad, *_split(entry), residual=residual)

    return run(_fastest("e4m3", (tuple(x.shape), tuple(weight.shape), pad), run, (x, weight)), x, weight, residual)


def residual_fits(t: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int | tuple[int, int]) -> bool:
    """Whether `t` can be the kernel's residual (`conv2d_residual`, `conv2d_e4m3`): fp16,
    channels-last, 16-byte aligned, of the convolution's output shape (stride 1)."""
    out = output_shape(x.shape, weight.shape, padding)
    return (t.dtype == torch.float16 and t.device == x.device and tuple(t.shape) == out and t.data_ptr() % 16 == 0
            and t.is_contiguous(memory_format=torch.channels_last))
