// The decoder attention of its small maps in one kernel: each sample's queries against its image
// keys (read from the QKV projection's rows) and its context tokens' cached keys (read from the
// cache, the dropped tokens masked), with no packed copy of the keys and no second launch.
//
// Why: at the decoder's 16x16 and 8x8 maps an attention block is a few MFLOP, and its time is
// latency: the key/value pack (a launch of its own) and flash attention's varlen kernel, whose
// 128-query tiles leave half their rows empty at 8x8. Here a block of 4 warps takes 64 queries of
// one (sample, head), each warp 16, and walks the keys in blocks of 64 staged in shared memory
// (cp.async, double-buffered), with online softmax on the tensor cores (mma.sync m16n8k16, float32
// accumulation) as flash attention does. Head size 64, fp16.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>

#include "half_tensors.h"
#include "pdl.cuh"
#include "tensor_core.cuh"

namespace {

constexpr int kHead = 64;     // channels per head
constexpr int kQueries = 64;  // queries per block: 4 warps of 16
constexpr int kKeys = 64;     // keys per staged block
constexpr int kStride = 72;   // a staged row in halves: 144 bytes, so ldmatrix's 8 rows hit distinct banks
constexpr int kThreads = 128;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __half* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __half* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

struct Problem {
  const __half* qkv;  // [B * hw, heads * 3 * ch], per head [q | k | v]
  const __half* ctx;  // [B, 2, heads, N, ch]: keys at 0, values at 1; each [heads, N, ch] contiguous
  int64_t ctx_b, ctx_kv;
  const bool* keep;  // [B, N]: false for a dropped (padding) context token
  __half* out;       // [B * hw, heads * ch]
  int hw, n_ctx, heads;
  float scale_log2;  // 1/sqrt(ch) * log2(e): scores in base 2
};

// Where key k of sample b, head h starts (its keys; values at +ch in the QKV row, +ctx_kv in the
// cache), or nullptr past the keys.
__device__ __forceinline__ const __half* key_at(const Problem& p, int b, int h, int k) {
  if (k < p.hw) return p.qkv + (static_cast<int64_t>(b) * p.hw + k) * p.heads * 3 * kHead + h * 3 * kHead + kHead;
  if (k < p.hw + p.n_ctx)
    return p.ctx + b * p.ctx_b + (static_cast<int64_t>(h) * p.n_ctx + (k - p.hw)) * kHead;
  return nullptr;
}

__device__ __forceinline__ bool key_kept(const Problem& p, int b, int k) {
  if (k < p.hw) return true;
  if (k >= p.hw + p.n_ctx) return false;
  return p.keep == nullptr || p.keep[static_cast<int64_t>(b) * p.n_ctx + (k - p.hw)];
}

// Stage key block kb (keys and values) of (b, h) into ks / vs: 64 rows of 8 16-byte chunks each.
__device__ __forceinline__ void stage_keys(const Problem& p, int b, int h, int kb, __half* ks, __half* vs) {
  for (int c = threadIdx.x; c < kKeys * kHead / 8; c += kThreads) {
    const int r = c / (kHead / 8), col = (c % (kHead / 8)) * 8;
    const __half* k = key_at(p, b, h, kb * kKeys + r);
    const __half* v = k == nullptr ? nullptr : (kb * kKeys + r < p.hw ? k + kHead : k + p.ctx_kv);
    cp_async16(ks + r * kStride + col, k != nullptr ? k + col : p.qkv, k != nullptr);
    cp_async16(vs + r * kStride + col, v != nullptr ? v + col : p.qkv, v != nullptr);
  }
}

// grid (query tiles of 64, heads, B), 128 threads.
__global__ void __launch_bounds__(kThreads) small_attention_kernel(Problem p) {
  __shared__ __align__(16) __half qs[kQueries * kStride];
  __shared__ __align__(16) __half ks[2][kKeys * kStride];
  __shared__ __align__(16) __half vs[2][kKeys * kStride];
  unclip_rt::wait_for_producers();  // pdl.cuh: the QKV rows come from the kernel before
  unclip_rt::allow_dependents();
  const int tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int q0 = tile * kQueries;
  for (int c = threadIdx.x; c < kQueries * kHead / 8; c += kThreads) {
    const int r = c / (kHead / 8), col = (c % (kHead / 8)) * 8, q = q0 + r;
    const __half* src = p.qkv + (static_cast<int64_t>(b) * p.hw + q) * p.heads * 3 * kHead + h * 3 * kHead + col;
    cp_async16(qs + r * kStride + col, q < p.hw ? src : p.qkv, q < p.hw);
  }
  const int blocks = (p.hw + p.n_ctx + kKeys - 1) / kKeys;
  stage_keys(p, b, h, 0, ks[0], vs[0]);
  cp_async_commit();

  uint32_t qf[kHead / 16][4];  // the warp's 16 queries as A fragments, per 16 channels
  float o[kHead / 8][4] = {};  // output accumulators, per 8 channels (rows g and g + 8)
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // running max (base 2) and sum, rows g, g + 8
  for (int kb = 0; kb < blocks; ++kb) {
    const int buf = kb & 1;
    if (kb + 1 < blocks) stage_keys(p, b, h, kb + 1, ks[buf ^ 1], vs[buf ^ 1]);
    cp_async_commit();
    cp_async_wait<1>();  // this block's keys (and, the first time, the queries) have landed
    __syncthreads();
    if (kb == 0) {
#pragma unroll
      for (int c = 0; c < kHead / 16; ++c)
        ldmatrix_x4(qf[c], qs + (warp * 16 + (lane & 15)) * kStride + c * 16 + (lane >> 4) * 8);
    }
    // scores s = q·k for the block's 64 keys: 8 tiles of 8 keys
    float s[kKeys / 8][4];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int c = 0; c < kHead / 16; c += 2) {
        uint32_t kf[4];  // B fragments of channel steps c and c + 1
        ldmatrix_x4(kf, ks[buf] + (j * 8 + (lane & 7)) * kStride + c * 16 + (lane >> 3) * 8);
        unclip_rt::mma_16816<__half>(s[j], qf[c][0], qf[c][1], qf[c][2], qf[c][3], kf[0], kf[1]);
        unclip_rt::mma_16816<__half>(s[j], qf[c + 1][0], qf[c + 1][1], qf[c + 1][2], qf[c + 1][3], kf[2], kf[3]);
      }
    }
    // mask and scale; the block's row maxima
    float block_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool kept = key_kept(p, b, kb * kKeys + j * 8 + 2 * t + e);
        s[j][e] = kept ? s[j][e] * p.scale_log2 : -INFINITY;
        s[j][2 + e] = kept ? s[j][2 + e] * p.scale_log2 : -INFINITY;
        block_max[0] = fmaxf(block_max[0], s[j][e]);
        block_max[1] = fmaxf(block_max[1], s[j][2 + e]);
      }
    }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
      block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 2));
      const float m_new = fmaxf(m[r], block_max[r]);  // finite: every query sees the image keys of block 0
      correction[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= correction[r];
    }
