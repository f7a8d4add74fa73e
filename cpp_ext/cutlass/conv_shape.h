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

}  // namespace unclip_cutlass
