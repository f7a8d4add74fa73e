// The diffusion prior's cached step: the step tokens' attention over [cached caption keys | their
// own keys], straight from the QKV projection's output (Karlo's per-head [q|k|v] layout) and the
// cache, with the caption's padding mask and the causal mask among the step tokens built in;
// scores, softmax and the weighted sum in float32. Per layer it replaces two concatenations of
// the cache, the mask's cast, SDPA (cuDNN's flash kernel is tuned for long sequences, not these
// 3 x 81 scores) and a transposing copy. The cached keys/values and the caption mask are
// staged before the kernel waits for the QKV projection (cp.async, no registers held), so after
// it only the step tokens' q/k/v are read. The score reads are rotated per key and the weighted
// sum runs a thread per (key stripe, 8 channels) over every step token at once, so that neither
// phase has shared-memory bank conflicts (earlier versions, a warp per key or a thread per
// (token, key), were slower; docs/speed.md).

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

namespace {

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;

template <typename U>
__device__ __forceinline__ float* align16(U* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 15) & ~uintptr_t{15});
}

constexpr int kMaxTokens = 4;  // the most step tokens per sample prior_step_attention takes

constexpr int kThreads = 256;

__device__ __forceinline__ void copy16_async(void* shared, const void* global) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global));
}

// One block per (sample, head): T step queries over P cached keys and the T step keys; ch (the
// head size) a power of two from 8 to 256, so that a row's 16-byte packs (ch / 8 of them) divide
// a warp. Shared memory: q [T][ch] float (pre-scaled), scores [T][P + T] float, the caption mask
// as 0 / -inf [P], the warps' partial outputs [warps][T][ch] float, keys and values [P + T][ch].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    prior_step_attention_kernel(const T* __restrict__ qkv, const T* __restrict__ past,
                                const bool* __restrict__ keep, T* __restrict__ out, int tokens, int heads,
                                int ch, int past_len, int mask_len, int64_t past_b, int64_t past_kv, float scale) {
  unclip_rt::allow_dependents();  // the next kernel may start now (pdl.cuh)
  extern __shared__ float smem[];
  using P8 = Pack<T, 8>;
  constexpr int kWarps = kThreads / 32;
  const int keys = past_len + tokens, slices = ch / 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* q = smem;
  float* scores = q + tokens * ch;
  float* caption_bias = scores + tokens * keys;
  float* partial = align16(caption_bias + past_len);
  T* k_s = reinterpret_cast<T*>(align16(partial + kWarps * tokens * ch));
  T* v_s = k_s + keys * ch;
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const int64_t row_stride = static_cast<int64_t>(heads) * 3 * ch;  // one token's qkv row
  const T* qkv_b = qkv + static_cast<int64_t>(b) * tokens * row_stride + static_cast<int64_t>(h) * 3 * ch;
  const T* k_past = past + b * past_b + static_cast<int64_t>(h) * past_len * ch;
  const T* v_past = k_past + past_kv;
  // the cache and the mask are older than the kernel before this one (pdl.cuh): stage them now
  for (int i = threadIdx.x; i < past_len * slices; i += kThreads) {
    copy16_async(reinterpret_cast<uint4*>(k_s) + i, reinterpret_cast<const uint4*>(k_past) + i);
    copy16_async(reinterpret_cast<uint4*>(v_s) + i, reinterpret_cast<const uint4*>(v_past) + i);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
  for (int j = threadIdx.x; j < past_len; j += kThreads)
    caption_bias[j] = j >= mask_len || keep[static_cast<int64_t>(b) * mask_len + j] ? 0.f : -INFINITY;
  unclip_rt::wait_for_producers();  // the step tokens' qkv is the kernel before's output
  for (int i = threadIdx.x; i < tokens * slices; i += kThreads) {
    const int t = i / slices, d8 = i % slices;
    const T* row = qkv_b + t * row_stride + d8 * 8;
    const P8 qp = *reinterpret_cast<const P8*>(row);
    reinterpret_cast<P8*>(k_s)[(past_len + t) * slices + d8] = *reinterpret_cast<const P8*>(row + ch);
    reinterpret_cast<P8*>(v_s)[(past_len + t) * slices + d8] = *reinterpret_cast<const P8*>(row + 2 * ch);
#pragma unroll
    for (int e = 0; e < 8; ++e) q[t * ch + d8 * 8 + e] = to_float(qp.v[e]) * scale;
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
  // Scores, a thread per (query, key); key j's packs are read from pack j mod ch/8 on, so that
  // neighbouring threads' keys fall on different banks; masked keys get -inf (the caption's
  // padding among the cached keys, the causal order among the step tokens).
  for (int i = threadIdx.x; i < tokens * keys; i += kThreads) {
    const int t = i / keys, j = i % keys;
    const P8* k_row = reinterpret_cast<const P8*>(k_s + j * ch);
    const float* q_row = q + t * ch;
    float dot0 = 0.f, dot1 = 0.f;  // two chains of dependent adds instead of one
    for (int d = 0; d < slices; ++d) {
      const int d8 = (d + j) & (slices - 1);
      const P8 kp = k_row[d8];
      const float4 qa = reinterpret_cast<const float4*>(q_row + d8 * 8)[0];
      const float4 qb = reinterpret_cast<const float4*>(q_row + d8 * 8)[1];
      dot0 = fmaf(qa.x, to_float(kp.v[0]), dot0);
      dot1 = fmaf(qa.y, to_float(kp.v[1]), dot1);
      dot0 = fmaf(qa.z, to_float(kp.v[2]), dot0);
      dot1 = fmaf(qa.w, to_float(kp.v[3]), dot1);
      dot0 = fmaf(qb.x, to_float(kp.v[4]), dot0);
      dot1 = fmaf(qb.y, to_float(kp.v[5]), dot1);
      dot0 = fmaf(qb.z, to_float(kp.v[6]), dot0);
      dot1 = fmaf(qb.w, to_float(kp.v[7]), dot1);
    }
    const float mask = j < past_len ? caption_bias[j] : (j - past_len <= t ? 0.f : -INFINITY);
    scores[i] = dot0 + dot1 + mask;
  }
  __syncthreads();
  // Softmax per query: one warp each.
  for (int t = warp; t < tokens; t += kWarps) {
    float* row = scores + t * keys;
    float mx = -INFINITY;
    for (int j = lane; j < keys; j += 32) mx = fmaxf(mx, row[j]);
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    float sum = 0.f;
    for (int j = lane; j < keys; j += 32) {
      const float e = __expf(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffff, sum, o);
    const float inv = 1.f / sum;
    for (int j = lane; j < keys; j += 32) row[j] *= inv;
  }
  __syncthreads();
  // Weighted sum of values: thread (stripe, pack p) sums keys stripe, stripe + stripes, ... of
  // channels [8p, 8p + 8) for every step token (each value pack read once); a warp's stripes meet
  // by shuffles (lanes p, p + ch/8, ...), the warps' sums in shared memory.
  {
    const int p = threadIdx.x & (slices - 1), stripe = threadIdx.x / slices, stripes = kThreads / slices;
    float acc[kMaxTokens][8] = {};
    for (int j = stripe; j < keys; j += stripes) {
      const P8 vp = reinterpret_cast<const P8*>(v_s + j * ch)[p];
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t) {
        if (t < tokens) {
          const float w = scores[t * keys + j];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[t][e] = fmaf(w, to_float(vp.v[e]), acc[t][e]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        for (int o = slices; o < 32; o *= 2) acc[t][e] += __shfl_xor_sync(0xffffffff, acc[t][e], o);
    }
    if (lane < slices) {
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t) {
        if (t >= tokens) break;
        float4* dst = reinterpret_cast<float4*>(partial + (warp * tokens + t) * ch + p * 8);
        dst[0] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
        dst[1] = make_float4(acc[t][4], acc[t][5], acc[t][6], acc[t][7]);
      }
    }
  }
  __syncthreads();
  // Written token-major [b * tokens + t, h * ch + d] for the projection.
  for (int i = threadIdx.x; i < tokens * ch; i += kThreads) {
    const int t = i / ch, d = i % ch;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[(w * tokens + t) * ch + d];
    out[(static_cast<int64_t>(b) * tokens + t) * heads * ch + static_cast<int64_t>(h) * ch + d] = from_float<T>(v);
  }
}

}  // namespace

// Attention of `tokens` step tokens per sample: qkv [B * tokens, heads * 3 * ch] (per head
// [q | k | v]), past [B, 2, heads, P, ch] (keys at index 0, values at 1; may be a strided view,
// with each [heads, P, ch] block contiguous), keep [B, mask_len] bool (False: that cached key is
// padding). Returns [B * tokens, heads * ch]. Launched overlapped (pdl.cuh): `past` and `keep` are
// read before the kernel launched just before this one has finished, so that kernel must not
// write them (a sampling loop writes them once, before its first step).
at::Tensor prior_step_attention(const at::Tensor& qkv, const at::Tensor& past, const at::Tensor& keep,
                                int64_t heads) {
  unclip_rt::check_half_matrix(qkv, "prior_step_attention", "qkv");
  unclip_rt::check_kv_blocks(past, qkv, "prior_step_attention", "past");
  TORCH_CHECK(past.size(2) == heads, "prior_step_attention: past must have `heads` heads");
  const int64_t batch = past.size(0), past_len = past.size(3), ch = past.size(4);
  TORCH_CHECK(qkv.size(1) == heads * 3 * ch && qkv.size(0) % batch == 0,
              "prior_step_attention: qkv must be [B * tokens, heads * 3 * ch]");
  const int64_t tokens = qkv.size(0) / batch;
  TORCH_CHECK(tokens >= 1 && tokens <= kMaxTokens, "prior_step_attention: 1 to ", std::to_string(kMaxTokens),
              " step tokens per sample");
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == batch && keep.size(1) <= past_len && keep.is_contiguous() &&
                  keep.scalar_type() == at::kBool && keep.device() == qkv.device(),
              "prior_step_attention: keep must be a contiguous bool [B, mask_len <= P] on qkv's device");
  TORCH_CHECK(ch >= 8 && ch <= 256 && (ch & (ch - 1)) == 0,
              "prior_step_attention: the head size must be a power of two from 8 to 256");
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto out = at::empty({batch * tokens, heads * ch}, qkv.options());
  // q, scores, mask, the warps' partial sums (float, each start 16-byte aligned), keys and values
  const size_t smem = sizeof(float) * (tokens * (ch + past_len + tokens) + past_len + (kThreads / 32) * tokens * ch) +
                      32 + qkv.element_size() * 2 * (past_len + tokens) * ch;
  int most = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, qkv.get_device()));
  TORCH_CHECK(smem <= static_cast<size_t>(most), "prior_step_attention: too many keys for one block (",
              std::to_string(smem), " bytes of shared memory, the GPU has ", std::to_string(most), ")");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float scale = 1.f / sqrtf(static_cast<float>(ch));
  const int blocks = static_cast<int>(batch * heads);
  const auto args = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(prior_step_attention_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    unclip_rt::launch_overlapped(
        prior_step_attention_kernel<T>, dim3(blocks), dim3(kThreads), smem, stream.stream(), reinterpret_cast<const T*>(qkv.data_ptr()), reinterpret_cast<const T*>(past.data_ptr()),
        keep.data_ptr<bool>(), reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(tokens), static_cast<int>(heads),
        static_cast<int>(ch), static_cast<int>(past_len), static_cast<int>(keep.size(1)), past.stride(0),
        past.stride(1), scale);
  };
  unclip_rt::dispatch_half_like(qkv, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
