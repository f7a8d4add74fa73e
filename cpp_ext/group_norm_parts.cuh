// What the group norm's passes share (group_norm.cu runs them; group_norm_stats.cu,
// group_norm_normalize.cu and group_norm_one_pass.cu hold their kernels): the tensor geometry
// (Shape), what is added before the norm (Add), the FiLM rows (Film), the skip concatenation the
// statistics pass writes (Concat), the block-wide sum, and each pass's launcher.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "elementwise.cuh"
#include "half_tensors.h"
#include "pdl.cuh"
#include "wide_stats.cuh"

namespace unclip_rt::group_norm_parts {

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;
using unclip_rt::wide_geometry_fits;

constexpr int kThreads = 256;  // the statistics and normalising passes' blocks
// Groups of at most this many elements take the one-launch kernel (auto mode).
constexpr int64_t kOnePassMaxElements = 16384;  // measured: one launch wins up to 16x16 maps of 64 channels per group
// (the decoder's 1920 channels at 16x16 included; docs/kernels.md)

// Whether groups of `cg` channels over `hw` pixels take the one-launch kernel in auto mode.
inline bool one_pass_by_size(int64_t cg, int64_t hw) { return cg * hw <= kOnePassMaxElements; }

struct Shape {
  int64_t batch, channels, hw;  // x is [batch, channels, hw] (NCHW) or [batch, hw, channels] (NHWC)
  int groups, chunks;
  int64_t chunk_len;  // NCHW: elements of a group row per chunk; NHWC: pixels per chunk
  int groups_per_block;  // NHWC pass 1: groups whose channels one block covers (blockIdx.z picks which)
  int64_t width;  // NHWC with `up`: the input's width (hw = height * width)
  bool up;        // NHWC only: write the output nearest-upsampled 2x (the UNets' up ResBlocks)
  bool down;      // NHWC only: write the output 2x2 average-pooled (the UNets' down ResBlocks)
  // NHWC only: x is an up block's folded product (models/fused/upsampled_conv.py) before its
  // interleave, [batch, H + 1, W + 1, 4 * channels], and the map normalised is the upsampled one
  // it stands for, [batch, hw = 2H * 2W, channels] of width `width` = 2W (pixel_offset)
  bool phased = false;
};

// Where pixel p of sample b starts in x: [batch, hw, channels] channels-last, or with s.phased the
// folded product, whose phase (a, c) channels [(2a + c) * channels, +channels) at pixel
// (i + a, j + c) hold the upsampled map's pixel (2i + a, 2j + c) — the interleave models/fused/
// upsampled_conv.py's `interleave` makes, read in place so that copy is never written.
__device__ __forceinline__ int64_t pixel_offset(const Shape& s, int64_t b, int64_t p) {
  if (!s.phased) return (b * s.hw + p) * s.channels;
  const int out_w = static_cast<int>(s.width), py = static_cast<int>(p) / out_w;  // hw < 2^31
  const int px = static_cast<int>(p) - py * out_w;
  const int a = py & 1, c = px & 1, fw = out_w / 2 + 1;
  const int64_t folded_hw = static_cast<int64_t>(s.hw / s.width / 2 + 1) * fw;
  return ((b * folded_hw + static_cast<int64_t>((py >> 1) + a) * fw + (px >> 1) + c) * 4 + 2 * a + c) * s.channels;
}

// Store the output pack of the input pack at `in_index` (of sample b): at the same place, or
// (NHWC with s.up) at the four output pixels it covers after a nearest 2x upsampling.
template <typename T, int VEC, bool NHWC>
__device__ __forceinline__ void store_pack(T* y, const Pack<T, VEC>& out, int64_t in_index, int64_t b, const Shape& s) {
  if (!NHWC || !s.up) {
    *reinterpret_cast<Pack<T, VEC>*>(y + in_index) = out;
    return;
  }
  const int64_t within = in_index - b * s.hw * s.channels;
  const int64_t pixel = within / s.channels, c = within % s.channels;
  const int64_t py = pixel / s.width, px = pixel % s.width, out_w = 2 * s.width;
  T* base = y + ((b * 2 * (s.hw / s.width) + 2 * py) * out_w + 2 * px) * s.channels + c;
  *reinterpret_cast<Pack<T, VEC>*>(base) = out;
  *reinterpret_cast<Pack<T, VEC>*>(base + s.channels) = out;
  *reinterpret_cast<Pack<T, VEC>*>(base + out_w * s.channels) = out;
  *reinterpret_cast<Pack<T, VEC>*>(base + out_w * s.channels + s.channels) = out;
}

// What is added to x before the norm: rows[b * ld + c] (ld 0: the same row for every sample)
// plus bias[c]; either may be absent. The ResBlocks pass the time embedding as rows and the
// preceding convolution's bias as bias, so that convolution runs without its own bias pass.
template <typename T>
struct Add {
  const T* rows;
  int64_t ld;
  const T* bias;
  __device__ __forceinline__ float at(int64_t b, int64_t c) const {
    return (rows != nullptr ? to_float(rows[b * ld + c]) : 0.f) + (bias != nullptr ? to_float(bias[c]) : 0.f);
  }
  __device__ __forceinline__ bool any() const { return rows != nullptr || bias != nullptr; }
};

// FiLM scale/shift rows: y * (1 + scale[b * ld + c]) + shift[b * ld + c] (absent: scale null).
template <typename T>
struct Film {
  const T* scale;
  const T* shift;
  int64_t ld;
};

// Block-wide sum of two floats (fixed reduction order: deterministic).
__device__ __forceinline__ float2 block_sum(float2 v, float2* smem) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v.x += __shfl_down_sync(0xffffffff, v.x, offset);
    v.y += __shfl_down_sync(0xffffffff, v.y, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float2 total = make_float2(0.f, 0.f);
  if (threadIdx.x == 0) {
    for (int w = 0; w < blockDim.x / 32; ++w) { total.x += smem[w].x; total.y += smem[w].y; }
  }
  return total;  // valid in thread 0
}

// The UNets' skip concatenation done by the statistics pass (concat_channels): x holds the first
// `first` channels [B, hw, first], `second` the rest [B, hw, channels - first]; the pass reads
// both and writes their concatenation to `out` [B, hw, channels] as it sums it. Inactive (plain
// pass 1 over x): second == nullptr. `first_bias` (and `first_bias2`), where given, are added to
// the first part's channels as they are copied: the biases of the convolutions that produced it,
// left out by the block before (its residual join accumulated into the convolution's output).
template <typename T>
struct Concat {
  const T* second;
  int64_t first;
  T* out;
  const T* first_bias = nullptr;
  const T* first_bias2 = nullptr;
  // where channels [c, c + 8) of pixel p of sample b are read from (c a multiple of 8, first too)
  __device__ __forceinline__ const T* at(const T* x, int64_t b, int64_t p, int64_t c, const Shape& s) const {
    if (second == nullptr) return x + pixel_offset(s, b, p) + c;
    return c < first ? x + (b * s.hw + p) * first + c
                     : second + (b * s.hw + p) * (s.channels - first) + (c - first);
  }
  // channels [c, c + 8) of pixel p of sample b as the concatenation holds them (biases added)
  __device__ __forceinline__ Pack<T, 8> load(const T* x, int64_t b, int64_t p, int64_t c, const Shape& s) const {
    auto v = *reinterpret_cast<const Pack<T, 8>*>(at(x, b, p, c, s));
    if (first_bias != nullptr && second != nullptr && c < first) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float total = to_float(first_bias[c + k]);  // the biases' sum first: as the torch fallback
        if (first_bias2 != nullptr) total += to_float(first_bias2[c + k]);
        v.v[k] = from_float<T>(to_float(v.v[k]) + total);
      }
    }
    return v;
  }
};