#pragma unroll
    for (int d = 0; d < kHead / 8; ++d) {
      o[d][0] *= correction[0];
      o[d][1] *= correction[0];
      o[d][2] *= correction[1];
      o[d][3] *= correction[1];
    }
    // probabilities (this thread's share of each row's sum), then o += p·v, 16 keys a step
#pragma unroll
    for (int c = 0; c < kKeys / 16; ++c) {
      uint32_t a[4];
      float pr[2][4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float* sj = s[2 * c + half];
        pr[half][0] = exp2f(sj[0] - m[0]);
        pr[half][1] = exp2f(sj[1] - m[0]);
        pr[half][2] = exp2f(sj[2] - m[1]);
        pr[half][3] = exp2f(sj[3] - m[1]);
        l[0] += pr[half][0] + pr[half][1];
        l[1] += pr[half][2] + pr[half][3];
      }
      a[0] = pack_half2(pr[0][0], pr[0][1]);  // row g, keys 2t, 2t + 1
      a[1] = pack_half2(pr[0][2], pr[0][3]);  // row g + 8
      a[2] = pack_half2(pr[1][0], pr[1][1]);  // row g, keys 2t + 8, 2t + 9
      a[3] = pack_half2(pr[1][2], pr[1][3]);  // row g + 8
#pragma unroll
      for (int d = 0; d < kHead / 8; d += 2) {
        uint32_t vf[4];  // B fragments of channel tiles d and d + 1
        ldmatrix_x4_trans(vf, vs[buf] + (c * 16 + (lane & 15)) * kStride + (d + (lane >> 4)) * 8);
        unclip_rt::mma_16816<__half>(o[d], a[0], a[1], a[2], a[3], vf[0], vf[1]);
        unclip_rt::mma_16816<__half>(o[d + 1], a[0], a[1], a[2], a[3], vf[2], vf[3]);
      }
    }
    __syncthreads();  // the next iteration stages over this block's buffers
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const float inv[2] = {1.f / l[0], 1.f / l[1]};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = q0 + warp * 16 + g + 8 * r;
    if (q >= p.hw) continue;
    __half* row = p.out + (static_cast<int64_t>(b) * p.hw + q) * p.heads * kHead + h * kHead + 2 * t;
