// The diffusion prior's cached step: the step tokens' attention over [cached caption keys | their
// own keys], straight from the QKV projection's output (Karlo's per-head [q|k|v] layout) and the
// cache, with the caption's padding mask and the causal mask among the step tokens built in;
// scores, softmax and the weighted sum in float32. Per layer it replaces two concatenations of
// the cache, the mask's cast, SDPA (cuDNN's flash kernel, tuned for long sequences, took 9 us for
// these 3 x 81 scores) and a transposing copy: 6 launches, on an H100 about 0.5 ms of the
// 2.4 ms step at one image.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>

#include "elementwise.cuh"

namespace {

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;

constexpr int kMaxTokens = 4;  // the most step tokens per sample prior_step_attention takes

// One block per (sample, head): T step queries over P cached keys and the T step keys. The
// keys and values are first staged in shared memory by the whole block (coalesced, many loads
// in flight), then scores, softmax and the weighted sum run from there in float32.
template <typename T>
__global__ void prior_step_attention_kernel(const T* __restrict__ qkv, const T* __restrict__ past,
                                            const bool* __restrict__ keep, T* __restrict__ out, int tokens,
                                            int heads, int ch, int past_len, int mask_len, int64_t past_b,
                                            int64_t past_kv, float scale) {
  extern __shared__ float smem[];
  const int keys = past_len + tokens;
  float* q = smem;                    // [tokens][ch], pre-scaled
  float* scores = q + tokens * ch;    // [tokens][keys]
  // [keys][ch], 16-byte aligned for the vector stores
  T* k_s = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scores + tokens * keys) + 15) & ~uintptr_t{15});
  T* v_s = k_s + keys * ch;                               // [keys][ch]
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const int64_t row_stride = static_cast<int64_t>(heads) * 3 * ch;  // one token's qkv row
  const T* qkv_b = qkv + static_cast<int64_t>(b) * tokens * row_stride + static_cast<int64_t>(h) * 3 * ch;
  const T* k_past = past + b * past_b + static_cast<int64_t>(h) * past_len * ch;
  const T* v_past = k_past + past_kv;
  // Stage the cached keys and values with 16-byte loads, all issued before any is used (a loop
  // of dependent 2-byte loads waits on memory latency at every turn: 15 us instead of 3).
  const int packs = past_len * ch / 8;
#pragma unroll 4
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    reinterpret_cast<uint4*>(k_s)[i] = __ldg(reinterpret_cast<const uint4*>(k_past) + i);
    reinterpret_cast<uint4*>(v_s)[i] = __ldg(reinterpret_cast<const uint4*>(v_past) + i);
  }
  for (int i = threadIdx.x; i < tokens * ch; i += blockDim.x) {
    const int t = i / ch, d = i % ch;
    q[i] = to_float(qkv_b[t * row_stride + d]) * scale;
    k_s[(past_len + t) * ch + d] = qkv_b[t * row_stride + ch + d];
    v_s[(past_len + t) * ch + d] = qkv_b[t * row_stride + 2 * ch + d];
  }
  __syncthreads();
  // Scores: one warp per key, its lanes splitting the head dimension, every query at once;
  // masked keys get -inf (the caption's padding among the cached keys, the causal order among
  // the step tokens).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int j = warp; j < keys; j += warps) {
    float dot[kMaxTokens];
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) dot[t] = 0.f;
    for (int d = lane; d < ch; d += 32) {
      const float kd = to_float(k_s[j * ch + d]);
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t)
        if (t < tokens) dot[t] = fmaf(q[t * ch + d], kd, dot[t]);
    }
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t)
      for (int o = 16; o > 0; o /= 2) dot[t] += __shfl_xor_sync(0xffffffff, dot[t], o);
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < kMaxTokens; ++t) {
        if (t >= tokens) break;
        const bool visible = j < past_len ? (j >= mask_len || keep[static_cast<int64_t>(b) * mask_len + j])
                                          : (j - past_len <= t);
        scores[t * keys + j] = visible ? dot[t] : -INFINITY;
      }
    }
  }
  __syncthreads();
  // Softmax per query: one warp each.
  for (int t = warp; t < tokens; t += warps) {
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
  // Weighted sum of values, written token-major [b * tokens + t, h * ch + d] for the projection.
  for (int i = threadIdx.x; i < tokens * ch; i += blockDim.x) {
    const int t = i / ch, d = i % ch;
    const float* p = scores + t * keys;
    float acc = 0.f;
    for (int j = 0; j < keys; ++j) acc = fmaf(p[j], to_float(v_s[j * ch + d]), acc);
    out[(static_cast<int64_t>(b) * tokens + t) * heads * ch + static_cast<int64_t>(h) * ch + d] = from_float<T>(acc);
  }
}

