// Linear layers over a few rows (1 to 64): y = act(x·Wᵀ + b), or out += act(x·Wᵀ + b), for
// half-precision rows, streaming the weights at close to the memory bandwidth.
//
// Why: the prior's cached step runs 6 rows (batch 2 × 3 step tokens) through 20 layers of 50 M
// weights each: every step is a pass over 2 GB of weights with almost no arithmetic per byte.
// cuBLAS's GEMV-like kernels read them well below the memory bandwidth, the GELU and the
// split-K reduction are launches of their own, and each launch leaves the GPU idle a moment.
// Here each block owns 16 output features and its 8 warps split the reduction dimension; a lane
// keeps 8 16-byte packs of each of two weight rows in flight and multiplies them on the tensor
// cores (mma.sync m16n8k16, float32 accumulation) against the rows, the mma's narrow side.
// Since a dot product's terms may be summed in any order, the 8 consecutive weights of a pack
// and the rows' matching 8 inputs fill the mma's k slots {2t, 2t+1, 2t+8, 2t+9} of two mmas as
// they are: no shuffles, no shared-memory staging. The 4 lanes of a weight row read 4 packs each
// per step (256 contiguous bytes: 64-byte runs streamed the widest layer slower). The warps'
// partial sums meet in shared memory, where the bias, the activation and the accumulation into
// the output are applied once. Launched overlapped
// (pdl.cuh): the first weights are requested before the kernel waits for the one before it.
// At 24 rows cuBLAS is faster (models.prior.skinny_block chooses); figures in docs/speed.md.

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
#include "tensor_core.cuh"

namespace {

using unclip_rt::from_float;
using unclip_rt::mma_16816;
using unclip_rt::to_float;

constexpr int kFeatures = 16;   // output features per block: the mma's 16-row side
constexpr int kStep = 32;       // reduction elements per warp step: 4 lanes × 8
constexpr int kPacksInFlight = 8;  // 16-byte weight packs per lane and weight row loaded ahead
constexpr int kMaxTiles = 8;    // tiles of 8 input rows: at most 64 rows

enum Activation : int { kNone = 0, kGelu = 1, kSilu = 2 };

// Block b: output features [16·MT·b, 16·MT·(b + 1)) of all rows, MT tiles of 16 (the mma's 16-row
// side). Warp w: reduction steps w, w + kWarps, ... (step s: elements [32·C·s, 32·C·(s + 1)));
// lane (g, t) = (lane / 4, lane % 4) takes the C 16-byte packs at elements 32·C·s + 8·C·t of
// weight rows 16m + g and 16m + g + 8 (each tile m) and of input rows 8·tile + g: the 4 lanes of a
// row read 64·C contiguous bytes of it per step, the block's 8 warps 512·C. With MT = 2 each input
// pack loaded serves two weight tiles: every block reads all the rows, so at 24 rows (four
// images) 16-feature blocks read as many bytes of rows (from L2) as of weights (from memory).
template <typename T, int TILES, int C, int kWarps, int MT, bool EIGHT = false>
__global__ void __launch_bounds__(kWarps * 32)
    skinny_linear_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                         T* __restrict__ out, int rows, int features, int width, int activation, bool accumulate) {
  // EIGHT: 8 features per block, the mma's other 8 rows repeat them (no loads; their sums unused)
  constexpr int kInFlight = EIGHT ? 3 * kPacksInFlight / 2 : kPacksInFlight;
  constexpr int kSteps = kInFlight / (C * MT) > 0 ? kInFlight / (C * MT) : 1;  // steps loaded ahead
  constexpr int kBlockFeatures = EIGHT ? 8 : kFeatures * MT;
  __shared__ float partial[kWarps][kFeatures * MT][TILES * 8];
  unclip_rt::allow_dependents();  // the next kernel may start now (pdl.cuh)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int feature0 = blockIdx.x * kBlockFeatures;
  const int steps = width / (kStep * C), packs = width / 8;
  const uint4* w_lo[MT];
  const uint4* w_hi[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    w_lo[m] = reinterpret_cast<const uint4*>(weight + static_cast<int64_t>(feature0 + 16 * m + g) * width) + C * t;
    w_hi[m] = w_lo[m] + 8 * static_cast<int64_t>(packs);
  }
  uint4 lo[kSteps][MT][C], hi[kSteps][MT][C];
  const auto load_step = [&](int u, int s) {  // step s's weight packs into slot u
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        lo[u][m][c] = __ldcs(w_lo[m] + 4 * C * s + c);
        if constexpr (!EIGHT) hi[u][m][c] = __ldcs(w_hi[m] + 4 * C * s + c);
      }
    }
  };
