// A stride-1 convolution as a split-K product whose parts meet in a pass of their own, for maps
// with far fewer output tiles than the GPU has SMs (the decoder's 8² and 16² levels at batch 2:
// a 3×3 convolution of 1280 channels on 8² is a GEMM of 128 rows, 1280 columns and a K loop of
// 11,520, ten 128-wide output tiles for 132 SMs, each streaming a tenth of 29.5 MB of weights).
// CUTLASS 4.2's split-K (the stream-K scheduler's) meets a tile's parts one after another in the
// workspace (its separate reduction is switched off, pending fixes), so many parts cost as much
// as they save; here they never wait on each other:
//   1. gather: every output pixel's neighbourhood into a row of `rows` [M, R·S·C] (zeros where it
//      reaches into the padding), the (r, s, c) order of the channels-last weight's memory;
//   2. one batched GEMM on CUTLASS's persistent cooperative Hopper kernel: batch l multiplies
//      columns [l·Kₛ, (l+1)·Kₛ) of `rows` and of the weight (strided views, no copies) into its
//      own float32 part [M, N] of `parts`, so every (tile, part) pair is a CTA of its own;
//   3. meet: out = Σₗ parts[l] (in order: deterministic) + bias (+ residual), rounded to fp16 once.
// The output [N·P·Q, K] row-major is the channels-last map.
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"

#include "conv_shape.h"

namespace unclip_cutlass {
namespace {

using TileShape = cute::Shape<cute::_128, cute::_128, cute::_64>;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::RowMajor, 4,  // no source C
    float, cutlass::layout::RowMajor, 4,
    cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    cutlass::half_t, cutlass::layout::RowMajor, 8,      // rows [M, K]
    cutlass::half_t, cutlass::layout::ColumnMajor, 8,   // the weight [N, K] (K contiguous)
    float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

constexpr int kThreads = 256;

// rows[m, (r·S + s)·C + c] = x[n, p + r − pad_h, q + s − pad_w, c], 16 bytes (8 channels) a thread
__global__ void gather_rows(const uint4* __restrict__ x, uint4* __restrict__ rows, ConvShape p, int out_h, int out_w,
                            int64_t units) {
  const int packs = p.c / 8;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c8 = static_cast<int>(u % packs);
    const int64_t rest = u / packs;
    const int tap = static_cast<int>(rest % (p.r * p.s));
    const int64_t m = rest / (p.r * p.s);
    const int q = static_cast<int>(m % out_w);
    const int64_t nq = m / out_w;
    const int pp = static_cast<int>(nq % out_h);
    const int n = static_cast<int>(nq / out_h);
    const int hi = pp + tap / p.s - p.pad_h, wi = q + tap % p.s - p.pad_w;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (hi >= 0 && hi < p.h && wi >= 0 && wi < p.w) {
      v = x[((static_cast<int64_t>(n) * p.h + hi) * p.w + wi) * packs + c8];
    }
    rows[u] = v;  // u enumerates rows' packs in memory order
  }
}

// out[m, k] = Σₗ parts[l, m, k] + bias[k] (+ residual[m, k]), 8 channels a thread
__global__ void meet_parts(const float4* __restrict__ parts, const __half* __restrict__ bias,
                           const uint4* __restrict__ residual, uint4* __restrict__ out, int64_t packs_per_part,
                           int k, int splits) {
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < packs_per_part;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc[8];
    float4 a = parts[2 * u], b = parts[2 * u + 1];
    acc[0] = a.x; acc[1] = a.y; acc[2] = a.z; acc[3] = a.w;
    acc[4] = b.x; acc[5] = b.y; acc[6] = b.z; acc[7] = b.w;
    for (int l = 1; l < splits; ++l) {
      a = parts[2 * (l * packs_per_part + u)];
      b = parts[2 * (l * packs_per_part + u) + 1];
      acc[0] += a.x; acc[1] += a.y; acc[2] += a.z; acc[3] += a.w;
      acc[4] += b.x; acc[5] += b.y; acc[6] += b.z; acc[7] += b.w;
    }
    if (residual != nullptr) {
      const uint4 r = residual[u];
      const __half2* rh = reinterpret_cast<const __half2*>(&r);
      for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(rh[i]);
        acc[2 * i] += f.x;
        acc[2 * i + 1] += f.y;
      }
    }
    if (bias != nullptr) {
      const int channel = static_cast<int>((u * 8) % k);
      for (int i = 0; i < 8; ++i) acc[i] += __half2float(bias[channel + i]);
    }
    uint4 o;
    __half2* oh = reinterpret_cast<__half2*>(&o);
    for (int i = 0; i < 4; ++i) oh[i] = __floats2half2_rn(acc[2 * i], acc[2 * i + 1]);
    out[u] = o;
  }
}

