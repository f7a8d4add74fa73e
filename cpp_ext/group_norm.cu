// Group normalisation (+ optional per-sample scale/shift, + optional SiLU) for NCHW and NHWC
// (channels-last) activations in fp16, bf16 or fp32, with float32 statistics.
//
// Why not at::native::group_norm: its statistics kernel gives one thread block to each
// (sample, group) row, so at batch 1 with 32 groups it runs 32 blocks on a 132-SM GPU; at the
// super-res UNet's 256x256 maps that kernel alone was 42% of the forward (H100). Here every
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

#include "elementwise.cuh"

namespace {

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;

constexpr int kThreads = 256;

struct Shape {
  int64_t batch, channels, hw;  // x is [batch, channels, hw] (NCHW) or [batch, hw, channels] (NHWC)
  int groups, chunks;
  int64_t chunk_len;  // NCHW: elements of a group row per chunk; NHWC: pixels per chunk
  int groups_per_block;  // NHWC pass 1: groups whose channels one block covers (blockIdx.z picks which)
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
__global__ void partial_nchw(const T* __restrict__ x, const T* __restrict__ add, float2* __restrict__ partial,
                             Shape s) {
  __shared__ float2 smem[kThreads / 32];
  const int64_t row = blockIdx.y;
  const int64_t cg = s.channels / s.groups;
  const int64_t row_len = cg * s.hw;
  const T* base = x + row * row_len;
  // add[b, c] of this row's channels: row = b * groups + g covers channels g*cg .. g*cg+cg-1.
  const T* row_add = add != nullptr ? add + (row / s.groups) * s.channels + (row % s.groups) * cg : nullptr;
  const float pivot = to_float(base[0]) + (row_add != nullptr ? to_float(row_add[0]) : 0.f);
  const int64_t begin = blockIdx.x * s.chunk_len;
  const int64_t end = min(row_len, begin + s.chunk_len);
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end; i += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto p = *reinterpret_cast<const Pack<T, VEC>*>(base + i);
    const float a = row_add != nullptr ? to_float(row_add[i / s.hw]) : 0.f;  // VEC | hw: one channel
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
__global__ void partial_nhwc(const T* __restrict__ x, const T* __restrict__ add, float2* __restrict__ partial,
                             Shape s) {
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
  const T* sample_add = add != nullptr ? add + b * s.channels : nullptr;
  const float pivot = to_float(sample[g * cg]) + (sample_add != nullptr ? to_float(sample_add[g * cg]) : 0.f);
  float a[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) a[k] = (sample_add != nullptr && valid) ? to_float(sample_add[c0 + k]) : 0.f;
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

// Pass 2: fold the chunks of each (sample, group) into mean and 1/std; one warp per row, each
// lane summing a fixed stride of chunks, then a fixed shuffle tree (deterministic).
template <typename T, bool NHWC>
__global__ void finalize(const T* __restrict__ x, const T* __restrict__ add, const float2* __restrict__ partial,
                         float2* __restrict__ stats, Shape s, float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= s.batch * s.groups) return;  // uniform across the warp
  float sum = 0.f, sq = 0.f;
  for (int c = lane; c < s.chunks; c += 32) {
    sum += partial[row * s.chunks + c].x;
    sq += partial[row * s.chunks + c].y;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_down_sync(0xffffffff, sum, offset);
    sq += __shfl_down_sync(0xffffffff, sq, offset);
  }
  if (lane != 0) return;
  const int64_t b = row / s.groups, g = row % s.groups;
  const int64_t cg = s.channels / s.groups;
  float pivot = NHWC ? to_float(x[b * s.hw * s.channels + g * cg]) : to_float(x[row * cg * s.hw]);
  if (add != nullptr) pivot += to_float(add[b * s.channels + g * cg]);
  const float n = static_cast<float>(cg * s.hw);
  const float mean_shift = sum / n;
  const float var = fmaxf(sq / n - mean_shift * mean_shift, 0.f);
  stats[row] = make_float2(pivot + mean_shift, rsqrtf(var + eps));
}

// Pass 3: normalise, affine, optional scale/shift ([B, C] each: y * (1 + scale) + shift), optional SiLU.
template <typename T, int VEC, bool NHWC>
__global__ void normalize(const T* __restrict__ x, const T* __restrict__ add, const float2* __restrict__ stats,
                          const T* __restrict__ weight,
                          const T* __restrict__ bias, const T* __restrict__ scale, const T* __restrict__ shift,
                          T* __restrict__ y, Shape s, bool silu) {
  const int64_t n = s.batch * s.channels * s.hw;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const int64_t per_sample = s.channels * s.hw;
  const int64_t b = i / per_sample;
  const int64_t within = i - b * per_sample;
  const int64_t cg = s.channels / s.groups;
  const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    // NCHW: VEC divides hw, so a pack is one channel; NHWC: VEC consecutive channels.
    const int64_t c = NHWC ? (within % s.channels) + k : within / s.hw;
    const float2 st = stats[b * s.groups + c / cg];
    const float xv = to_float(in.v[k]) + (add != nullptr ? to_float(add[b * s.channels + c]) : 0.f);
    float v = (xv - st.x) * st.y * to_float(weight[c]) + to_float(bias[c]);
    if (scale != nullptr) v = v * (1.f + to_float(scale[b * s.channels + c])) + to_float(shift[b * s.channels + c]);
    if (silu) v = v / (1.f + __expf(-v));
    out.v[k] = from_float<T>(v);
  }
  *reinterpret_cast<Pack<T, VEC>*>(y + i) = out;
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
void launch_normalize(const at::Tensor& x, const T* add, const at::Tensor& stats, const at::Tensor& weight, const at::Tensor& bias,
                      const T* scale, const T* shift, at::Tensor& y, const Shape& s, bool silu, bool nhwc,
                      cudaStream_t stream) {
  const int64_t n = x.numel();
  const int64_t blocks = (n / VEC + kThreads - 1) / kThreads;
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* st = reinterpret_cast<const float2*>(stats.data_ptr<float>());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr());
  const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  if (nhwc) {
    normalize<T, VEC, true><<<blocks, kThreads, 0, stream>>>(xp, add, st, wp, bp, scale, shift, yp, s, silu);
  } else {
    normalize<T, VEC, false><<<blocks, kThreads, 0, stream>>>(xp, add, st, wp, bp, scale, shift, yp, s, silu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_partial(const at::Tensor& x, const T* add, at::Tensor& partial, Shape& s, bool nhwc,
                    cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  auto* pp = reinterpret_cast<float2*>(partial.data_ptr<float>());
  if (nhwc) {
    const int lanes = s.groups_per_block * static_cast<int>(s.channels / s.groups / VEC);
    const int rows = std::max(1, kThreads / lanes);
    const dim3 block(lanes, rows);
    const dim3 grid(s.chunks, static_cast<unsigned>(s.batch), (s.groups + s.groups_per_block - 1) / s.groups_per_block);
    partial_nhwc<T, VEC><<<grid, block, sizeof(float2) * lanes * rows, stream>>>(xp, add, pp, s);
  } else {
    const dim3 grid(s.chunks, static_cast<unsigned>(s.batch * s.groups));
    partial_nchw<T, VEC><<<grid, kThreads, 0, stream>>>(xp, add, pp, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
at::Tensor group_norm_typed(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                            const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                            const c10::optional<at::Tensor>& add, double eps, bool silu, bool nhwc) {
  const T* add_ptr = add ? reinterpret_cast<const T*>(add->data_ptr()) : nullptr;
  Shape s{};
  s.batch = x.size(0);
  s.channels = x.size(1);
  s.hw = x.numel() / (s.batch * s.channels);
  s.groups = static_cast<int>(groups);
  const int64_t cg = s.channels / groups;
  const int elem = static_cast<int>(x.element_size());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto y = at::empty_like(x);  // keeps x's memory format

  // Pass 1 geometry: aim for ~4 blocks per SM over the whole tensor.
  const int64_t target_blocks = 528;
  int vec;
  if (nhwc) {
    vec = pick_vec(cg, x.data_ptr(), x.data_ptr(), elem);
    const int64_t lanes_per_group = cg / vec;
    TORCH_CHECK(lanes_per_group <= 1024, "group_norm: too many channels per group for the NHWC kernel");
    s.groups_per_block = static_cast<int>(std::min<int64_t>(groups, 1024 / lanes_per_group));
    const int64_t want = std::max<int64_t>(1, target_blocks / s.batch);
    s.chunk_len = std::max<int64_t>(1, (s.hw + want - 1) / want);
    s.chunks = static_cast<int>((s.hw + s.chunk_len - 1) / s.chunk_len);
  } else {
    const int64_t row_len = cg * s.hw;
    vec = pick_vec(s.hw, x.data_ptr(), x.data_ptr(), elem);
    const int64_t want = std::max<int64_t>(1, target_blocks / (s.batch * groups));
    s.chunk_len = std::max<int64_t>(kThreads * vec, (row_len + want - 1) / want);
    s.chunk_len = (s.chunk_len + vec - 1) / vec * vec;
    s.chunks = static_cast<int>((row_len + s.chunk_len - 1) / s.chunk_len);
  }
  auto partial = at::empty({s.batch * groups * s.chunks, 2}, x.options().dtype(at::kFloat));
  auto stats = at::empty({s.batch * groups, 2}, x.options().dtype(at::kFloat));
  switch (vec) {
    case 8: launch_partial<T, 8>(x, add_ptr, partial, s, nhwc, stream); break;
    case 4: launch_partial<T, 4>(x, add_ptr, partial, s, nhwc, stream); break;
    case 2: launch_partial<T, 2>(x, add_ptr, partial, s, nhwc, stream); break;
    default: launch_partial<T, 1>(x, add_ptr, partial, s, nhwc, stream); break;
  }
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const int64_t rows = s.batch * groups;
  const int fin_blocks = static_cast<int>((rows + 7) / 8);  // 8 warps of 32 per block, one warp per row
  const auto* pp = reinterpret_cast<const float2*>(partial.data_ptr<float>());
  auto* sp = reinterpret_cast<float2*>(stats.data_ptr<float>());
  if (nhwc) {
    finalize<T, true><<<fin_blocks, 256, 0, stream>>>(xp, add_ptr, pp, sp, s, eps);
  } else {
    finalize<T, false><<<fin_blocks, 256, 0, stream>>>(xp, add_ptr, pp, sp, s, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const T* scale_ptr = scale ? reinterpret_cast<const T*>(scale->data_ptr()) : nullptr;
  const T* shift_ptr = shift ? reinterpret_cast<const T*>(shift->data_ptr()) : nullptr;
  // Pass 3 vector width: NHWC packs run along channels (within one sample: VEC | channels);
  // NCHW packs along pixels of one channel (VEC | hw).
  const int nvec = pick_vec(nhwc ? s.channels : s.hw, x.data_ptr(), y.data_ptr(), elem);
  switch (nvec) {
    case 8: launch_normalize<T, 8>(x, add_ptr, stats, weight, bias, scale_ptr, shift_ptr, y, s, silu, nhwc, stream); break;
    case 4: launch_normalize<T, 4>(x, add_ptr, stats, weight, bias, scale_ptr, shift_ptr, y, s, silu, nhwc, stream); break;
    case 2: launch_normalize<T, 2>(x, add_ptr, stats, weight, bias, scale_ptr, shift_ptr, y, s, silu, nhwc, stream); break;
    default: launch_normalize<T, 1>(x, add_ptr, stats, weight, bias, scale_ptr, shift_ptr, y, s, silu, nhwc, stream); break;
  }
  return y;
}

}  // namespace

// y = GroupNorm(x [+ add]) * weight + bias [* (1 + scale) + shift] [-> SiLU], x [B, C, *spatial] in
// NCHW (contiguous) or NHWC (channels_last) memory; weight/bias [C], scale/shift/add [B, C], all in
// x's dtype (`add`: the ResBlock's time embedding, added before the norm without a separate pass).
at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                      const c10::optional<at::Tensor>& add, double eps, bool silu) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 3, "group_norm: x must be a CUDA tensor [B, C, *spatial]");
  TORCH_CHECK(x.size(1) % groups == 0, "group_norm: channels ", x.size(1), " not divisible by ", groups, " groups");
  const bool nhwc = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nhwc || x.is_contiguous(), "group_norm: x must be contiguous or channels_last");
  TORCH_CHECK(weight.is_contiguous() && bias.is_contiguous() && weight.numel() == x.size(1) &&
                  bias.numel() == x.size(1) && weight.scalar_type() == x.scalar_type() &&
                  bias.scalar_type() == x.scalar_type(),
              "group_norm: weight and bias must be [C] in x's dtype");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "group_norm: give both scale and shift, or neither");
  if (scale) {
    TORCH_CHECK(scale->is_contiguous() && shift->is_contiguous() && scale->numel() == x.size(0) * x.size(1) &&
                    shift->numel() == x.size(0) * x.size(1) && scale->scalar_type() == x.scalar_type() &&
                    shift->scalar_type() == x.scalar_type(),
                "group_norm: scale and shift must be [B, C] in x's dtype");
  }
  if (add) {
    TORCH_CHECK(add->is_contiguous() && add->numel() == x.size(0) * x.size(1) && add->scalar_type() == x.scalar_type(),
                "group_norm: add must be [B, C] in x's dtype");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat: return group_norm_typed<float>(x, groups, weight, bias, scale, shift, add, eps, silu, nhwc);
    case at::kHalf: return group_norm_typed<__half>(x, groups, weight, bias, scale, shift, add, eps, silu, nhwc);
    case at::kBFloat16:
      return group_norm_typed<__nv_bfloat16>(x, groups, weight, bias, scale, shift, add, eps, silu, nhwc);
    default: TORCH_CHECK(false, "group_norm: x must be float32, float16 or bfloat16");
  }
}
