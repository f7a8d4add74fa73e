// Group normalisation (+ optional per-sample scale/shift, + optional SiLU) for NCHW and NHWC
// (channels-last) activations in fp16, bf16 or fp32, with float32 statistics.
//
// Why not at::native::group_norm: its statistics kernel gives one thread block to each
// (sample, group) row, so at batch 1 with 32 groups it runs 32 blocks on a 132-SM GPU, and at
// the super-res UNet's 256x256 maps that kernel dominated the forward. Here every
// row is split into chunks (pass 1: shifted sum / sum of squares per chunk, written to a
// buffer), a tiny pass folds the chunks in a fixed order (deterministic: no float atomics), and
// pass 3 normalises with vectorised loads, applying the affine, the optional FiLM scale/shift
// (the decoder's scale-shift ResBlocks) and SiLU in the same pass. NHWC is handled natively, so
// cuDNN's channels-last convolutions need no layout conversions around the norms.
//
// Numerics: sums are shifted by one sample of each group (close to the mean), so the variance
// does not suffer the cancellation of a plain E[x^2] - E[x]^2.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
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

namespace {

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;
using unclip_rt::wide_geometry_fits;

constexpr int kThreads = 256;
constexpr int64_t kNchwTargetBlocks = 528;  // NCHW statistics pass: ~4 blocks per SM of a 132-SM GPU (NHWC: wide_stats.cuh)
// Groups of at most this many elements take the one-launch kernel (auto mode).
constexpr int64_t kOnePassMaxElements = 16384;  // measured: one launch wins up to 16x16 maps of 64 channels per group
// (the decoder's 1920 channels at 16x16 included; figures in docs/speed.md)

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
};

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

// Pass 1, NCHW: grid (chunks, batch*groups); each block sums one chunk of one contiguous group row.
template <typename T, int VEC>
__global__ void partial_nchw(const T* __restrict__ x, Add<T> add, float2* __restrict__ partial, Shape s) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ float2 smem[kThreads / 32];
  const int64_t row = blockIdx.y;
  const int64_t cg = s.channels / s.groups;
  const int64_t row_len = cg * s.hw;
  const T* base = x + row * row_len;
  // row = b * groups + g covers channels g*cg .. g*cg+cg-1.
  const int64_t b = row / s.groups, c_first = (row % s.groups) * cg;
  const float pivot = to_float(base[0]) + add.at(b, c_first);
  const int64_t begin = blockIdx.x * s.chunk_len;
  const int64_t end = min(row_len, begin + s.chunk_len);
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end; i += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto p = *reinterpret_cast<const Pack<T, VEC>*>(base + i);
    const float a = add.any() ? add.at(b, c_first + i / s.hw) : 0.f;  // VEC | hw: one channel
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = to_float(p.v[k]) + a - pivot;
      acc.x += d;
      acc.y += d * d;
    }
  }
  const float2 total = block_sum(acc, smem);
  if (threadIdx.x == 0) partial[row * s.chunks + blockIdx.x] = total;
}

// Pass 1, NHWC: grid (chunks, batch, group blocks); block (lanes, rows): lane l reads channels
// [l*VEC, l*VEC+VEC) (all in one group) of pixels p = rows-strided through the chunk; blockIdx.z
// selects which `groups_per_block` groups the block's lanes cover.
template <typename T, int VEC>
__global__ void partial_nhwc(const T* __restrict__ x, Add<T> add, float2* __restrict__ partial, Shape s) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  extern __shared__ float2 sums[];  // [rows][lanes]
  const int lanes = blockDim.x, rows = blockDim.y;
  const int lane = threadIdx.x, r = threadIdx.y;
  const int64_t b = blockIdx.y;
  const int cg = static_cast<int>(s.channels / s.groups);
  const int first_group = blockIdx.z * s.groups_per_block;
  const int c0 = first_group * cg + lane * VEC;
  const bool valid = c0 < s.channels;
  const int g = valid ? c0 / cg : first_group;
  const T* sample = x + b * s.hw * s.channels;
  const float pivot = to_float(sample[g * cg]) + add.at(b, g * cg);
  float a[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) a[k] = valid ? add.at(b, c0 + k) : 0.f;
  const int64_t begin = blockIdx.x * s.chunk_len;
  const int64_t end = min(s.hw, begin + s.chunk_len);
  float2 acc = make_float2(0.f, 0.f);
  if (valid) {
    for (int64_t p = begin + r; p < end; p += rows) {
      const auto v = *reinterpret_cast<const Pack<T, VEC>*>(sample + p * s.channels + c0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = to_float(v.v[k]) + a[k] - pivot;
        acc.x += d;
        acc.y += d * d;
      }
    }
  }
  sums[r * lanes + lane] = acc;
  __syncthreads();
  // Fold rows, then the lanes of each group, in a fixed order.
  if (r == 0) {
    for (int rr = 1; rr < rows; ++rr) {
      acc.x += sums[rr * lanes + lane].x;
      acc.y += sums[rr * lanes + lane].y;
    }
    sums[lane] = acc;
  }
  __syncthreads();
  const int lanes_per_group = cg / VEC;
  const int flat = r * lanes + lane;
  const int groups_here = min(s.groups_per_block, s.groups - first_group);
  if (flat < groups_here) {
    float2 total = make_float2(0.f, 0.f);
    for (int l = flat * lanes_per_group; l < (flat + 1) * lanes_per_group; ++l) {
      total.x += sums[l].x;
      total.y += sums[l].y;
    }
    partial[(b * s.groups + first_group + flat) * s.chunks + blockIdx.x] = total;
  }
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
    if (second == nullptr) return x + (b * s.hw + p) * s.channels + c;
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

