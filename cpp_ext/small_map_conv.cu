// Convolutions of small maps (a few hundred output pixels: the decoder's 8² and 16² maps at the
// guided batch) as an implicit GEMM whose K loop is split over a thread-block cluster, the parts
// added through distributed shared memory in a fixed order, in one launch.
//
// Why: such a product has few output tiles and a long K loop, and its weights take longer to read
// than the tensor cores take to use them, so one tile per SM leaves most SMs idle while the
// weights trickle in. Splitting K gives every SM a share of the weights. The parts never touch
// global memory and no copy of the neighbourhoods is made (what made earlier splits lose:
// docs/kernels.md): each block reads its rows' neighbourhoods straight from the map (cp.async with
// zero fill where a tap reaches into the padding), keeps its float32 part in shared memory, and
// each block of the cluster adds every block's part over one slice of the tile's rows, rank 0
// first (deterministic), then the bias, rounding once.
//
// Block (split s, feature tile n, row tile m): rows [128m, 128m + 128) of the product (output
// pixels, NHWC order), features [BN·n, BN·n + BN), k-steps [s·per, (s + 1)·per) of 64 input
// channels of one tap each (K in the channels-last weight's (tap, channel) order). Operands staged
// through a ring of shared-memory stages by cp.async, multiplied by mma.sync m16n8k16 from
// ldmatrix fragments, float32 accumulation. fp16 only; Hopper (sm_90) or newer (clusters).

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "half_tensors.h"
#include "pdl.cuh"
#include "tensor_core.cuh"

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;              // 8 warps
constexpr int kRows = 128;                 // output pixels per block
constexpr int kStep = 64;                  // input channels per k-step (one tap)
constexpr int kRowBytes = 2 * kStep + 16;  // a staged row, padded: ldmatrix's 8 rows hit distinct banks
constexpr int kMostSplits = 8;  // a portable cluster

struct Geometry {
  int h, w, cin;           // the input map (NHWC) and its channels
  int oh, ow, kw, ph, pw;  // output map, kernel width, padding
  int cout, rows;          // output channels, output pixels (batch · oh · ow)
  int channel_steps;       // k-steps per tap: cin / 64
  int per_split;           // k-steps per split (the last splits may have fewer, or none)
  int steps;               // all k-steps: taps · channel_steps
  int64_t k;               // the weight's row: taps · cin
};