// The widest of 8, 4 and 2 elements (16 bytes at most) that divides `divisor_of` and at which `a`
// and `b` are aligned, else 1: the vector width of a pass's loads and stores.
inline int pick_vec(int64_t divisor_of, const void* a, const void* b, int elem) {
  for (int v : {8, 4, 2}) {
    if (v * elem <= 16 && divisor_of % v == 0 && reinterpret_cast<uintptr_t>(a) % (v * elem) == 0 &&
        reinterpret_cast<uintptr_t>(b) % (v * elem) == 0)
      return v;
  }
  return 1;
}

// The number of elements of a one-pass block's group, at most: the one-pass kernels' shared memory.
constexpr int kOnePassMaxGroupChannels = 256;
constexpr int kOnePassThreads = 512;

// Pass 1 (group_norm_stats.cu): x's statistics, [batch * groups, chunks, 2] float32 partial sums,
// its geometry written to s. With `concat` it reads its two sources (pass1_x, concat.second) and
// writes x: the wide pass.
template <typename T>
at::Tensor statistics_pass(const at::Tensor& x, Add<T> add, Shape& s, int64_t cg, bool nhwc, int elem,
                           cudaStream_t stream, const T* pass1_x, Concat<T> concat);

// Pass 2 (group_norm_stats.cu): the partial sums folded into each (sample, channel)'s
// coefficients of y = x * A + B, written to coef [batch * channels, 2] float32.
template <typename T>
void coefficients_pass(const at::Tensor& x, Add<T> add, const at::Tensor& partial, const at::Tensor& weight,
                       const at::Tensor& bias, Film<T> film, at::Tensor& coef, const Shape& s, double eps, bool nhwc,
                       cudaStream_t stream);

// Pass 3 (group_norm_normalize.cu): y = x * A + B (+ SiLU), resized as s says.
template <typename T>
void normalize_pass(const at::Tensor& x, const at::Tensor& coef, at::Tensor& y, Shape& s, bool silu, bool nhwc,
                    int elem, cudaStream_t stream);

// The one-launch norm for small groups (group_norm_one_pass.cu): statistics and normalising in
// one block per (sample, group).
template <typename T>
void one_pass_norm(const at::Tensor& x, Add<T> add, const at::Tensor& weight, const at::Tensor& bias, Film<T> film,
                   at::Tensor& y, const Shape& s, double eps, bool silu, bool nhwc, int elem, cudaStream_t stream);

}  // namespace unclip_rt::group_norm_parts