// Pass 1, NHWC, when a group's channel count is not a multiple of 8 (Karlo's 320 channels: 10 per
// group), or when it also concatenates (Concat): partial_nhwc's lanes would load 4 bytes each.
// Here every lane loads 16 bytes (8 channels) of a pixel, which span at most two groups (channels
// per group >= 8), keeps one shifted sum per group, and the block folds them per group in a fixed
// order (wide_stats.cuh, which the residual join's statistics share). grid (chunks, batch); block
// (channels / 8 lanes, rows).
template <typename T>
__global__ void partial_nhwc_wide(const T* __restrict__ x, Add<T> add, float2* __restrict__ partial, Shape s,
                                  Concat<T> concat) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  extern __shared__ float2 sums[];  // [rows][lanes][2]: the lane's first group, then its second
  const int rows = blockDim.y, r = threadIdx.y;
  const int64_t b = blockIdx.y;
  const int cg = static_cast<int>(s.channels / s.groups);
  const int c0 = threadIdx.x * 8, g_lo = c0 / cg, g_hi = (c0 + 7) / cg;
  const auto first_of = [&](int g) {  // pixel 0's value of group g's first channel, as finalize reads it
    const int c = g * cg;
    return to_float(concat.load(x, b, 0, c / 8 * 8, s).v[c % 8]) + add.at(b, c);
  };
  float added[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) added[k] = add.at(b, c0 + k);
  unclip_rt::WideSums acc(c0, cg, first_of(g_lo), first_of(g_hi), added);
  const int64_t begin = blockIdx.x * s.chunk_len;
  const int64_t end = min(s.hw, begin + s.chunk_len);
  for (int64_t p = begin + r; p < end; p += rows) {
    const auto v = concat.load(x, b, p, c0, s);
    if (concat.second != nullptr) *reinterpret_cast<Pack<T, 8>*>(concat.out + (b * s.hw + p) * s.channels + c0) = v;
    acc.accumulate(v);
  }
  acc.fold(sums, partial, b, s.groups, cg, s.chunks, blockIdx.x);
}

// Pass 2: fold the chunks of each (sample, group) into mean and 1/std; one warp per row, each
// lane summing a fixed stride of chunks, then a fixed shuffle tree (deterministic). The warp
// then writes, for each channel c of the group, the coefficients of pass 3's y = x * A + B
// (before SiLU): A = rstd * w[c] * (1 + scale), B = ((add[c] - mean) * rstd * w[c] + bias[c]) *
// (1 + scale) + shift — so pass 3 spends two loads and one FMA per element on the affine, the
// added embedding/bias and the FiLM scale/shift.
template <typename T, bool NHWC>
__global__ void finalize(const T* __restrict__ x, Add<T> add, const float2* __restrict__ partial,
                         const T* __restrict__ weight, const T* __restrict__ bias, Film<T> film,
                         float2* __restrict__ coef, Shape s, float eps) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= s.batch * s.groups) return;  // uniform across the warp
  float sum = 0.f, sq = 0.f;
  for (int c = lane; c < s.chunks; c += 32) {
    sum += partial[row * s.chunks + c].x;
    sq += partial[row * s.chunks + c].y;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffff, sum, offset);
    sq += __shfl_xor_sync(0xffffffff, sq, offset);
  }
  const int64_t b = row / s.groups, g = row % s.groups;
  const int64_t cg = s.channels / s.groups;
  float pivot = NHWC ? to_float(x[b * s.hw * s.channels + g * cg]) : to_float(x[row * cg * s.hw]);
  pivot += add.at(b, g * cg);
  const float n = static_cast<float>(cg * s.hw);
  const float mean_shift = sum / n;
  const float var = fmaxf(sq / n - mean_shift * mean_shift, 0.f);
  const float mean = pivot + mean_shift, rstd = rsqrtf(var + eps);
  for (int64_t c = g * cg + lane; c < (g + 1) * cg; c += 32) {
    const float a = rstd * to_float(weight[c]);
    float scale = 1.f, shift = 0.f;
    if (film.scale != nullptr) {
      scale += to_float(film.scale[b * film.ld + c]);
      shift = to_float(film.shift[b * film.ld + c]);
    }
    coef[b * s.channels + c] = make_float2(a * scale, ((add.at(b, c) - mean) * a + to_float(bias[c])) * scale + shift);
  }
}

// The (A, B) pairs of a pack's channels: NHWC packs hold VEC consecutive channels, read as
// 16-byte pairs of pairs (the pack's first channel is a multiple of VEC, so they are aligned);
// an NCHW pack is one channel.
template <int VEC, bool NHWC>
__device__ __forceinline__ void load_coefficients(const float2* __restrict__ ab, float2 (&cf)[VEC]) {
  if constexpr (NHWC && VEC % 2 == 0) {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) {
      const float4 q = reinterpret_cast<const float4*>(ab)[k];
      cf[2 * k] = make_float2(q.x, q.y);
      cf[2 * k + 1] = make_float2(q.z, q.w);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) cf[k] = NHWC ? ab[k] : ab[0];
  }
}

// Pass 3: y = x * A + B with pass 2's per-(sample, channel) coefficients, optional SiLU.
template <typename T, int VEC, bool NHWC>
__global__ void normalize(const T* __restrict__ x, const float2* __restrict__ coef, T* __restrict__ y, Shape s,
                          bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t n = s.batch * s.channels * s.hw;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const int64_t per_sample = s.channels * s.hw;
  const int64_t b = i / per_sample;
  const int64_t within = i - b * per_sample;
  // NCHW: VEC divides hw, so a pack is one channel; NHWC: VEC consecutive channels.
  const float2* ab = coef + b * s.channels + (NHWC ? within % s.channels : within / s.hw);
  const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
  float2 cf[VEC];
  load_coefficients<VEC, NHWC>(ab, cf);
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float2 c = cf[k];
    float v = fmaf(to_float(in.v[k]), c.x, c.y);
    if (silu) v = unclip_rt::silu_of(v);
    out.v[k] = from_float<T>(v);
  }
  store_pack<T, VEC, NHWC>(y, out, i, b, s);
}

// use(p, load(p)) for the pixels p = first, first + step, ... below end, in that order, with the
// loads of kInFlight pixels issued before the first of them is used.
template <int kInFlight, typename Load, typename Use>
__device__ __forceinline__ void strided_pixels(int64_t first, int64_t end, int64_t step, Load load, Use use) {
  int64_t p = first;
  for (; p + (kInFlight - 1) * step < end; p += kInFlight * step) {
    decltype(load(p)) v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = load(p + u * step);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) use(p + u * step, v[u]);
  }
  for (; p < end; p += step) use(p, load(p));
}