template <int BN, int kStages>
constexpr int smem_bytes() {
  constexpr int ring = kStages * (kRows + BN) * kRowBytes;
  constexpr int parts = kRows * (BN + 4) * 4;
  return ring > parts ? ring : parts;
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, through L2 only; `bytes` 0 writes zeros (the padding).
__device__ __forceinline__ void copy16(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void wait_groups() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix4(unsigned addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

#endif

template <int BN, int kStages>
__global__ void __launch_bounds__(kThreads)
    small_map_conv_kernel(const __half* __restrict__ x, const __half* __restrict__ weight,
                          const __half* __restrict__ bias, __half* __restrict__ out, Geometry g) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int WM = BN == 128 ? 2 : 4;  // warps along the rows
  constexpr int WN = 8 / WM;             // warps along the features
  constexpr int MT = kRows / WM / 16;    // 16-row mma tiles per warp
  constexpr int NT = BN / WN / 8;        // 8-feature mma tiles per warp
  static_assert(NT % 2 == 0, "B fragments come in pairs of 8-feature tiles");
  constexpr int kA = kRows * kRowBytes;
  constexpr int kStageBytes = (kRows + BN) * kRowBytes;
  constexpr int kBLoads = BN * 8 / kThreads;  // 16-byte weight loads per thread and stage
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n0 = blockIdx.y * BN, m0 = blockIdx.z * kRows;
  const int first = blockIdx.x * g.per_split;
  const int count = max(0, min(g.steps, first + g.per_split) - first);

  // The thread's loads: 16-byte column `col` of rows (tid / 8) + 32q of the stage's tiles.
  const int col = tid % 8, row0 = tid / 8;
  int pix_y[4], pix_x[4];
  int64_t pix_base[4];  // the row's image's first element in x
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int m = m0 + row0 + 32 * q;
    const int image = m / (g.oh * g.ow), rem = m % (g.oh * g.ow);
    pix_y[q] = m < g.rows ? rem / g.ow : -(1 << 20);  // rows past the end read only padding
    pix_x[q] = rem % g.ow;
    pix_base[q] = static_cast<int64_t>(image) * g.h * g.w * g.cin;
  }
  const unsigned ring = smem_addr(smem);

  const auto load_weights = [&](int step, int stage) {
    const int tap = step / g.channel_steps, c0 = (step % g.channel_steps) * kStep;
    const int64_t k0 = static_cast<int64_t>(tap) * g.cin + c0 + col * 8;
    const unsigned base = ring + stage * kStageBytes + kA;
#pragma unroll
    for (int q = 0; q < kBLoads; ++q) {
      const int n = row0 + 32 * q;
      copy16(base + n * kRowBytes + col * 16, weight + static_cast<int64_t>(n0 + n) * g.k + k0, 16);
    }
  };
  const auto load_inputs = [&](int step, int stage) {
    const int tap = step / g.channel_steps, c0 = (step % g.channel_steps) * kStep;
    const int r = tap / g.kw, s = tap % g.kw;
    const unsigned base = ring + stage * kStageBytes;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int iy = pix_y[q] + r - g.ph, ix = pix_x[q] + s - g.pw;
      const bool inside = iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
      const __half* src = inside ? x + pix_base[q] + (static_cast<int64_t>(iy) * g.w + ix) * g.cin + c0 + col * 8 : x;
      copy16(base + (row0 + 32 * q) * kRowBytes + col * 16, src, inside ? 16 : 0);
    }
  };

  // The first stages' weights before the wait: they never come from the kernel before (pdl.cuh).
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < count) load_weights(first + st, st);
  }
  unclip_rt::wait_for_producers();
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < count) load_inputs(first + st, st);
    commit();  // group st: stage st's inputs (group 0 also every weight load above)
  }

  const int wm = warp / WN, wn = warp % WN;
  float acc[MT][NT][4] = {};
  for (int j = 0; j < count; ++j) {
    wait_groups<kStages - 2>();  // stage j % kStages has landed (this thread's copies) ...
    __syncthreads();             // ... everyone's, and stage (j - 1) % kStages is free again
    const int next = j + kStages - 1;
    if (next < count) {
      load_weights(first + next, next % kStages);
      load_inputs(first + next, next % kStages);
    }
    commit();
    const unsigned a_base = ring + (j % kStages) * kStageBytes;
    const unsigned b_base = a_base + kA;
#pragma unroll
    for (int kk = 0; kk < kStep / 16; ++kk) {
      uint32_t a[MT][4], b[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = wm * MT * 16 + mt * 16 + (lane & 15);
        ldmatrix4(a_base + row * kRowBytes + (kk * 16 + (lane >> 4) * 8) * 2, a[mt]);
      }
#pragma unroll
      for (int nb = 0; nb < NT / 2; ++nb) {
        const int n = wn * NT * 8 + nb * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r[4];
        ldmatrix4(b_base + n * kRowBytes + (kk * 16 + ((lane >> 3) & 1) * 8) * 2, r);
        b[2 * nb][0] = r[0];
        b[2 * nb][1] = r[1];
        b[2 * nb + 1][0] = r[2];
        b[2 * nb + 1][1] = r[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          unclip_rt::mma_16816<__half>(acc[mt][nt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[nt][0], b[nt][1]);
        }
      }
    }
  }
  unclip_rt::allow_dependents();
  wait_groups<0>();
  __syncthreads();  // the ring is free: it holds this block's part now

  // This block's float32 part, [row][feature] with rows padded by 4 floats.
  constexpr int kPartRow = BN + 4;
  float* part = reinterpret_cast<float*>(smem);
  const int gq = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int row = wm * MT * 16 + mt * 16 + gq, f = wn * NT * 8 + nt * 8 + 2 * t;
      *reinterpret_cast<float2*>(part + row * kPartRow + f) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(part + (row + 8) * kPartRow + f) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's part is in its shared memory

  // Rank r adds the parts of its slice of the tile's rows, rank 0's first, then the bias; rounds once.
  const int splits = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int tile_rows = min(kRows, g.rows - m0);
  const int per = (tile_rows + splits - 1) / splits;
  const int begin = rank * per, end = min(tile_rows, begin + per);
  constexpr int kPacks = BN / 8;
  for (int i = tid; i < (end - begin) * kPacks; i += kThreads) {
    const int row = begin + i / kPacks, f = (i % kPacks) * 8;
    float v[8] = {};
    for (int r = 0; r < splits; ++r) {
      const float* p = cluster.map_shared_rank(part, r) + row * kPartRow + f;
      const float4 lo = *reinterpret_cast<const float4*>(p), hi = *reinterpret_cast<const float4*>(p + 4);
      v[0] += lo.x, v[1] += lo.y, v[2] += lo.z, v[3] += lo.w, v[4] += hi.x, v[5] += hi.y, v[6] += hi.z, v[7] += hi.w;
    }
    if (bias != nullptr) {
      const uint4 packed = *reinterpret_cast<const uint4*>(bias + n0 + f);
      const __half* bh = reinterpret_cast<const __half*>(&packed);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] += __half2float(bh[e]);
    }
    uint4 packed;
    __half2* o = reinterpret_cast<__half2*>(&packed);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = __floats2half2_rn(v[2 * e], v[2 * e + 1]);
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(m0 + row) * g.cout + n0 + f) = packed;
  }
  cluster.sync();  // no block leaves while another still reads its part
#endif
}