#pragma unroll
    for (int d = 0; d < kHead / 8; ++d)
      *reinterpret_cast<__half2*>(row + d * 8) = __floats2half2_rn(o[d][2 * r] * inv[r], o[d][2 * r + 1] * inv[r]);
  }
}

}  // namespace

// qkv [B * hw, heads * 3 * 64] fp16 contiguous (per head [q | k | v]); context_kv [B, 2, heads, N,
// 64] (keys at index 0, values at 1; each [heads, N, 64] block contiguous, a strided view is fine);
// keep [B, N] bool (False: a padding token). Returns [B * hw, heads * 64]: softmax(q·kᵀ/8)·v of each
// query over its sample's image keys and kept context tokens (SDPA's result with the padding masked).
at::Tensor small_map_attention(const at::Tensor& qkv, const at::Tensor& context_kv, const at::Tensor& keep) {
  unclip_rt::check_half_matrix(qkv, "small_map_attention", "qkv");
  unclip_rt::check_kv_blocks(context_kv, qkv, "small_map_attention", "context_kv");
  TORCH_CHECK(qkv.scalar_type() == at::kHalf, "small_map_attention: fp16 only");
  const int64_t batch = context_kv.size(0), heads = context_kv.size(2), n_ctx = context_kv.size(3);
  TORCH_CHECK(context_kv.size(4) == kHead, "small_map_attention: heads of 64 channels only");
  TORCH_CHECK(qkv.size(1) == heads * 3 * kHead && qkv.size(0) % batch == 0,
              "small_map_attention: qkv must be [B * hw, heads * 3 * 64]");
  TORCH_CHECK(n_ctx >= 1, "small_map_attention: no context tokens");
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == batch && keep.size(1) == n_ctx && keep.is_contiguous() &&
                  keep.scalar_type() == at::kBool && keep.device() == qkv.device(),
              "small_map_attention: keep must be a contiguous bool [B, N] on qkv's device");
  TORCH_CHECK(context_kv.stride(0) % 8 == 0 && context_kv.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(context_kv.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(qkv.data_ptr()) % 16 == 0,
              "small_map_attention: the operands must be 16-byte aligned");
  const int64_t hw = qkv.size(0) / batch;
  TORCH_CHECK(hw >= 1 && hw + n_ctx < (int64_t{1} << 30), "small_map_attention: sizes out of range");
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto out = at::empty({batch * hw, heads * kHead}, qkv.options());
  Problem p{reinterpret_cast<const __half*>(qkv.data_ptr()), reinterpret_cast<const __half*>(context_kv.data_ptr()),
            context_kv.stride(0), context_kv.stride(1), keep.data_ptr<bool>(),
            reinterpret_cast<__half*>(out.data_ptr()), static_cast<int>(hw), static_cast<int>(n_ctx),
            static_cast<int>(heads), 0.125f * 1.4426950408889634f};
  const dim3 grid(static_cast<unsigned>((hw + kQueries - 1) / kQueries), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  unclip_rt::launch_overlapped(small_attention_kernel, grid, dim3(kThreads), 0, c10::cuda::getCurrentCUDAStream(), p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