// Pass 3, NHWC, 16-byte packs of VEC channels (channels a multiple of VEC): grid (chunks, batch),
// block (channels / VEC lanes, rows). A thread holds its channels' coefficients for its sample in
// registers and walks the pixels begin + r, begin + r + rows, ... of its chunk, four loads in
// flight (strided_pixels). `normalize` (one pack per thread) spent 64-bit index divisions and
// four coefficient loads per pack: compute-bound well below the DRAM bandwidth.
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) normalize_nhwc(const T* __restrict__ x, const float2* __restrict__ coef,
                                                       T* __restrict__ y, Shape s, bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t b = blockIdx.y;
  const int c0 = threadIdx.x * VEC;
  float2 cf[VEC];
  load_coefficients<VEC, true>(coef + b * s.channels + c0, cf);
  const int64_t begin = blockIdx.x * s.chunk_len, end = min(s.hw, begin + s.chunk_len);
  const T* in_sample = x + b * s.hw * s.channels + c0;
  const int width = static_cast<int>(s.width), height = static_cast<int>(s.hw / s.width);  // of x
  strided_pixels<4>(
      begin + threadIdx.y, end, blockDim.y,
      [&](int64_t p) { return *reinterpret_cast<const Pack<T, VEC>*>(in_sample + p * s.channels); },
      [&](int64_t p, const Pack<T, VEC>& in) {
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float v = fmaf(to_float(in.v[k]), cf[k].x, cf[k].y);
          if (silu) v = unclip_rt::silu_of(v);
          out.v[k] = from_float<T>(v);
        }
        if (!s.up) {
          *reinterpret_cast<Pack<T, VEC>*>(y + (b * s.hw + p) * s.channels + c0) = out;
          return;
        }
        const int py = static_cast<int>(p) / width, px = static_cast<int>(p) - py * width;  // hw < 2^31
        T* o = y + ((b * 2 * height + 2 * py) * 2 * width + 2 * px) * s.channels + c0;  // 2x2 nearest
        const int64_t down_row = 2 * width * s.channels;
        *reinterpret_cast<Pack<T, VEC>*>(o) = out;
        *reinterpret_cast<Pack<T, VEC>*>(o + s.channels) = out;
        *reinterpret_cast<Pack<T, VEC>*>(o + down_row) = out;
        *reinterpret_cast<Pack<T, VEC>*>(o + down_row + s.channels) = out;
      });
}

// Pass 3 of a down ResBlock's norm in normalize_nhwc's geometry over the output's pixels: a
// thread holds its channels' coefficients and makes the 2x2 average of the normalised (and
// SiLU'd) input packs of each output pixel of its chunk, four loads in flight (faster than
// normalize_down at every down norm's shape; docs/speed.md).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) normalize_down_nhwc(const T* __restrict__ x, const float2* __restrict__ coef,
                                                            T* __restrict__ y, Shape s, bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t b = blockIdx.y;
  const int c0 = threadIdx.x * VEC;
  float2 cf[VEC];
  load_coefficients<VEC, true>(coef + b * s.channels + c0, cf);
  const int width = static_cast<int>(s.width), out_w = width / 2;
  const int out_hw = static_cast<int>(s.hw / s.width / 2) * out_w;
  const T* in_sample = x + b * s.hw * s.channels + c0;
  T* out_sample = y + b * out_hw * s.channels + c0;
  const int64_t begin = blockIdx.x * s.chunk_len, end = min(static_cast<int64_t>(out_hw), begin + s.chunk_len);
  for (int64_t o = begin + threadIdx.y; o < end; o += blockDim.y) {
    const int oy = static_cast<int>(o) / out_w, ox = static_cast<int>(o) - oy * out_w;
    const T* in = in_sample + (static_cast<int64_t>(2 * oy) * width + 2 * ox) * s.channels;
    Pack<T, VEC> quad[4];
#pragma unroll
    for (int d = 0; d < 4; ++d) quad[d] = *reinterpret_cast<const Pack<T, VEC>*>(in + ((d / 2) * width + d % 2) * s.channels);
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
#pragma unroll
    for (int d = 0; d < 4; ++d) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float v = fmaf(to_float(quad[d].v[k]), cf[k].x, cf[k].y);
        if (silu) v = unclip_rt::silu_of(v);
        acc[k] += v;
      }
    }
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(0.25f * acc[k]);
    *reinterpret_cast<Pack<T, VEC>*>(out_sample + o * s.channels) = out;
  }
}

// Pass 3 of a down ResBlock's norm (NHWC only): each thread makes one pack of the 2x2
// average-pooled output from the four input packs it covers (normalised, SiLU'd, then averaged
// in float32), so the full-size normalised tensor is never written.
template <typename T, int VEC>
__global__ void normalize_down(const T* __restrict__ x, const float2* __restrict__ coef, T* __restrict__ y, Shape s,
                               bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t height = s.hw / s.width, out_w = s.width / 2, out_hw = (height / 2) * out_w;
  const int64_t n = s.batch * s.channels * out_hw;
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (o >= n) return;
  const int64_t b = o / (out_hw * s.channels), within = o - b * out_hw * s.channels;
  const int64_t pixel = within / s.channels, c0 = within % s.channels;
  const int64_t oy = pixel / out_w, ox = pixel % out_w;
  float2 cf[VEC];
  load_coefficients<VEC, true>(coef + b * s.channels + c0, cf);
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
#pragma unroll
  for (int d = 0; d < 4; ++d) {
    const int64_t iy = 2 * oy + d / 2, ix = 2 * ox + d % 2;
    const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + ((b * height + iy) * s.width + ix) * s.channels + c0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float v = fmaf(to_float(in.v[k]), cf[k].x, cf[k].y);
      if (silu) v = unclip_rt::silu_of(v);
      acc[k] += v;
    }
  }
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(0.25f * acc[k]);
  *reinterpret_cast<Pack<T, VEC>*>(y + o) = out;
}