#pragma unroll
  for (int u = 0; u < kSteps; ++u) {  // weights never come from the kernel before: load them now
    const int s = warp + u * kWarps;
    if (s < steps) load_step(u, s);
  }
  // this thread's first epilogue item (at most one per thread up to 16 rows of 16 features): its
  // bias now, its output (accumulating) right after the wait, off the epilogue's critical path
  const int first = threadIdx.x;
  const bool has_first = first < kBlockFeatures * rows;
  const int64_t first_at = static_cast<int64_t>(first / kBlockFeatures) * features + feature0 + first % kBlockFeatures;
  const float first_bias = has_first && bias != nullptr ? to_float(bias[feature0 + first % kBlockFeatures]) : 0.f;
  unclip_rt::wait_for_producers();
  const float first_out = has_first && accumulate ? to_float(out[first_at]) : 0.f;
  const uint4* xs = reinterpret_cast<const uint4*>(x) + C * t;
  float acc[MT][TILES][4] = {};
  for (int base = warp; base < steps; base += kSteps * kWarps) {
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int s = base + u * kWarps;
      if (s < steps) {
#pragma unroll
        for (int tile = 0; tile < TILES; ++tile) {
          const int r = tile * 8 + g;
#pragma unroll
          for (int c = 0; c < C; ++c) {
            const uint4 b = r < rows ? xs[static_cast<int64_t>(r) * packs + 4 * C * s + c] : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              if constexpr (EIGHT) {
                mma_16816<T>(acc[m][tile], lo[u][m][c].x, lo[u][m][c].x, lo[u][m][c].y, lo[u][m][c].y, b.x, b.y);
                mma_16816<T>(acc[m][tile], lo[u][m][c].z, lo[u][m][c].z, lo[u][m][c].w, lo[u][m][c].w, b.z, b.w);
              } else {
                mma_16816<T>(acc[m][tile], lo[u][m][c].x, hi[u][m][c].x, lo[u][m][c].y, hi[u][m][c].y, b.x, b.y);
                mma_16816<T>(acc[m][tile], lo[u][m][c].z, hi[u][m][c].z, lo[u][m][c].w, hi[u][m][c].w, b.z, b.w);
              }
            }
          }
        }
        const int next = s + kSteps * kWarps;
        if (next < steps) load_step(u, next);
      }
    }
  }
  // accumulator (c0, c1): feature 16m + g, rows 2t and 2t + 1 of the tile; (c2, c3): feature 16m + g + 8
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
      const int r = tile * 8 + 2 * t, f = 16 * m + g;
      partial[warp][f][r] = acc[m][tile][0];
      partial[warp][f][r + 1] = acc[m][tile][1];
      partial[warp][f + 8][r] = acc[m][tile][2];
      partial[warp][f + 8][r + 1] = acc[m][tile][3];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kBlockFeatures * rows; i += blockDim.x) {
    const int f = i % kBlockFeatures, r = i / kBlockFeatures, feature = feature0 + f;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][f][r];
    if (has_first && i == first) {
      v += first_bias;
    } else if (bias != nullptr) {
      v += to_float(bias[feature]);
    }
    if (activation == kGelu) {
      v = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    } else if (activation == kSilu) {
      v = v / (1.f + __expf(-v));
    }
    T* o = out + static_cast<int64_t>(r) * features + feature;
    if (accumulate) v += has_first && i == first ? first_out : to_float(*o);
    *o = from_float<T>(v);
  }
}

}  // namespace

