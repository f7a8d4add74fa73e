// The diffusion prior's cached step: the step tokens' attention over [cached caption keys | their
// own keys], straight from the QKV projection's output (Karlo's per-head [q|k|v] layout) and the
// cache, with the caption's padding mask and the causal mask among the step tokens built in;
// scores, softmax and the weighted sum in float32. Per layer it replaces two concatenations of
// the cache, the mask's cast, SDPA (cuDNN's flash kernel, tuned for long sequences, took 9 us for
// these 3 x 81 scores) and a transposing copy. On an H100 at batch 2 it takes 7.3 us per layer
// (a first version with a warp per key and serial weighted sums took 10.7).

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

constexpr int kMaxTokens = 4;  // the most step tokens per sample prior_step_attention takes

constexpr int kStripes = 8;  // threads that split one output pack's keys in the weighted sum

// One block per (sample, head): T step queries over P cached keys and the T step keys. The
// keys and values are first staged in shared memory by the whole block (coalesced 16-byte loads,
// all in flight at once), then scores (a thread per (query, key), 16-byte reads), softmax (a warp
// per query) and the weighted sum (a thread per (query, 8 channels, key stripe), stripes folded by
// shuffles) run from there in float32.
template <typename T>
__global__ void prior_step_attention_kernel(const T* __restrict__ qkv, const T* __restrict__ past,
                                            const bool* __restrict__ keep, T* __restrict__ out, int tokens,
                                            int heads, int ch, int past_len, int mask_len, int64_t past_b,
                                            int64_t past_kv, float scale) {
  unclip_rt::allow_dependents();  // the next kernel may start now (pdl.cuh)
  extern __shared__ float smem[];
  using P8 = Pack<T, 8>;
  const int keys = past_len + tokens, slices = ch / 8;
  float* q = smem;                    // [tokens][ch], pre-scaled
  float* scores = q + tokens * ch;    // [tokens][keys]
  // [keys][ch], 16-byte aligned for the vector accesses
  T* k_s = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scores + tokens * keys) + 15) & ~uintptr_t{15});
  T* v_s = k_s + keys * ch;  // [keys][ch]
  const int b = blockIdx.x / heads, h = blockIdx.x % heads;
  const int64_t row_stride = static_cast<int64_t>(heads) * 3 * ch;  // one token's qkv row
  const T* qkv_b = qkv + static_cast<int64_t>(b) * tokens * row_stride + static_cast<int64_t>(h) * 3 * ch;
  const T* k_past = past + b * past_b + static_cast<int64_t>(h) * past_len * ch;
  const T* v_past = k_past + past_kv;
  // Stage the cached keys/values and the step tokens' q, k, v with 16-byte loads, all issued
  // before any is used (dependent 2-byte loads waited on memory latency at every turn).
  const int packs = past_len * slices;
#pragma unroll 4
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    reinterpret_cast<uint4*>(k_s)[i] = __ldg(reinterpret_cast<const uint4*>(k_past) + i);
    reinterpret_cast<uint4*>(v_s)[i] = __ldg(reinterpret_cast<const uint4*>(v_past) + i);
  }
  // the cache is older than the kernel before this one (pdl.cuh); the step tokens' qkv is its output
  unclip_rt::wait_for_producers();
  for (int i = threadIdx.x; i < tokens * slices; i += blockDim.x) {
    const int t = i / slices, d8 = i % slices;
    const T* row = qkv_b + t * row_stride + d8 * 8;
    const P8 qp = *reinterpret_cast<const P8*>(row);
    reinterpret_cast<P8*>(k_s)[(past_len + t) * slices + d8] = *reinterpret_cast<const P8*>(row + ch);
    reinterpret_cast<P8*>(v_s)[(past_len + t) * slices + d8] = *reinterpret_cast<const P8*>(row + 2 * ch);
#pragma unroll
    for (int e = 0; e < 8; ++e) q[t * ch + d8 * 8 + e] = to_float(qp.v[e]) * scale;
  }
  __syncthreads();
  // Scores, one thread per (query, key); masked keys get -inf (the caption's padding among the
  // cached keys, the causal order among the step tokens).
  for (int i = threadIdx.x; i < tokens * keys; i += blockDim.x) {
    const int t = i / keys, j = i % keys;
    const P8* k_row = reinterpret_cast<const P8*>(k_s + j * ch);
    const float* q_row = q + t * ch;
    float dot = 0.f;
    for (int d8 = 0; d8 < slices; ++d8) {
      const P8 kp = k_row[d8];
#pragma unroll
      for (int e = 0; e < 8; ++e) dot = fmaf(q_row[d8 * 8 + e], to_float(kp.v[e]), dot);
    }
    const bool visible = j < past_len ? (j >= mask_len || keep[static_cast<int64_t>(b) * mask_len + j])
                                      : (j - past_len <= t);
    scores[i] = visible ? dot : -INFINITY;
  }
  __syncthreads();
  // Softmax per query: one warp each.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
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
  // Weighted sum of values: item (t, d8, stripe) sums keys stripe, stripe + kStripes, ... of
  // channels [8 d8, 8 d8 + 8); the stripes of one pack sit in consecutive lanes (every lane of a
  // warp takes part in the shuffles, idle ones with zeros). Written token-major
  // [b * tokens + t, h * ch + d] for the projection.
  const int items = tokens * slices * kStripes;
  for (int base = 0; base < items; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const bool active = i < items;
    const int stripe = i % kStripes, d8 = (i / kStripes) % slices, t = i / (kStripes * slices);
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    if (active) {
      const float* p = scores + t * keys;
      for (int j = stripe; j < keys; j += kStripes) {
        const P8 vp = reinterpret_cast<const P8*>(v_s + j * ch)[d8];
        const float w = p[j];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(w, to_float(vp.v[e]), acc[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e)
      for (int o = kStripes / 2; o > 0; o /= 2) acc[e] += __shfl_xor_sync(0xffffffff, acc[e], o);
    if (active && stripe == 0) {
      P8 o;
#pragma unroll
      for (int e = 0; e < 8; ++e) o.v[e] = from_float<T>(acc[e]);
      *reinterpret_cast<P8*>(out + (static_cast<int64_t>(b) * tokens + t) * heads * ch + static_cast<int64_t>(h) * ch +
                             d8 * 8) = o;
    }
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
    unclip_rt::launch_overlapped(
        prior_step_attention_kernel<T>, dim3(blocks), dim3(256), smem, stream.stream(), reinterpret_cast<const T*>(qkv.data_ptr()), reinterpret_cast<const T*>(past.data_ptr()),
        keep.data_ptr<bool>(), reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(tokens), static_cast<int>(heads),
        static_cast<int>(ch), static_cast<int>(past_len), static_cast<int>(keep.size(1)), past.stride(0),
        past.stride(1), scale);
  };
  unclip_rt::dispatch_half_like(qkv, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
