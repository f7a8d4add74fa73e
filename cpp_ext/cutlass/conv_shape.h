// What the CUTLASS convolution's host code shares with its bindings (no CUTLASS headers: the
// bindings compile as plain C++).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

namespace unclip_cutlass {

// The shape of one call: NHWC activation, KRSC weight, symmetric padding, stride and dilation 1.
struct ConvShape {
  int n, h, w, c, k, r, s, pad_h, pad_w;
};

// One instantiated configuration: its name, its operand type (e4m3 or fp16), its launch (0, or
// an error code: see Launches::run in conv_common.cuh; `scale`: one float per output channel, or null;
// `residual`: an fp16 map of the output's shape added in the epilogue, or null; `overlap`:
// programmatic dependent launch where the kernel takes it), the
// workspace it needs, and whether it takes a split count (`splits` > 0: each output tile's K loop
// cut into that many parts, one CTA each, the stream-K scheduler's split-K mode; 0: the
// configuration's own schedule). config_N.cu defines entry N.
struct Config {
  const char* name;
  bool e4m3;
  int (*run)(ConvShape const&, void const* x, void const* weight, float const* scale, void const* bias,
             void const* residual, void* out, void* workspace, int sm_count, int splits, bool overlap,
             cudaStream_t stream);
  size_t (*workspace_bytes)(ConvShape const&, int sm_count, int splits);
  bool takes_splits = false;
};

constexpr int kConfigs = 14;
Config config_0();
Config config_1();
Config config_2();
Config config_3();
Config config_4();
Config config_5();
Config config_6();
Config config_7();
Config config_8();
Config config_9();
Config config_10();
Config config_11();
Config config_12();
Config config_13();

// The split-K product of conv_split_gemm.cu: the convolution as a GEMM of `rows` (N·P·Q output
// pixels) × `cols` (K output channels) × `k_total` (R·S·C), cut into `splits` parts of `k_part`
// each, every part a batch of one batched GEMM into float32 parts, summed in a pass of their own.
struct SplitGemmShape {
  int out_h, out_w, rows, cols, k_total, splits, k_part;
};
SplitGemmShape split_gemm_shape(ConvShape const& p, int splits);
// the batched GEMM's own workspace (the gathered rows and the float32 parts are the caller's)
size_t split_gemm_workspace_bytes(ConvShape const& p, int splits, int sm_count);
// out = conv(x, weight) + bias (+ residual): gather into `rows` [rows, k_total] fp16, the GEMM into
// `parts` [splits, rows, cols] fp32, their ordered sum into `out`; 0 on success, else 1000+/2000+/
// 3000+ as Launches::run (the GEMM), 4000/4001 when the gather or the sum failed to launch.
int conv_split_gemm(ConvShape const& p, int splits, void const* x, void const* weight, void const* bias,
                    void const* residual, void* out, void* rows, float* parts, void* workspace, int sm_count,
                    cudaStream_t stream);

}  // namespace unclip_cutlass