// x [rows, width], weight [features, width], bias [features] (optional), all contiguous fp16 or
// all bf16 on one device; rows 1..64, width a multiple of 32, features a multiple of 16.
// block_features: output features per block, 8, 16 or 32 (8: twice the blocks of 16, for layers whose
// 16-feature blocks would not cover the GPU; 32: features a multiple of 32, rows up to 32).
// activation: 0 none, 1 exact GELU, 2 SiLU. Without `out`: returns act(x·Wᵀ + b) [rows, features];
// with `out` [rows, features] (contiguous, same dtype): out += act(x·Wᵀ + b) in place, returns out.
// The kernel reads `weight` and `bias` before the kernel launched just before it has finished: they
// must not be written by that kernel (they never are inside a sampling loop).
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         int64_t activation, const c10::optional<at::Tensor>& out, int64_t warps,
                         int64_t block_features) {
  unclip_rt::check_half_matrix(x, "skinny_linear", "x");
  unclip_rt::check_half_matrix(weight, "skinny_linear", "weight");
  const int64_t rows = x.size(0), width = x.size(1), features = weight.size(0);
  TORCH_CHECK(weight.size(1) == width && weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "skinny_linear: weight must be [features, width] in x's dtype and device");
  TORCH_CHECK(rows >= 1 && rows <= 8 * kMaxTiles, "skinny_linear: 1 to 64 rows, got ", std::to_string(rows));
  TORCH_CHECK(width % kStep == 0 && features % kFeatures == 0,
              "skinny_linear: width must be a multiple of 32 and features of 16");
  TORCH_CHECK(activation >= kNone && activation <= kSilu, "skinny_linear: activation must be 0, 1 or 2");
  at::Tensor y = unclip_rt::linear_output("skinny_linear", x, features, bias, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int tiles = static_cast<int>((rows + 7) / 8);
  TORCH_CHECK(warps == 4 || warps == 8, "skinny_linear: warps must be 4 or 8");
  TORCH_CHECK(block_features == 8 || block_features == 16 || (block_features == 32 && features % 32 == 0 && rows <= 32),
              "skinny_linear: block_features must be 8, 16, or 32 with features a multiple of 32 and at most 32 rows");
  const dim3 grid(static_cast<unsigned>(features / block_features)), block(static_cast<unsigned>(warps * 32));
  const auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* b = bias ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
    const auto run = [&](auto kernel) {
      unclip_rt::launch_overlapped(kernel, grid, block, 0, stream.stream(), reinterpret_cast<const T*>(x.data_ptr()),
                                   reinterpret_cast<const T*>(weight.data_ptr()), b,
                                   reinterpret_cast<T*>(y.data_ptr()), static_cast<int>(rows),
                                   static_cast<int>(features), static_cast<int>(width), static_cast<int>(activation),
                                   out.has_value());
    };
    const auto by_tiles = [&](auto chunk, auto warp_count) {  // packs per lane and row per step; warps
      constexpr int C = decltype(chunk)::value, W = decltype(warp_count)::value;
      if (block_features == 32) {  // at most 4 tiles (32 rows): 8 warps' partial sums fill 32 KB
        switch (tiles) {
          case 1: run(skinny_linear_kernel<T, 1, C, W, 2>); break;
          case 2: run(skinny_linear_kernel<T, 2, C, W, 2>); break;
          case 3: run(skinny_linear_kernel<T, 3, C, W, 2>); break;
          default: run(skinny_linear_kernel<T, 4, C, W, 2>); break;
        }
        return;
      }
      if (block_features == 8) {
        switch (tiles) {
          case 1: run(skinny_linear_kernel<T, 1, C, W, 1, true>); break;
          case 2: run(skinny_linear_kernel<T, 2, C, W, 1, true>); break;
          case 3: run(skinny_linear_kernel<T, 3, C, W, 1, true>); break;
          case 4: run(skinny_linear_kernel<T, 4, C, W, 1, true>); break;
          default: run(skinny_linear_kernel<T, kMaxTiles, C, W, 1, true>); break;
        }
        return;
      }
      switch (tiles) {
        case 1: run(skinny_linear_kernel<T, 1, C, W, 1>); break;
        case 2: run(skinny_linear_kernel<T, 2, C, W, 1>); break;
        case 3: run(skinny_linear_kernel<T, 3, C, W, 1>); break;
        case 4: run(skinny_linear_kernel<T, 4, C, W, 1>); break;
        default: run(skinny_linear_kernel<T, kMaxTiles, C, W, 1>); break;
      }
    };
    const auto by_warps = [&](auto chunk) {
      if (warps == 4) {
        by_tiles(chunk, std::integral_constant<int, 4>{});
      } else {
        by_tiles(chunk, std::integral_constant<int, 8>{});
      }
    };
    if (width % (kStep * 4) == 0) {
      by_warps(std::integral_constant<int, 4>{});
    } else {
      by_warps(std::integral_constant<int, 1>{});
    }
  };
  unclip_rt::dispatch_half_like(x, launch);
  return y;
}