template <int BN, int kStages>
void launch(const at::Tensor& x, const at::Tensor& weight, const __half* bias, at::Tensor& y, const Geometry& g,
            int splits, int row_tiles, cudaStream_t stream) {
  const auto kernel = small_map_conv_kernel<BN, kStages>;
  constexpr int smem = smem_bytes<BN, kStages>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(g.cout / BN), static_cast<unsigned>(row_tiles));
  unclip_rt::launch_overlapped_clusters(kernel, grid, dim3(kThreads), dim3(static_cast<unsigned>(splits), 1, 1), smem,
                                        stream, reinterpret_cast<const __half*>(x.data_ptr()),
                                        reinterpret_cast<const __half*>(weight.data_ptr()), bias,
                                        reinterpret_cast<__half*>(y.data_ptr()), g);
}

}  // namespace

// F.conv2d(x, weight, bias, padding=(pad_h, pad_w)) (stride 1) for fp16 channels-last x [B, C, H, W]
// and weight [K, C, kh, kw], channels-last out, float32 accumulation, rounded once: the product's
// K loop split into `splits` (1 to 8) parts over a cluster of blocks, `block_features` (64 or 128)
// output channels per block, operands staged through a ring of `stages` (3, 4 or 6) shared-memory
// stages. C a multiple of 64, K of block_features. Hopper (sm_90) or newer.
at::Tensor small_map_conv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          int64_t pad_h, int64_t pad_w, int64_t block_features, int64_t splits, int64_t stages) {
  const char* op = "small_map_conv";
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.scalar_type() == at::kHalf &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast) && unclip_rt::aligned16(x),
              op, ": x must be a 16-byte aligned fp16 CUDA map [B, C, H, W] in channels-last memory");
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kHalf && weight.device() == x.device() &&
                  weight.is_contiguous(at::MemoryFormat::ChannelsLast) && unclip_rt::aligned16(weight),
              op, ": weight must be a 16-byte aligned fp16 [K, C, kh, kw] in channels-last memory on x's device");
  const int64_t batch = x.size(0), cin = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(weight.size(1) == cin, op, ": weight has ", std::to_string(weight.size(1)), " input channels, x ",
              std::to_string(cin));
  TORCH_CHECK(cin % kStep == 0, op, ": the input channels must be a multiple of 64, got ", std::to_string(cin));
  TORCH_CHECK(block_features == 64 || block_features == 128, op, ": block_features must be 64 or 128");
  TORCH_CHECK(stages == 3 || stages == 4 || stages == 6, op, ": stages must be 3, 4 or 6");
  TORCH_CHECK(cout % block_features == 0, op, ": the output channels (", std::to_string(cout),
              ") must be a multiple of ", std::to_string(block_features));
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0 && pad_h < kh && pad_w < kw, op, ": padding must be in [0, kernel size)");
  const int64_t oh = h + 2 * pad_h - kh + 1, ow = w + 2 * pad_w - kw + 1;
  TORCH_CHECK(batch >= 1 && oh >= 1 && ow >= 1, op, ": empty output");
  const int64_t rows = batch * oh * ow, steps = kh * kw * (cin / kStep);
  TORCH_CHECK(x.numel() < (int64_t{1} << 31) && weight.numel() < (int64_t{1} << 31) && rows * cout < (int64_t{1} << 31),
              op, ": tensors past 2^31 elements are not supported");
  TORCH_CHECK(splits >= 1 && splits <= kMostSplits && splits <= steps, op, ": splits must be in [1, ",
              std::to_string(std::min<int64_t>(kMostSplits, steps)), "]");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cout && bias->is_contiguous() &&
                    bias->scalar_type() == at::kHalf && bias->device() == x.device() && unclip_rt::aligned16(*bias),
                op, ": bias must be a contiguous, 16-byte aligned fp16 [K] vector on x's device");
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  TORCH_CHECK(major >= 9, op, ": needs a Hopper (sm_90) or newer GPU");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({batch, cout, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  Geometry g{};
  g.h = static_cast<int>(h), g.w = static_cast<int>(w), g.cin = static_cast<int>(cin);
  g.oh = static_cast<int>(oh), g.ow = static_cast<int>(ow), g.kw = static_cast<int>(kw);
  g.ph = static_cast<int>(pad_h), g.pw = static_cast<int>(pad_w);
  g.cout = static_cast<int>(cout), g.rows = static_cast<int>(rows);
  g.channel_steps = static_cast<int>(cin / kStep), g.steps = static_cast<int>(steps);
  g.per_split = static_cast<int>((steps + splits - 1) / splits);
  g.k = kh * kw * cin;
  const int row_tiles = static_cast<int>((rows + kRows - 1) / kRows);
  const __half* b = bias ? reinterpret_cast<const __half*>(bias->data_ptr()) : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto by_stages = [&](auto bn) {
    constexpr int BN = decltype(bn)::value;
    const int s = static_cast<int>(splits);
    switch (stages) {
      case 3: launch<BN, 3>(x, weight, b, y, g, s, row_tiles, stream); break;
      case 6: launch<BN, 6>(x, weight, b, y, g, s, row_tiles, stream); break;
      default: launch<BN, 4>(x, weight, b, y, g, s, row_tiles, stream); break;
    }
  };
  if (block_features == 128) {
    by_stages(std::integral_constant<int, 128>{});
  } else {
    by_stages(std::integral_constant<int, 64>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}
