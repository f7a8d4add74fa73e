// skinny_linear's product with the weights staged in shared memory instead of registers: a
// producer warp streams each block's weight rows into a ring of shared-memory stages with bulk
// asynchronous copies (cp.async.bulk, completion counted on mbarriers) and the consumer warps
// multiply them on the tensor cores against the rows, as skinny_linear does (a 16-byte pack's 8
// weights and the rows' matching 8 inputs fill the mma's k slots as they are).
//
// Why: in the prior step's chain of overlapped kernels (pdl.cuh) a kernel can request its
// weights before the kernel before it has finished only as far as it has room to hold them;
// skinny_linear holds them in registers (a block of 256 threads at ~125 registers), so the next
// projection's blocks often cannot become resident at all while the attention or the projection
// before runs, and the memory idles. Here a block holds no weights in registers (fewer threads,
// fewer registers each), and the whole ring — several stages of every block — is requested before
// the block waits for its input.
//
// Chunks of F rows × 512 columns; rows padded by 64 bytes so that the fragment loads of a
// quarter warp hit distinct banks. Hopper (sm_90) and newer only. Measured effect on the prior
// step: docs/speed.md.

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

constexpr int kConsumerWarps = 4;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // and one producer warp
constexpr int kChunk = 512;                // weight columns per stage
constexpr int kPad = 64;                   // bytes after each staged row
constexpr int kRowBytes = 2 * kChunk + kPad;
constexpr int kMaxTiles = 3;               // input rows: three 8-row tiles of the mma (24 rows)
constexpr int kMaxStages = 8;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, unsigned parity) {
  unsigned ok;
  asm volatile(
      "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
      : "=r"(ok)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return ok != 0;
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_expect(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_addr(dst)),
               "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}

#endif

// Block b: output features [F·b, F·(b + 1)) of all rows (F = 16·MT, or 8 with EIGHT: the mma's
// other 8 rows repeat them). Chunk c: columns [512c, 512c + 512) of the block's F weight rows, in
// stage c mod stages. Consumer warp w takes columns [128w, 128w + 128) of each chunk, 32 per step:
// lane (g, t) the pack at column 32j + 8t of rows g and g + 8 of each 16-row tile.
template <typename T, int TILES, int MT, bool EIGHT>
__global__ void __launch_bounds__(kThreads)
    skinny_staged_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                         T* __restrict__ out, int rows, int features, int width, int activation, bool accumulate,
                         int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int F = EIGHT ? 8 : 16 * MT;
  constexpr int kStageBytes = F * kRowBytes;
  extern __shared__ __align__(128) char smem[];
  char* ring = smem;
  float* partial = reinterpret_cast<float*>(smem + stages * kStageBytes);  // [warps][16·MT][8·TILES]
  uint64_t* full = reinterpret_cast<uint64_t*>(partial + kConsumerWarps * 16 * MT * 8 * TILES);
  uint64_t* empty = full + kMaxStages;
  unclip_rt::allow_dependents();  // the next kernel may start now (pdl.cuh)
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(&full[i])), "r"(1) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(&empty[i])), "r"(kConsumerWarps)
                   : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int feature0 = blockIdx.x * F;
  const int chunks = width / kChunk;
  if (warp == kConsumerWarps) {  // the producer: weights never come from the kernel before
    for (int c = 0; c < chunks; ++c) {
      const int stage = c % stages;
      if (lane == 0) {
        mbar_wait(&empty[stage], ((c / stages) & 1) ^ 1);
        mbar_expect(&full[stage], F * kChunk * sizeof(T));
      }
      __syncwarp();
      if (lane < F) {
        const T* src = weight + static_cast<int64_t>(feature0 + lane) * width + c * kChunk;
        bulk_copy(ring + stage * kStageBytes + lane * kRowBytes, src, kChunk * sizeof(T), &full[stage]);
      }
    }
    return;
  }
  const int g = lane / 4, t = lane % 4;
  // this thread's first epilogue item: its bias before the wait, its output (accumulating) right after
  const int item_f = threadIdx.x % F, item_r = threadIdx.x / F;
  const bool has_item = item_r < rows;
  const float item_bias = has_item && bias != nullptr ? to_float(bias[feature0 + item_f]) : 0.f;
  unclip_rt::wait_for_producers();
  const float item_prev =
      has_item && accumulate ? to_float(out[static_cast<int64_t>(item_r) * features + feature0 + item_f]) : 0.f;
  float acc[MT][TILES][4] = {};
  const int packs = width / 8;
  const uint4* xs = reinterpret_cast<const uint4*>(x);
  for (int c = 0; c < chunks; ++c) {
    const int stage = c % stages;
    uint4 b[4][TILES];  // the rows' inputs of the warp's 4 steps, loaded while the chunk arrives
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = c * kChunk + warp * 128 + 32 * j + 8 * t;
#pragma unroll
      for (int tile = 0; tile < TILES; ++tile) {
        const int r = tile * 8 + g;
        b[j][tile] = r < rows ? xs[static_cast<int64_t>(r) * packs + col / 8] : make_uint4(0, 0, 0, 0);
      }
    }
    mbar_wait(&full[stage], (c / stages) & 1);
    const char* wb = ring + stage * kStageBytes;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = warp * 128 + 32 * j + 8 * t;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const uint4 lo = *reinterpret_cast<const uint4*>(wb + (16 * m + g) * kRowBytes + 2 * col);
        const uint4 hi = EIGHT ? lo : *reinterpret_cast<const uint4*>(wb + (16 * m + g + 8) * kRowBytes + 2 * col);