int blocks_for(int64_t units, int sm_count) {
  const int64_t wanted = (units + kThreads - 1) / kThreads;
  return static_cast<int>(wanted < 8LL * sm_count ? wanted : 8LL * sm_count);
}

typename Gemm::Arguments gemm_arguments(SplitGemmShape const& g, void const* rows, void const* weight, float* parts,
                                        int sm_count) {
  const int64_t k_total = g.k_total;
  typename Kernel::StrideA stride_a = cute::make_stride(k_total, cute::Int<1>{}, static_cast<int64_t>(g.k_part));
  typename Kernel::StrideB stride_b = cute::make_stride(k_total, cute::Int<1>{}, static_cast<int64_t>(g.k_part));
  typename Kernel::StrideD stride_d =
      cute::make_stride(static_cast<int64_t>(g.cols), cute::Int<1>{}, static_cast<int64_t>(g.rows) * g.cols);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {g.rows, g.cols, g.k_part, g.splits},
      {static_cast<cutlass::half_t const*>(rows), stride_a, static_cast<cutlass::half_t const*>(weight), stride_b},
      {{}, nullptr, stride_d, parts, stride_d}};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.hw_info.sm_count = sm_count;
  return args;
}

}  // namespace

SplitGemmShape split_gemm_shape(ConvShape const& p, int splits) {
  const int out_h = p.h + 2 * p.pad_h - p.r + 1, out_w = p.w + 2 * p.pad_w - p.s + 1;
  SplitGemmShape g{};
  g.out_h = out_h;
  g.out_w = out_w;
  g.rows = p.n * out_h * out_w;
  g.cols = p.k;
  g.k_total = p.r * p.s * p.c;
  g.splits = splits;
  g.k_part = splits > 0 ? g.k_total / splits : 0;
  return g;
}

size_t split_gemm_workspace_bytes(ConvShape const& p, int splits, int sm_count) {
  static uint16_t dummy[8];
  const SplitGemmShape g = split_gemm_shape(p, splits);
  return Gemm::get_workspace_size(gemm_arguments(g, dummy, dummy, reinterpret_cast<float*>(dummy), sm_count));
}

int conv_split_gemm(ConvShape const& p, int splits, void const* x, void const* weight, void const* bias,
                    void const* residual, void* out, void* rows, float* parts, void* workspace, int sm_count,
                    cudaStream_t stream) {
  const SplitGemmShape g = split_gemm_shape(p, splits);
  const int64_t gather_units = static_cast<int64_t>(g.rows) * (g.k_total / 8);
  gather_rows<<<blocks_for(gather_units, sm_count), kThreads, 0, stream>>>(
      static_cast<const uint4*>(x), static_cast<uint4*>(rows), p, g.out_h, g.out_w, gather_units);
  if (cudaGetLastError() != cudaSuccess) return 4000;

  auto args = gemm_arguments(g, rows, weight, parts, sm_count);
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return 1000 + static_cast<int>(status);
  status = gemm.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return 2000 + static_cast<int>(status);
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return 3000 + static_cast<int>(status);

  const int64_t packs = static_cast<int64_t>(g.rows) * g.cols / 8;
  meet_parts<<<blocks_for(packs, sm_count), kThreads, 0, stream>>>(
      reinterpret_cast<const float4*>(parts), static_cast<const __half*>(bias), static_cast<const uint4*>(residual),
      static_cast<uint4*>(out), packs, g.cols, g.splits);
  if (cudaGetLastError() != cudaSuccess) return 4001;
  return 0;
}

}  // namespace unclip_cutlass