// Small tensors (the decoder's 8x8 to 32x32 maps): one launch, one block per (sample, group).
// The block sums its group (shifted, as pass 1), folds the sums in a fixed order, then
// normalises the same elements again (an L1/L2 hit: a group is at most tens of kilobytes).
// Three launches of a few microseconds each cost more than the work at these sizes.
constexpr int kOnePassThreads = 512;

// A one-pass block's group statistics (mean, 1/std) from its threads' sums shifted by `pivot`:
// thread 0 folds them (block_sum's fixed order), every thread gets them through `stats`.
__device__ __forceinline__ float2 one_pass_stats(float2 acc, float2* smem, float2* stats, float pivot, float n,
                                                 float eps) {
  const float2 total = block_sum(acc, smem);
  if (threadIdx.x == 0) {
    const float mean_shift = total.x / n;
    *stats = make_float2(pivot + mean_shift, rsqrtf(fmaxf(total.y / n - mean_shift * mean_shift, 0.f) + eps));
  }
  __syncthreads();
  return *stats;
}

template <typename T, int VEC, bool NHWC>
__global__ void __launch_bounds__(kOnePassThreads) one_pass(const T* __restrict__ x, Add<T> add,
                                                            const T* __restrict__ weight, const T* __restrict__ bias,
                                                            Film<T> film, T* __restrict__ y, Shape s, float eps,
                                                            bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ float2 smem[kOnePassThreads / 32];
  __shared__ float2 stats;
  const int64_t b = blockIdx.x / s.groups, g = blockIdx.x % s.groups;
  const int64_t cg = s.channels / s.groups;
  const int64_t packs = cg * s.hw / VEC;
  // Pack e of the group: NHWC pixel e*VEC / cg at channels g*cg + (e*VEC) % cg (VEC | cg); NCHW
  // the group's contiguous row at e*VEC, channel g*cg + e*VEC / hw (VEC | hw).
  const auto offset = [&](int64_t e, int64_t& c) -> int64_t {
    const int64_t i = e * VEC;
    if (NHWC) {
      c = g * cg + i % cg;
      return (b * s.hw + i / cg) * s.channels + c;
    }
    c = g * cg + i / s.hw;
    return (b * s.channels + g * cg) * s.hw + i;
  };
  int64_t c_first;
  const float pivot = to_float(x[offset(0, c_first)]) + add.at(b, c_first);
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t e = threadIdx.x; e < packs; e += kOnePassThreads) {
    int64_t c;
    const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + offset(e, c));
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = to_float(in.v[k]) + add.at(b, NHWC ? c + k : c) - pivot;
      acc.x += d;
      acc.y += d * d;
    }
  }
  const float2 st = one_pass_stats(acc, smem, &stats, pivot, static_cast<float>(cg * s.hw), eps);
  for (int64_t e = threadIdx.x; e < packs; e += kOnePassThreads) {
    int64_t c0;
    const int64_t at = offset(e, c0);
    const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + at);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = NHWC ? c0 + k : c0;
      float v = (to_float(in.v[k]) + add.at(b, c) - st.x) * st.y * to_float(weight[c]) + to_float(bias[c]);
      if (film.scale != nullptr) v = v * (1.f + to_float(film.scale[b * film.ld + c])) + to_float(film.shift[b * film.ld + c]);
      if (silu) v = unclip_rt::silu_of(v);
      out.v[k] = from_float<T>(v);
    }
    store_pack<T, VEC, NHWC>(y, out, at, b, s);
  }
}

// one_pass for NHWC half-precision maps (channels a multiple of 8, groups of at most
// kOnePassMaxGroupChannels channels). Each item is one 16-byte pack of the run covering the
// group's channels in one pixel (when a group's channel count is not a multiple of 8 — the
// decoder's 16x16 maps: 960 channels, 30 per group — the edge packs hold other groups' channels,
// which are skipped; one_pass would load 2 channels at a time). The group's per-channel terms are
// read once into shared memory: the added embedding/bias for the statistics, then the normalising
// pass's y = x * A + B coefficients (finalize's formula), so an element costs one FMA and no
// global loads beyond its own. Packs wholly inside the group are stored whole, edge packs
// element by element (other blocks own their other channels).
constexpr int kOnePassMaxGroupChannels = 256;