#pragma unroll
        for (int tile = 0; tile < TILES; ++tile) {
          mma_16816<T>(acc[m][tile], lo.x, hi.x, lo.y, hi.y, b[j][tile].x, b[j][tile].y);
          mma_16816<T>(acc[m][tile], lo.z, hi.z, lo.w, hi.w, b[j][tile].z, b[j][tile].w);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[stage]);
  }
  // accumulator (c0, c1): feature 16m + g, rows 2t and 2t + 1 of the tile; (c2, c3): feature 16m + g + 8
  constexpr int R = 8 * TILES;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) {
      const int r = tile * 8 + 2 * t, f = 16 * m + g;
      float* p = partial + (warp * 16 * MT + f) * R;
      p[r] = acc[m][tile][0];
      p[r + 1] = acc[m][tile][1];
      p[8 * R + r] = acc[m][tile][2];
      p[8 * R + r + 1] = acc[m][tile][3];
    }
  }
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");  // the consumer warps only
  for (int i = threadIdx.x; i < F * rows; i += kConsumers) {
    const int f = i % F, r = i / F;
    const bool first = i == static_cast<int>(threadIdx.x);
    float v = first ? item_bias : (bias != nullptr ? to_float(bias[feature0 + f]) : 0.f);
#pragma unroll
    for (int w = 0; w < kConsumerWarps; ++w) v += partial[(w * 16 * MT + f) * R + r];
    if (activation == 1) {
      v = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    } else if (activation == 2) {
      v = v / (1.f + __expf(-v));
    }
    T* o = out + static_cast<int64_t>(r) * features + feature0 + f;
    if (accumulate) v += first ? item_prev : to_float(*o);
    *o = from_float<T>(v);
  }
#endif
}

}  // namespace

// skinny_linear (same arguments and result) with the weights staged through `stages` (1 to 8)
// shared-memory stages of F rows × 512 columns: width a multiple of 512, at most 24 rows, block
// features F 8, 16 or 32 dividing the features. Hopper (sm_90) or newer.
at::Tensor skinny_linear_staged(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                int64_t activation, const c10::optional<at::Tensor>& out, int64_t block_features,
                                int64_t stages) {
  const char* op = "skinny_linear_staged";
  unclip_rt::check_half_matrix(x, op, "x");
  unclip_rt::check_half_matrix(weight, op, "weight");
  const int64_t rows = x.size(0), width = x.size(1), features = weight.size(0);
  TORCH_CHECK(weight.size(1) == width && weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              op, ": weight must be [features, width] in x's dtype and device");
  TORCH_CHECK(rows >= 1 && rows <= 8 * kMaxTiles, op, ": 1 to 24 rows");
  TORCH_CHECK(width % kChunk == 0, op, ": width must be a multiple of 512");
  TORCH_CHECK((block_features == 8 || block_features == 16 || block_features == 32) && features % block_features == 0,
              op, ": block_features must be 8, 16 or 32 and divide the features");
  TORCH_CHECK(stages >= 1 && stages <= kMaxStages, op, ": 1 to 8 stages");
  TORCH_CHECK(activation >= 0 && activation <= 2, op, ": activation must be 0, 1 or 2");
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  TORCH_CHECK(major >= 9, op, ": needs a Hopper (sm_90) or newer GPU");
  at::Tensor y = unclip_rt::linear_output(op, x, features, bias, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int tiles = static_cast<int>((rows + 7) / 8);
  const int f = static_cast<int>(block_features);
  const int mt = f == 32 ? 2 : 1;
  const size_t smem = static_cast<size_t>(stages) * f * kRowBytes + sizeof(float) * kConsumerWarps * 16 * mt * 8 * tiles +
                      2 * kMaxStages * sizeof(uint64_t);
  int most = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device()));
  TORCH_CHECK(smem <= static_cast<size_t>(most), op, ": ", std::to_string(stages), " stages of ", std::to_string(f),
              " rows need ", std::to_string(smem), " bytes of shared memory, the GPU has ", std::to_string(most));
  const dim3 grid(static_cast<unsigned>(features / f)), block(kThreads);
  unclip_rt::dispatch_half_like(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto run = [&](auto kernel) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      unclip_rt::launch_overlapped(kernel, grid, block, smem, stream.stream(), reinterpret_cast<const T*>(x.data_ptr()),
                                   reinterpret_cast<const T*>(weight.data_ptr()),
                                   bias ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
                                   reinterpret_cast<T*>(y.data_ptr()), static_cast<int>(rows),
                                   static_cast<int>(features), static_cast<int>(width), static_cast<int>(activation),
                                   out.has_value(), static_cast<int>(stages));
    };
    const auto by_tiles = [&](auto mt, auto eight) {
      constexpr int MT = decltype(mt)::value;
      constexpr bool E = decltype(eight)::value;
      switch (tiles) {
        case 1: run(skinny_staged_kernel<T, 1, MT, E>); break;
        case 2: run(skinny_staged_kernel<T, 2, MT, E>); break;
        default: run(skinny_staged_kernel<T, 3, MT, E>); break;
      }
    };
    if (f == 8) {
      by_tiles(std::integral_constant<int, 1>{}, std::true_type{});
    } else if (f == 16) {
      by_tiles(std::integral_constant<int, 1>{}, std::false_type{});
    } else {
      by_tiles(std::integral_constant<int, 2>{}, std::false_type{});
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}
