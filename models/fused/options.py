"""`FusedOptions`: the fused path's individual fusions, each on by default but those not yet measured.

Each switch turns one fusion off so that a test can compare it with the path without it and a
benchmark can measure what it buys; the functions are the same either way."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FusedOptions:
    """Which fusions the fused path uses.

    :param join_stats: residual joins also compute the statistics of the group norm that reads
        their output next (`cpp_ext.kernels.bias_residual_stats`), where that norm would run three
        passes.
    :param defer_bias: an output block whose result goes on to the next output block's
        concatenation accumulates its skip convolution into its last convolution's output (one
        GEMM) and leaves both biases to that concatenation.
    :param input_bias_in_conv: the UNet's first convolution adds its bias inside cuDNN's GEMM (an
        extra input channel of ones).
    :param time_table: the prior's step reads its time token from a table of every training
        timestep's embedding instead of running the sinusoid and the time MLP.
    :param unet_time_table: the UNets read their time embedding from a table of every training
        timestep's (`unet_forward.time_table`; integer timesteps) instead of running the sinusoid
        and the time MLP each forward.
    :param loop_projections: a sampling loop of a UNet makes every step's ResBlock projections of
        the time embedding in one GEMM before its first step (`unet_forward.loop_projections`),
        reading their stacked weights once per loop instead of once per step.
    :param staged_weights: the prior step's linear layers stream their weights through shared
        memory where `linear_plan.staged_plan` allows (Hopper).
    :param cutlass_convs: the residual blocks' 3×3 convolutions through `models.implicit_conv`'s
        per-shape choice between CUTLASS's Hopper implicit GEMM and cuDNN, where the CUTLASS
        kernel is built and serves (elsewhere cuDNN's, as without it); off: cuDNN's always
        (`benchmarks/latency.py --cudnn-convs` times both).
    :param norm_writes_e4m3: a group norm whose output only an FP8 3×3 convolution reads (with a
        calibrated input scale, on CUTLASS) writes it in e4m3 at that scale, instead of fp16 that
        the convolution then quantises in a pass of its own (`norms.group_norm_e4m3`). On: the
        input crosses memory once as one byte instead of three times (docs/fp8.md;
        `benchmarks/latency.py --fp8-norm-fp16` times it off).
    :param residual_in_conv: a residual block with an identity skip adds its input and its last
        convolution's bias in that convolution's epilogue (CUTLASS, where the shape's choice is a
        CUTLASS configuration, fp16 or FP8) instead of a join pass; the next norm then computes its
        own statistics. Off: measured no faster than the join pass, which also hands the next norm
        its statistics (docs/fp8.md; `benchmarks/latency.py --residual-in-conv`).
    :param fold_upsampling: an up block's first convolution, a 3×3 convolution of its norm's output
        upsampled 2x, runs as the equivalent 2×2 convolution of the map before upsampling with its
        four phases' kernels folded (`models.fused.upsampled_conv`: 4/9 of the products, then the
        phases interleaved in one copy) instead of on the norm's upsampled output. fp16
        convolutions only (an FP8 one runs as before). Off: the convolution of the upsampled map
        (docs/kernels.md; `benchmarks/latency.py --no-fold-upsampling` times it,
        `benchmarks/upsampled_conv.py` the convolutions alone).
    :param interleave_in_norm: with `fold_upsampling`, the up block's second norm reads the folded
        product where it holds each pixel of the upsampled map (`cpp_ext.kernels.group_norm_phased`,
        where that norm runs three passes and the kernel serves) instead of a copy `interleave`
        writes first; the norm's output is the same map. Elsewhere the copy, as without it. Off:
        measured no faster than the copy, within the run's spread (docs/kernels.md;
        `benchmarks/latency.py --interleave-in-norm` times it).
    :param fold_race: with `fold_upsampling`, a shape's up convolution is folded only where a race of
        both ways on that shape finds the fold faster (`upsampled_conv.fold_pays`, kept beside the
        convolutions' choices); off: wherever the fold serves. Off: on Karlo's shapes it measured
        within the run's spread of the fold everywhere (docs/kernels.md; `benchmarks/latency.py
        --fold-race`); it is for models whose shapes the fold does not pay at.
    :param keys_around_images: the attention blocks of a one- or two-sample forward with cached
        context keys (the decoder's guided pair) read them from around the image rows of the QKV
        projection's own buffer, laid out once per loop (`models.fused.keys_around`), instead of
        `cpp_ext.kernels.pack_attention_kv` copying the image and context keys into a pack every
        step. The same attention up to the order in which flash attention meets the keys. On:
        the pack's launch gone from every decoder step of one image (docs/kernels.md;
        `benchmarks/latency.py --no-keys-around-images` times it off). Larger batches keep the pack.
    :param cudnn_attention: the attention blocks with a text context attend over the same packed keys by
        cuDNN's attention op with per-sample key counts instead of flash attention's variable-length form,
        where this torch's op takes the counts (`seqused_k`; else flash's runs); the keys around the image
        rows always take flash's (cuDNN's op over that layout failed under graph capture on torch 2.11:
        docs/kernels.md). Off: not yet measured in the pipeline (the GPU machine's torch has no such op);
        SDPA's cuDNN backend with the dropped tokens masked instead measured 1.6× slower than flash's form
        (docs/kernels.md; `benchmarks/attention_backends.py` times the kernels alone, `benchmarks/latency.py
        --cudnn-attention` the pipeline).
    """

    join_stats: bool = True
    defer_bias: bool = True
    input_bias_in_conv: bool = True
    time_table: bool = True
    unet_time_table: bool = True
    loop_projections: bool = True
    staged_weights: bool = True
    cutlass_convs: bool = True
    norm_writes_e4m3: bool = True
    residual_in_conv: bool = False
    cudnn_attention: bool = False
    fold_upsampling: bool = True
    interleave_in_norm: bool = False
    fold_race: bool = False
    keys_around_images: bool = True


DEFAULT = FusedOptions()