template <typename T>
__global__ void __launch_bounds__(kOnePassThreads) one_pass_nhwc(const T* __restrict__ x, Add<T> add,
                                                                 const T* __restrict__ weight,
                                                                 const T* __restrict__ bias, Film<T> film,
                                                                 T* __restrict__ y, Shape s, float eps, bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ float2 smem[kOnePassThreads / 32];
  __shared__ float added[kOnePassMaxGroupChannels];
  __shared__ float2 coef[kOnePassMaxGroupChannels];
  __shared__ float2 stats;
  using P8 = Pack<T, 8>;
  const int64_t b = blockIdx.x / s.groups, g = blockIdx.x % s.groups;
  const int cg = static_cast<int>(s.channels / s.groups), c0 = static_cast<int>(g) * cg;
  const int first_pack = c0 / 8, span = (c0 + cg + 7) / 8 - first_pack;  // packs per pixel
  const int items = static_cast<int>(s.hw) * span;
  const int64_t sample = b * s.hw * s.channels;
  for (int c = threadIdx.x; c < cg; c += kOnePassThreads) added[c] = add.at(b, c0 + c);
  __syncthreads();
  const float pivot = to_float(x[sample + c0]) + added[0];
  float2 acc = make_float2(0.f, 0.f);
  for (int e = threadIdx.x; e < items; e += kOnePassThreads) {
    const int pixel = e / span, within = (first_pack + e - pixel * span) * 8 - c0;  // pack's first channel - c0
    const P8 in = *reinterpret_cast<const P8*>(x + sample + static_cast<int64_t>(pixel) * s.channels + c0 + within);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (static_cast<unsigned>(within + k) >= static_cast<unsigned>(cg)) continue;
      const float d = to_float(in.v[k]) + added[within + k] - pivot;
      acc.x += d;
      acc.y += d * d;
    }
  }
  const float2 st = one_pass_stats(acc, smem, &stats, pivot, static_cast<float>(cg * s.hw), eps);
  for (int c = threadIdx.x; c < cg; c += kOnePassThreads) {
    const int64_t cc = c0 + c;
    const float a = st.y * to_float(weight[cc]);
    float scale_a = a, shift_b = (added[c] - st.x) * a + to_float(bias[cc]);
    if (film.scale != nullptr) {
      const float sc = 1.f + to_float(film.scale[b * film.ld + cc]);
      scale_a *= sc;
      shift_b = shift_b * sc + to_float(film.shift[b * film.ld + cc]);
    }
    coef[c] = make_float2(scale_a, shift_b);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < items; e += kOnePassThreads) {
    const int pixel = e / span, within = (first_pack + e - pixel * span) * 8 - c0;
    const int64_t i = sample + static_cast<int64_t>(pixel) * s.channels + c0 + within;
    const P8 in = *reinterpret_cast<const P8*>(x + i);
    P8 out;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (static_cast<unsigned>(within + k) >= static_cast<unsigned>(cg)) continue;
      const float2 ab = coef[within + k];
      float v = to_float(in.v[k]) * ab.x + ab.y;
      if (silu) v = unclip_rt::silu_of(v);
      out.v[k] = from_float<T>(v);
    }
    if (within >= 0 && within + 8 <= cg) {
      store_pack<T, 8, true>(y, out, i, b, s);
    } else {
      for (int k = 0; k < 8; ++k) {
        if (static_cast<unsigned>(within + k) >= static_cast<unsigned>(cg)) continue;
        Pack<T, 1> one;
        one.v[0] = out.v[k];
        store_pack<T, 1, true>(y, one, i + k, b, s);
      }
    }
  }
}

