// Layer norm of a transformer's residual stream with the pending bias of the layer before it
// folded in: x += bias (written back, in place), y = LayerNorm(x) * weight + beta, float32
// statistics (two-pass variance from registers), for half-precision rows.
//
// Why: the prior's cached step runs 6 rows of 2048 per layer. Its linear layers that feed the
// residual stream accumulate into it in place without bias (cuBLAS, beta = 1), so each layer
// needs no separate residual adds; their biases ride along into the next layer norm, which reads
// the row anyway. torch's layer norm and adds are separate launches each, 80 per step for so
// few rows.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>

#include "elementwise.cuh"
#include "half_tensors.h"
#include "pdl.cuh"

namespace {

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;

constexpr int kVec = 8;
constexpr int kMaxPacksPerThread = 4;
constexpr int kMaxThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// One block per row; thread i holds packs i, i + blockDim, ... (PACKS of them) in registers.
template <typename T, int PACKS>
__global__ void residual_layer_norm_kernel(T* __restrict__ x, const T* __restrict__ pending, const T* __restrict__ weight,
                                           const T* __restrict__ beta, T* __restrict__ y, int width, float eps) {
  __shared__ float scratch[32];
  using P = Pack<T, kVec>;
  const int packs = width / kVec;
  P* row = reinterpret_cast<P*>(x + static_cast<int64_t>(blockIdx.x) * width);
  float v[PACKS][kVec];
  float sum = 0.f;
  unclip_rt::allow_dependents();  // the next kernel may start now (pdl.cuh)
  P w_pre[PACKS], b_pre[PACKS];  // the norm's weight and bias, before the wait: no kernel in a loop writes them
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    const int p = threadIdx.x + k * blockDim.x;
    if (p < packs) {
      w_pre[k] = reinterpret_cast<const P*>(weight)[p];
      b_pre[k] = reinterpret_cast<const P*>(beta)[p];
    }
  }
  unclip_rt::wait_for_producers();  // x is the output of the kernels before (pdl.cuh)
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    const int p = threadIdx.x + k * blockDim.x;
    if (p >= packs) break;
    P a = row[p];
    if (pending != nullptr) {
      const P bias = reinterpret_cast<const P*>(pending)[p];
#pragma unroll
      for (int e = 0; e < kVec; ++e) a.v[e] = from_float<T>(to_float(a.v[e]) + to_float(bias.v[e]));
      row[p] = a;  // the residual stream keeps the rounded sum, as a separate add would
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      v[k][e] = to_float(a.v[e]);
      sum += v[k][e];
    }
  }
  const float mean = block_sum(sum, scratch) / width;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    if (threadIdx.x + k * blockDim.x >= packs) break;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float d = v[k][e] - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) / width + eps);
  P* out = reinterpret_cast<P*>(y + static_cast<int64_t>(blockIdx.x) * width);
#pragma unroll
  for (int k = 0; k < PACKS; ++k) {
    const int p = threadIdx.x + k * blockDim.x;
    if (p >= packs) break;
    const P w = w_pre[k], b = b_pre[k];
    P o;
#pragma unroll
    for (int e = 0; e < kVec; ++e) o.v[e] = from_float<T>((v[k][e] - mean) * rstd * to_float(w.v[e]) + to_float(b.v[e]));
    out[p] = o;
  }
}

}  // namespace

// x [rows, width] contiguous fp16/bf16 (updated in place when `pending` is given: x += pending);
// weight, beta [width] in x's dtype. Returns LayerNorm(x) [rows, width]. width: a multiple of 8,
// at most 8 * 4 * 256 = 8192. weight and beta are read before the kernel launched just before this
// one has finished (pdl.cuh): that kernel must not write them (none does inside a sampling loop).
at::Tensor residual_layer_norm(at::Tensor& x, const c10::optional<at::Tensor>& pending, const at::Tensor& weight,
                               const at::Tensor& beta, double eps) {
  unclip_rt::check_half_matrix(x, "residual_layer_norm", "x");
  const int64_t width = x.size(1);
  TORCH_CHECK(width % kVec == 0 && width <= kVec * kMaxPacksPerThread * kMaxThreads,
              "residual_layer_norm: width must be a multiple of 8, at most 8192");
  const auto check_vector = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == width && t.is_contiguous() && t.scalar_type() == x.scalar_type() &&
                    t.device() == x.device() && unclip_rt::aligned16(t),
                "residual_layer_norm: ", name, " must be a contiguous aligned [width] vector in x's dtype");
  };
  check_vector(weight, "weight");
  check_vector(beta, "beta");
  if (pending) check_vector(*pending, "pending");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  if (x.size(0) == 0) return y;
  const int packs = static_cast<int>(width / kVec);
  const int per_thread = (packs + kMaxThreads - 1) / kMaxThreads;
  const int threads = ((packs + per_thread - 1) / per_thread + 31) / 32 * 32;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* pend = pending ? reinterpret_cast<const T*>(pending->data_ptr()) : nullptr;
    const auto args = std::make_tuple(reinterpret_cast<T*>(x.data_ptr()), pend,
                                      reinterpret_cast<const T*>(weight.data_ptr()),
                                      reinterpret_cast<const T*>(beta.data_ptr()), reinterpret_cast<T*>(y.data_ptr()),
                                      static_cast<int>(width), static_cast<float>(eps));
    const auto run = [&](auto kernel) {
      std::apply([&](auto... a) {
        unclip_rt::launch_overlapped(kernel, dim3(static_cast<unsigned>(x.size(0))), dim3(threads), 0,
                                     stream.stream(), a...);
      }, args);
    };
    switch (per_thread) {
      case 1: run(residual_layer_norm_kernel<T, 1>); break;
      case 2: run(residual_layer_norm_kernel<T, 2>); break;
      case 3: run(residual_layer_norm_kernel<T, 3>); break;
      default: run(residual_layer_norm_kernel<T, 4>); break;
    }
  };
  unclip_rt::dispatch_half_like(x, launch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}