bool is_half_like(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

}  // namespace

// Attention of `tokens` step tokens per sample: qkv [B * tokens, heads * 3 * ch] (per head
// [q | k | v]), past [B, 2, heads, P, ch] (keys at index 0, values at 1; may be a strided view,
// with each [heads, P, ch] block contiguous), keep [B, mask_len] bool (False: that cached key is
// padding). Returns [B * tokens, heads * ch].
at::Tensor prior_step_attention(const at::Tensor& qkv, const at::Tensor& past, const at::Tensor& keep,
                                int64_t heads) {
  TORCH_CHECK(qkv.is_cuda() && qkv.dim() == 2 && qkv.is_contiguous() && is_half_like(qkv),
              "prior_step_attention: qkv must be a contiguous half-precision CUDA matrix");
  TORCH_CHECK(past.dim() == 5 && past.size(1) == 2 && past.size(2) == heads && past.scalar_type() == qkv.scalar_type() &&
                  past.device() == qkv.device(),
              "prior_step_attention: past must be [B, 2, heads, P, ch] in qkv's dtype");
  const int64_t batch = past.size(0), past_len = past.size(3), ch = past.size(4);
  TORCH_CHECK(past.stride(4) == 1 && past.stride(3) == ch && past.stride(2) == past_len * ch,
              "prior_step_attention: each [heads, P, ch] block of past must be contiguous");
  TORCH_CHECK(ch % 8 == 0 && past.stride(0) % 8 == 0 && past.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(past.data_ptr()) % 16 == 0,
              "prior_step_attention: the head size must be a multiple of 8 and past 16-byte aligned");
  TORCH_CHECK(qkv.size(1) == heads * 3 * ch && qkv.size(0) % batch == 0,
              "prior_step_attention: qkv must be [B * tokens, heads * 3 * ch]");
  const int64_t tokens = qkv.size(0) / batch;
  TORCH_CHECK(tokens >= 1 && tokens <= kMaxTokens, "prior_step_attention: 1 to ", kMaxTokens, " step tokens per sample");
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == batch && keep.size(1) <= past_len && keep.is_contiguous() &&
                  keep.scalar_type() == at::kBool && keep.device() == qkv.device(),
              "prior_step_attention: keep must be a contiguous bool [B, mask_len <= P] on qkv's device");
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto out = at::empty({batch * tokens, heads * ch}, qkv.options());
  const size_t smem =
      sizeof(float) * tokens * (ch + past_len + tokens) + 16 + qkv.element_size() * 2 * (past_len + tokens) * ch;
  TORCH_CHECK(smem <= 48 * 1024, "prior_step_attention: too many tokens or keys for one block");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float scale = 1.f / sqrtf(static_cast<float>(ch));
  const int blocks = static_cast<int>(batch * heads);
  const auto args = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    prior_step_attention_kernel<T><<<blocks, 256, smem, stream>>>(
        reinterpret_cast<const T*>(qkv.data_ptr()), reinterpret_cast<const T*>(past.data_ptr()),
        keep.data_ptr<bool>(), reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(tokens), static_cast<int>(heads),
        static_cast<int>(ch), static_cast<int>(past_len), static_cast<int>(keep.size(1)), past.stride(0),
        past.stride(1), scale);
  };
  if (qkv.scalar_type() == at::kHalf) {
    args(static_cast<__half*>(nullptr));
  } else {
    args(static_cast<__nv_bfloat16*>(nullptr));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