template <typename T, int VEC>
void launch_one_pass(const at::Tensor& x, Add<T> add, const at::Tensor& weight, const at::Tensor& bias, Film<T> film,
                     at::Tensor& y, const Shape& s, double eps, bool silu, bool nhwc, cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr());
  const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  const auto blocks = static_cast<unsigned>(s.batch * s.groups);
  if (nhwc) {
    unclip_rt::launch_overlapped(one_pass<T, VEC, true>, dim3(blocks), dim3(kOnePassThreads), 0, stream, xp, add, wp, bp, film, yp, s, static_cast<float>(eps), silu);
  } else {
    unclip_rt::launch_overlapped(one_pass<T, VEC, false>, dim3(blocks), dim3(kOnePassThreads), 0, stream, xp, add, wp, bp, film, yp, s, static_cast<float>(eps), silu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int pick_vec(int64_t divisor_of, const void* a, const void* b, int elem) {
  for (int v : {8, 4, 2}) {
    if (v * elem <= 16 && divisor_of % v == 0 && reinterpret_cast<uintptr_t>(a) % (v * elem) == 0 &&
        reinterpret_cast<uintptr_t>(b) % (v * elem) == 0)
      return v;
  }
  return 1;
}

template <typename T, int VEC>
void launch_normalize(const at::Tensor& x, const at::Tensor& coef, at::Tensor& y, const Shape& s, bool silu, bool nhwc,
                      cudaStream_t stream) {
  const int64_t n = s.down ? y.numel() : x.numel();  // one thread per pack of the output (down) or input
  const int64_t blocks = (n / VEC + kThreads - 1) / kThreads;
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* cp = reinterpret_cast<const float2*>(coef.data_ptr<float>());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  if (s.down) {
    unclip_rt::launch_overlapped(normalize_down<T, VEC>, dim3(blocks), dim3(kThreads), 0, stream, xp, cp, yp, s, silu);
  } else if (nhwc) {
    unclip_rt::launch_overlapped(normalize<T, VEC, true>, dim3(blocks), dim3(kThreads), 0, stream, xp, cp, yp, s, silu);
  } else {
    unclip_rt::launch_overlapped(normalize<T, VEC, false>, dim3(blocks), dim3(kThreads), 0, stream, xp, cp, yp, s, silu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_partial(const at::Tensor& x, Add<T> add, at::Tensor& partial, Shape& s, bool nhwc,
                    cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  auto* pp = reinterpret_cast<float2*>(partial.data_ptr<float>());
  if (nhwc) {
    const int lanes = s.groups_per_block * static_cast<int>(s.channels / s.groups / VEC);
    const int rows = std::max(1, kThreads / lanes);
    const dim3 block(lanes, rows);
    const dim3 grid(s.chunks, static_cast<unsigned>(s.batch), (s.groups + s.groups_per_block - 1) / s.groups_per_block);
    unclip_rt::launch_overlapped(partial_nhwc<T, VEC>, dim3(grid), dim3(block), sizeof(float2) * lanes * rows, stream, xp, add, pp, s);
  } else {
    const dim3 grid(s.chunks, static_cast<unsigned>(s.batch * s.groups));
    unclip_rt::launch_overlapped(partial_nchw<T, VEC>, dim3(grid), dim3(kThreads), 0, stream, xp, add, pp, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 1 over x: its geometry (~4 blocks per SM over the whole tensor), its partial sums
// [batch * groups, chunks, 2] (float32) and the choice of kernel. With `concat` it reads its two
// sources (pass1_x, concat.second) and writes x: the wide pass.
template <typename T>
at::Tensor statistics_pass(const at::Tensor& x, Add<T> add_ptr, Shape& s, int64_t cg, bool nhwc, int elem,
                           cudaStream_t stream, const T* pass1_x, Concat<T> concat) {
  const int64_t groups = s.groups;
  int vec;
  if (nhwc) {
    vec = pick_vec(cg, x.data_ptr(), x.data_ptr(), elem);
    const int64_t lanes_per_group = cg / vec;
    TORCH_CHECK(lanes_per_group <= 1024, "group_norm: too many channels per group for the NHWC kernel");
    s.groups_per_block = static_cast<int>(std::min<int64_t>(groups, 1024 / lanes_per_group));
    const auto chunks = unclip_rt::wide_chunks(s.batch, s.hw);  // partial_nhwc's too
    s.chunk_len = chunks.chunk_len;
    s.chunks = chunks.chunks;
  } else {
    const int64_t row_len = cg * s.hw;
    vec = pick_vec(s.hw, x.data_ptr(), x.data_ptr(), elem);
    const int64_t want = std::max<int64_t>(1, kNchwTargetBlocks / (s.batch * groups));
    s.chunk_len = std::max<int64_t>(kThreads * vec, (row_len + want - 1) / want);
    s.chunk_len = (s.chunk_len + vec - 1) / vec * vec;
    s.chunks = static_cast<int>((row_len + s.chunk_len - 1) / s.chunk_len);
  }
  auto partial = at::empty({s.batch * groups, s.chunks, 2}, x.options().dtype(at::kFloat));
  const bool wide = concat.second != nullptr ||
                    (nhwc && cg % 8 != 0 && wide_geometry_fits(cg, s.channels, groups) &&
                     unclip_rt::aligned16(x) && elem == 2);
  if (wide) {
    const dim3 block = unclip_rt::wide_block(s.channels);
    unclip_rt::launch_overlapped(partial_nhwc_wide<T>, dim3(s.chunks, static_cast<unsigned>(s.batch)), block,
                                 unclip_rt::wide_shared_bytes(block), stream,
                                 concat.second != nullptr ? pass1_x : reinterpret_cast<const T*>(x.data_ptr()), add_ptr,
                                 reinterpret_cast<float2*>(partial.data_ptr<float>()), s, concat);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else switch (vec) {
    case 8: launch_partial<T, 8>(x, add_ptr, partial, s, nhwc, stream); break;
    case 4: launch_partial<T, 4>(x, add_ptr, partial, s, nhwc, stream); break;
    case 2: launch_partial<T, 2>(x, add_ptr, partial, s, nhwc, stream); break;
    default: launch_partial<T, 1>(x, add_ptr, partial, s, nhwc, stream); break;
  }
  return partial;
}

template <typename T>
at::Tensor group_norm_typed(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                            const c10::optional<at::Tensor>& add, const c10::optional<at::Tensor>& add_bias,
                            double eps, bool silu, bool nhwc, int one_pass_mode, bool up, bool down,
                            const T* pass1_x = nullptr, Concat<T> concat = {},
                            const at::Tensor* given_partial = nullptr) {
  const Add<T> add_ptr{add ? reinterpret_cast<const T*>(add->data_ptr()) : nullptr, add ? add->stride(0) : 0,
                       add_bias ? reinterpret_cast<const T*>(add_bias->data_ptr()) : nullptr};
  Shape s{};
  s.batch = x.size(0);
  s.channels = x.size(1);
  s.hw = x.numel() / (s.batch * s.channels);
  s.groups = static_cast<int>(groups);
  const int64_t cg = s.channels / groups;
  const int elem = static_cast<int>(x.element_size());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  s.up = up;
  s.down = down;
  s.width = x.size(-1);
  // keeps x's memory format; 2x the height and width with `up`, half with `down`
  const auto resized = [&](int64_t h, int64_t w) {
    return at::empty({x.size(0), x.size(1), h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  };
  auto y = up ? resized(2 * x.size(2), 2 * x.size(3)) : down ? resized(x.size(2) / 2, x.size(3) / 2) : at::empty_like(x);
  const Film<T> film{scale ? reinterpret_cast<const T*>(scale->data_ptr()) : nullptr,
                     shift ? reinterpret_cast<const T*>(shift->data_ptr()) : nullptr, scale ? scale->stride(0) : 0};
  if (given_partial == nullptr && !down && (one_pass_mode > 0 || (one_pass_mode < 0 && one_pass_by_size(cg, s.hw)))) {
    const int v = pick_vec(nhwc ? cg : s.hw, x.data_ptr(), y.data_ptr(), elem);
    if (nhwc && elem == 2 && s.channels % 8 == 0 && cg <= kOnePassMaxGroupChannels &&
        s.hw * ((cg + 14) / 8) < (int64_t{1} << 31) && unclip_rt::aligned16(x) && unclip_rt::aligned16(y)) {
      unclip_rt::launch_overlapped(one_pass_nhwc<T>, dim3(static_cast<unsigned>(s.batch * groups)), dim3(kOnePassThreads), 0, stream, 
          reinterpret_cast<const T*>(x.data_ptr()), add_ptr, reinterpret_cast<const T*>(weight.data_ptr()),
          reinterpret_cast<const T*>(bias.data_ptr()), film, reinterpret_cast<T*>(y.data_ptr()), s,
          static_cast<float>(eps), silu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return y;
    }
    switch (v) {
      case 8: launch_one_pass<T, 8>(x, add_ptr, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
      case 4: launch_one_pass<T, 4>(x, add_ptr, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
      case 2: launch_one_pass<T, 2>(x, add_ptr, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
      default: launch_one_pass<T, 1>(x, add_ptr, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
    }
    return y;
  }

  auto coef = at::empty({s.batch * s.channels, 2}, x.options().dtype(at::kFloat));
  at::Tensor partial;
  if (given_partial != nullptr) {  // pass 1 was done by the producer of x (bias_residual_stats)
    partial = *given_partial;
    s.chunks = static_cast<int>(partial.size(1));
  } else {
    partial = statistics_pass<T>(x, add_ptr, s, cg, nhwc, elem, stream, pass1_x, concat);
  }
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const int64_t rows = s.batch * groups;
  const int fin_blocks = static_cast<int>((rows + 7) / 8);  // 8 warps of 32 per block, one warp per row
  const auto* pp = reinterpret_cast<const float2*>(partial.data_ptr<float>());
  auto* cp = reinterpret_cast<float2*>(coef.data_ptr<float>());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr());
  const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
  if (nhwc) {
    unclip_rt::launch_overlapped(finalize<T, true>, dim3(fin_blocks), dim3(256), 0, stream, xp, add_ptr, pp, wp, bp, film, cp, s, eps);
  } else {
    unclip_rt::launch_overlapped(finalize<T, false>, dim3(fin_blocks), dim3(256), 0, stream, xp, add_ptr, pp, wp, bp, film, cp, s, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  constexpr int kPack = 16 / sizeof(T);  // elements of a 16-byte pack
  if (nhwc && s.channels % kPack == 0 && s.channels / kPack <= 1024 && unclip_rt::aligned16(x) &&
      unclip_rt::aligned16(y)) {
    const int lanes = static_cast<int>(s.channels / kPack);
    const dim3 block(lanes, std::max(1, kThreads / lanes));
    // chunks of each sample's pixels (down: of the output's)
    const auto chunks = unclip_rt::wide_chunks(s.batch, s.down ? s.hw / 4 : s.hw,
                                             unclip_rt::kElementwiseTargetBlocks);
    s.chunk_len = chunks.chunk_len;
    const dim3 grid(static_cast<unsigned>(chunks.chunks), static_cast<unsigned>(s.batch));
    auto* yp = reinterpret_cast<T*>(y.data_ptr());
    if (s.down) {
      unclip_rt::launch_overlapped(normalize_down_nhwc<T, kPack>, grid, block, 0, stream, xp, cp, yp, s, silu);
    } else {
      unclip_rt::launch_overlapped(normalize_nhwc<T, kPack>, grid, block, 0, stream, xp, cp, yp, s, silu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }
  // Pass 3 vector width: NHWC packs run along channels (within one sample: VEC | channels);
  // NCHW packs along pixels of one channel (VEC | hw).
  const int nvec = pick_vec(nhwc ? s.channels : s.hw, x.data_ptr(), y.data_ptr(), elem);
  switch (nvec) {
    case 8: launch_normalize<T, 8>(x, coef, y, s, silu, nhwc, stream); break;
    case 4: launch_normalize<T, 4>(x, coef, y, s, silu, nhwc, stream); break;
    case 2: launch_normalize<T, 2>(x, coef, y, s, silu, nhwc, stream); break;
    default: launch_normalize<T, 1>(x, coef, y, s, silu, nhwc, stream); break;
  }
  return y;
}

}  // namespace

// Whether t is a [B, C] matrix (of `dtype`) whose rows may be strided or broadcast (stride 0)
// but whose channels are contiguous.
static bool per_sample_rows(const at::Tensor& t, const at::Tensor& x) {
  return t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.stride(1) == 1 && t.stride(0) >= 0 &&
         t.scalar_type() == x.scalar_type() && t.device() == x.device();
}

// y = GroupNorm(x [+ add + add_bias]) * weight + bias [* (1 + scale) + shift] [-> SiLU], x
// [B, C, *spatial] in NCHW (contiguous) or NHWC (channels_last) memory; weight/bias/add_bias [C],
// scale/shift/add [B, C] (rows may be strided, e.g. the two halves of one [B, 2C] projection, or
// broadcast), all in x's dtype. `add` is the ResBlock's time embedding and `add_bias` the bias of
// the convolution before the norm: both added before the norm without a pass of their own.
// `up`: write the output nearest-upsampled 2x ([B, C, 2H, 2W], channels_last x only: the up
// ResBlocks upsample the norm's output before their convolution).
// `down`: write it 2x2 average-pooled ([B, C, H/2, W/2], channels_last x only: the down ResBlocks).
// `one_pass_mode`: 1 the one-launch kernel, 0 the three passes, -1 (default) by the group's size.
// `partial`: x's statistics pass done already, [B * groups, chunks, 2] float32 sums of each
// chunk of each (sample, group), shifted by the group's first channel at pixel 0 (as
// bias_residual_stats writes them, when it made x): the norm runs its last two passes only.
at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                      const c10::optional<at::Tensor>& add, double eps, bool silu,
                      const c10::optional<at::Tensor>& add_bias, int64_t one_pass_mode, bool up, bool down,
                      const c10::optional<at::Tensor>& partial) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 3, "group_norm: x must be a CUDA tensor [B, C, *spatial]");
  TORCH_CHECK(x.size(1) % groups == 0, "group_norm: channels ", std::to_string(x.size(1)), " not divisible by ",
              std::to_string(groups), " groups");
  const bool nhwc = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nhwc || x.is_contiguous(), "group_norm: x must be contiguous or channels_last");
  TORCH_CHECK(!up || nhwc, "group_norm: up (a fused nearest 2x upsampling) needs channels_last x");
  TORCH_CHECK(!down || (nhwc && x.size(2) % 2 == 0 && x.size(3) % 2 == 0),
              "group_norm: down (a fused 2x2 average pooling) needs channels_last x of even height and width");
  TORCH_CHECK(!(up && down), "group_norm: up or down, not both");
  const auto per_channel = [&](const at::Tensor& t) { return unclip_rt::is_channel_vector(t, x); };
  TORCH_CHECK(per_channel(weight) && per_channel(bias), "group_norm: weight and bias must be [C] in x's dtype");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "group_norm: give both scale and shift, or neither");
  if (scale) {
    TORCH_CHECK(per_sample_rows(*scale, x) && per_sample_rows(*shift, x) && scale->stride(0) == shift->stride(0),
                "group_norm: scale and shift must be [B, C] in x's dtype, channels contiguous, one row stride");
  }
  if (add) {
    TORCH_CHECK(per_sample_rows(*add, x), "group_norm: add must be [B, C] in x's dtype, channels contiguous");
  }
  if (add_bias) {
    TORCH_CHECK(per_channel(*add_bias), "group_norm: add_bias must be [C] in x's dtype");
  }
  if (partial) {
    TORCH_CHECK(partial->is_cuda() && partial->device() == x.device() && partial->scalar_type() == at::kFloat &&
                    partial->is_contiguous() && partial->dim() == 3 && partial->size(0) == x.size(0) * groups &&
                    partial->size(1) >= 1 && partial->size(2) == 2,
                "group_norm: partial must be contiguous float32 [B * groups, chunks, 2] on x's device");
    TORCH_CHECK(!add && !add_bias, "group_norm: partial holds the sums of x alone: no add or add_bias with it");
  }
  const at::Tensor* given = partial ? &*partial : nullptr;
  const c10::cuda::CUDAGuard guard(x.device());
  const int mode = static_cast<int>(one_pass_mode);
  switch (x.scalar_type()) {
    case at::kFloat:
      return group_norm_typed<float>(x, groups, weight, bias, scale, shift, add, add_bias, eps, silu, nhwc, mode, up, down, nullptr, {}, given);
    case at::kHalf:
      return group_norm_typed<__half>(x, groups, weight, bias, scale, shift, add, add_bias, eps, silu, nhwc, mode, up, down, nullptr, {}, given);
    case at::kBFloat16:
      return group_norm_typed<__nv_bfloat16>(x, groups, weight, bias, scale, shift, add, add_bias, eps, silu, nhwc, mode, up, down, nullptr, {}, given);
    default: TORCH_CHECK(false, "group_norm: x must be float32, float16 or bfloat16");
  }
}

// GroupNorm(cat(first, second, dim=1)) * weight + bias [-> SiLU] and the concatenation itself,
// for channels-last half-precision [B, C1, H, W] and [B, C2, H, W] (C1, C2 multiples of 8): the
// UNets' output blocks norm their input concatenation and also feed it to their 1x1 skip
// convolution. Where the norm runs three passes, its first pass reads the two inputs and writes
// the concatenation as it sums it (no separate concatenation kernel, whose read of both inputs
// it saves); where it runs one (small maps), torch's concatenation and the one-pass norm.
// Returns {y, cat}.
std::vector<at::Tensor> group_norm_concat(const at::Tensor& first, const at::Tensor& second, int64_t groups,
                                          const at::Tensor& weight, const at::Tensor& bias, double eps, bool silu,
                                          const c10::optional<at::Tensor>& first_bias,
                                          const c10::optional<at::Tensor>& first_bias2) {
  TORCH_CHECK(unclip_rt::is_nhwc_half(first) && unclip_rt::is_nhwc_half(second) &&
                  first.scalar_type() == second.scalar_type() &&
                  first.device() == second.device(),
              "group_norm_concat: first and second must be aligned channels_last half-precision CUDA tensors of one dtype");
  TORCH_CHECK(first.size(0) == second.size(0) && first.size(2) == second.size(2) && first.size(3) == second.size(3),
              "group_norm_concat: first and second must share batch, height and width");
  const int64_t c1 = first.size(1), channels = c1 + second.size(1), hw = first.size(2) * first.size(3);
  TORCH_CHECK(c1 % 8 == 0 && second.size(1) % 8 == 0 && channels % groups == 0,
              "group_norm_concat: both channel counts must be multiples of 8 and their sum of the groups");
  const auto first_part_bias = [&](const c10::optional<at::Tensor>& t) {
    return !t || (t->dim() == 1 && t->size(0) == c1 && t->is_contiguous() && t->scalar_type() == first.scalar_type() &&
                  t->device() == first.device());
  };
  TORCH_CHECK(first_part_bias(first_bias) && first_part_bias(first_bias2) && (first_bias || !first_bias2),
              "group_norm_concat: first_bias (and first_bias2) must be contiguous [C1] vectors in the inputs' dtype, "
              "first_bias2 only with first_bias");
  const int64_t cg = channels / groups;
  if (one_pass_by_size(cg, hw) || !wide_geometry_fits(cg, channels, groups)) {  // group_norm_typed's choices
    at::Tensor head = first;
    if (first_bias) {  // the biases in float, rounded once, as the fused pass adds them
      auto total = first_bias->to(at::kFloat);
      if (first_bias2) total = total + first_bias2->to(at::kFloat);
      head = (first.to(at::kFloat) + total.view({1, c1, 1, 1})).to(first.scalar_type());
    }
    auto cat = at::cat({head, second}, 1).contiguous(at::MemoryFormat::ChannelsLast);
    return {group_norm(cat, groups, weight, bias, c10::nullopt, c10::nullopt, c10::nullopt, eps, silu, c10::nullopt,
                       -1, false, false, c10::nullopt),
            cat};
  }
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == channels && bias.is_contiguous() &&
                  bias.numel() == channels && weight.scalar_type() == first.scalar_type() &&
                  bias.scalar_type() == first.scalar_type() && weight.device() == first.device(),
              "group_norm_concat: weight and bias must be [C1 + C2] in the inputs' dtype");
  const c10::cuda::CUDAGuard guard(first.device());
  auto cat = at::empty({first.size(0), channels, first.size(2), first.size(3)},
                       first.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor y;
  unclip_rt::dispatch_half_like(first, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const Concat<T> concat{reinterpret_cast<const T*>(second.data_ptr()), c1, reinterpret_cast<T*>(cat.data_ptr()),
                           first_bias ? reinterpret_cast<const T*>(first_bias->data_ptr()) : nullptr,
                           first_bias2 ? reinterpret_cast<const T*>(first_bias2->data_ptr()) : nullptr};
    y = group_norm_typed<T>(cat, groups, weight, bias, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, eps,
                            silu, true, 0, false, false, reinterpret_cast<const T*>(first.data_ptr()), concat);
  });
  return {y, cat};
}


// Whether group_norm in auto mode runs a channels-last half-precision map of `channels` over
// `hw` pixels in three passes whose statistics pass has the wide geometry (wide_stats.cuh):
// the maps for which a producer's statistics (bias_residual_stats) replace that pass.
bool group_norm_takes_three_passes(int64_t channels, int64_t groups, int64_t hw) {
  TORCH_CHECK(groups > 0 && channels > 0 && channels % groups == 0 && hw > 0,
              "group_norm_takes_three_passes: channels must be a positive multiple of groups, hw positive");
  const int64_t cg = channels / groups;
  return !one_pass_by_size(cg, hw) && wide_geometry_fits(cg, channels, groups);
}
