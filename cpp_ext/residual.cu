// The residual join of the UNets with the bias of the convolution before it, in one pass:
// h = h + skip + bias[c] (+ bias2[c]), in place, for NCHW or NHWC (channels-last) activations.
//
// Why: torch's cuDNN convolution adds its bias in a pass of its own (in channels-last memory a
// broadcast kernel that does not vectorise), a tenth of a super-res forward at Karlo's shapes
// beside the residual add. So a ResBlock's last
// convolution (and its 1x1 skip convolution) runs without bias, and this kernel adds both biases
// while it joins the residual: one read of each input, one write.
//
// bias_residual_stats also does the statistics pass of the group norm that reads the join's
// output next (most of the UNets' norm inputs are residual joins): the norm then skips that pass
// and its read of the whole map (group_norm's `partial`).

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
#include "wide_stats.cuh"

namespace {

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;

constexpr int kThreads = 256;

// RESIZE 1: NHWC h [B, 2H, 2W, C] joined with skip [B, H, W, C] read nearest-upsampled (an up
// ResBlock's identity skip); RESIZE 2: h [B, H/2, W/2, C] with skip [B, H, W, C] read 2x2
// average-pooled (a down ResBlock's) — instead of materialised resized copies. r: the skip's VEC
// values for h's element i, which is channel c of pixel `pixel` (of h's hw, `width` wide) of
// sample b (b, pixel and c are read with RESIZE only; RESIZE 0 reads skip at i, in any layout).
template <typename T, int VEC, int RESIZE>
__device__ __forceinline__ void skip_values(const T* __restrict__ skip, int64_t i, int64_t b, int64_t pixel,
                                            int64_t c, int64_t channels, int64_t hw, int64_t width,
                                            float (&r)[VEC]) {
  if (RESIZE == 0) {
    const auto p = *reinterpret_cast<const Pack<T, VEC>*>(skip + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = to_float(p.v[k]);
    return;
  }
  const int64_t y = pixel / width, x = pixel % width, height = hw / width;
  if (RESIZE == 1) {
    const int64_t from = ((b * (height / 2) + y / 2) * (width / 2) + x / 2) * channels + c;
    const auto p = *reinterpret_cast<const Pack<T, VEC>*>(skip + from);
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = to_float(p.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = 0.f;
#pragma unroll
    for (int d = 0; d < 4; ++d) {
      const int64_t from = ((b * 2 * height + 2 * y + d / 2) * 2 * width + 2 * x + d % 2) * channels + c;
      const auto p = *reinterpret_cast<const Pack<T, VEC>*>(skip + from);
#pragma unroll
      for (int k = 0; k < VEC; ++k) r[k] += 0.25f * to_float(p.v[k]);
    }
  }
}

// bias[c] (+ bias2[c]) in float: what the join adds to channel c.
template <typename T>
__device__ __forceinline__ float bias_at(const T* __restrict__ bias, const T* __restrict__ bias2, int64_t c) {
  float b = to_float(bias[c]);
  if (bias2 != nullptr) b += to_float(bias2[c]);
  return b;
}

template <typename T, int VEC, bool NHWC, int RESIZE>
__global__ void bias_residual_kernel(T* __restrict__ h, const T* __restrict__ skip, const T* __restrict__ bias,
                                     const T* __restrict__ bias2, int64_t n, int64_t channels, int64_t hw,
                                     int64_t width) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  float r[VEC];
  if (RESIZE == 0) {
    skip_values<T, VEC, 0>(skip, i, 0, 0, 0, channels, hw, width, r);
  } else {
    const int64_t b = i / (hw * channels), within = i - b * hw * channels;
    skip_values<T, VEC, RESIZE>(skip, i, b, within / channels, within % channels, channels, hw, width, r);
  }
  const auto a = *reinterpret_cast<const Pack<T, VEC>*>(h + i);
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    // NHWC: VEC consecutive channels (VEC | channels); NCHW: one channel per pack (VEC | hw).
    const int64_t c = NHWC ? (i % channels) + k : (i / hw) % channels;
    out.v[k] = from_float<T>(to_float(a.v[k]) + r[k] + bias_at(bias, bias2, c));
  }
  *reinterpret_cast<Pack<T, VEC>*>(h + i) = out;
}

// The join written to y (channels-last half precision, out of place) together with the
// statistics pass of the group norm that reads y next (wide_stats.cuh's geometry and sums, the
// very code of group_norm's partial_nhwc_wide): grid (chunks, batch), block (channels / 8 lanes,
// rows). Each group's sums are shifted by y's value at the group's first channel of pixel 0,
// which every block computes from the inputs (h is read only, so no block can see it changed).
template <typename T, int RESIZE>
__global__ void bias_residual_stats_kernel(const T* __restrict__ h, const T* __restrict__ skip,
                                           const T* __restrict__ bias, const T* __restrict__ bias2, T* __restrict__ y,
                                           float2* __restrict__ partial, int64_t channels, int64_t hw, int64_t width,
                                           int groups, int64_t chunk_len, int chunks) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  extern __shared__ float2 sums[];  // wide_shared_bytes
  const int64_t b = blockIdx.y;
  const int cg = static_cast<int>(channels / groups);
  const int c0 = threadIdx.x * 8;
  // y's 8 channels [c, c + 8) of pixel p, given those channels' biases
  const auto join = [&](int64_t p, int c, const float (&biases)[8]) {
    const int64_t i = (b * hw + p) * channels + c;
    float r[8];
    skip_values<T, 8, RESIZE>(skip, i, b, p, c, channels, hw, width, r);
    const auto a = *reinterpret_cast<const Pack<T, 8>*>(h + i);
    Pack<T, 8> out;
#pragma unroll
    for (int k = 0; k < 8; ++k) out.v[k] = from_float<T>(to_float(a.v[k]) + r[k] + biases[k]);
    return out;
  };
  const auto pivot_of = [&](int g) {  // y at group g's first channel of pixel 0, as the norm reads it
    const int c = g * cg, base = c / 8 * 8;
    float biases[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) biases[k] = bias_at(bias, bias2, base + k);
    return to_float(join(0, base, biases).v[c - base]);
  };
  float biases[8], nothing_added[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    biases[k] = bias_at(bias, bias2, c0 + k);
    nothing_added[k] = 0.f;
  }
  unclip_rt::WideSums acc(c0, cg, pivot_of(c0 / cg), pivot_of((c0 + 7) / cg), nothing_added);
  const int64_t begin = blockIdx.x * chunk_len;
  const int64_t end = min(hw, begin + chunk_len);
  for (int64_t p = begin + threadIdx.y; p < end; p += blockDim.y) {
    const auto out = join(p, c0, biases);
    *reinterpret_cast<Pack<T, 8>*>(y + (b * hw + p) * channels + c0) = out;
    acc.accumulate(out);
  }
  acc.fold(sums, partial, b, groups, cg, chunks, blockIdx.x);
}

template <typename T, int VEC>
void launch(at::Tensor& h, const at::Tensor& skip, const at::Tensor& bias, const c10::optional<at::Tensor>& bias2,
            bool nhwc, int resize, int64_t hw) {
  const int64_t n = h.numel();
  const int64_t blocks = (n / VEC + kThreads - 1) / kThreads;
  auto* hp = reinterpret_cast<T*>(h.data_ptr());
  const auto* sp = reinterpret_cast<const T*>(skip.data_ptr());
  const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
  const auto* b2 = bias2 ? reinterpret_cast<const T*>(bias2->data_ptr()) : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t width = h.size(-1);
  const int64_t c = h.size(1);
  if (resize == 1) {
    unclip_rt::launch_overlapped(bias_residual_kernel<T, VEC, true, 1>, dim3(blocks), dim3(kThreads), 0, stream, hp, sp, bp, b2, n, c, hw, width);
  } else if (resize == 2) {
    unclip_rt::launch_overlapped(bias_residual_kernel<T, VEC, true, 2>, dim3(blocks), dim3(kThreads), 0, stream, hp, sp, bp, b2, n, c, hw, width);
  } else if (nhwc) {
    unclip_rt::launch_overlapped(bias_residual_kernel<T, VEC, true, 0>, dim3(blocks), dim3(kThreads), 0, stream, hp, sp, bp, b2, n, c, hw, width);
  } else {
    unclip_rt::launch_overlapped(bias_residual_kernel<T, VEC, false, 0>, dim3(blocks), dim3(kThreads), 0, stream, hp, sp, bp, b2, n, c, hw, width);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void typed(at::Tensor& h, const at::Tensor& skip, const at::Tensor& bias, const c10::optional<at::Tensor>& bias2,
           bool nhwc, int resize) {
  const int64_t hw = h.numel() / (h.size(0) * h.size(1));
  const int64_t divisor = nhwc ? h.size(1) : hw;
  const auto aligned = [&](int vec) {
    const auto bytes = static_cast<uintptr_t>(vec * sizeof(T));
    return vec * sizeof(T) <= 16 && divisor % vec == 0 && reinterpret_cast<uintptr_t>(h.data_ptr()) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(skip.data_ptr()) % bytes == 0;
  };
  if (aligned(8)) return launch<T, 8>(h, skip, bias, bias2, nhwc, resize, hw);
  if (aligned(4)) return launch<T, 4>(h, skip, bias, bias2, nhwc, resize, hw);
  if (aligned(2)) return launch<T, 2>(h, skip, bias, bias2, nhwc, resize, hw);
  launch<T, 1>(h, skip, bias, bias2, nhwc, resize, hw);
}

// How skip's map relates to h's (both 4-D [B, C, H, W]): 1 half its height and width (read
// nearest-upsampled), 2 twice them (read 2x2 average-pooled), else 0.
int skip_resize(const at::Tensor& h, const at::Tensor& skip) {
  if (h.dim() != 4 || skip.dim() != 4) return 0;
  if (skip.size(2) * 2 == h.size(2) && skip.size(3) * 2 == h.size(3)) return 1;
  if (skip.size(2) == h.size(2) * 2 && skip.size(3) == h.size(3) * 2) return 2;
  return 0;
}

}  // namespace

// h += skip + bias (+ bias2), in place; h and skip [B, C, *spatial] of one shape, dtype and memory
// format (contiguous, or channels_last for 4-D) — or, channels_last, skip [B, C, H/2, W/2] read
// nearest-upsampled or skip [B, C, 2H, 2W] read 2x2 average-pooled; bias and bias2 [C] in their dtype.
void bias_residual_(at::Tensor& h, const at::Tensor& skip, const at::Tensor& bias,
                    const c10::optional<at::Tensor>& bias2) {
  TORCH_CHECK(h.is_cuda() && h.dim() >= 2 && skip.dim() == h.dim() && skip.size(0) == h.size(0) &&
                  skip.size(1) == h.size(1) && skip.scalar_type() == h.scalar_type() && skip.device() == h.device(),
              "bias_residual_: h and skip must be CUDA tensors of one batch, channels and dtype");
  const auto channels_last_only = [](const at::Tensor& t) {
    return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  const bool nhwc = channels_last_only(h);
  const int resize = skip_resize(h, skip);
  TORCH_CHECK(resize != 0 || skip.sizes() == h.sizes(),
              "bias_residual_: skip must have h's shape, half its height and width, or twice them");
  TORCH_CHECK(resize == 0 || (nhwc && channels_last_only(skip)),
              "bias_residual_: a resized skip needs channels_last tensors");
  const bool same_format = nhwc ? channels_last_only(skip) : h.is_contiguous() && skip.is_contiguous();
  TORCH_CHECK(same_format, "bias_residual_: h and skip must both be contiguous or both channels_last");
  const auto per_channel = [&](const at::Tensor& t) { return unclip_rt::is_channel_vector(t, h); };
  TORCH_CHECK(per_channel(bias) && (!bias2 || per_channel(*bias2)), "bias_residual_: biases must be [C] in h's dtype");
  if (h.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  switch (h.scalar_type()) {
    case at::kFloat: return typed<float>(h, skip, bias, bias2, nhwc, resize);
    case at::kHalf: return typed<__half>(h, skip, bias, bias2, nhwc, resize);
    case at::kBFloat16: return typed<__nv_bfloat16>(h, skip, bias, bias2, nhwc, resize);
    default: TORCH_CHECK(false, "bias_residual_: h must be float32, float16 or bfloat16");
  }
}

// [h + skip + bias (+ bias2), the group norm statistics of that sum in `groups` groups]: the join
// out of place (h and skip are left as they are) for channels-last half-precision h [B, C, H, W]
// and skip of h's shape, half its height and width (read nearest-upsampled) or twice them (read
// 2x2 average-pooled); bias, bias2 [C]. The statistics are group_norm's `partial` for that sum:
// pass them with it (and no add) to skip the norm's statistics pass. C must be a multiple of 8
// whose groups the wide geometry serves (wide_geometry_fits).
std::vector<at::Tensor> bias_residual_stats(const at::Tensor& h, const at::Tensor& skip, const at::Tensor& bias,
                                            const c10::optional<at::Tensor>& bias2, int64_t groups) {
  TORCH_CHECK(unclip_rt::is_nhwc_half(h) && unclip_rt::is_nhwc_half(skip) && skip.scalar_type() == h.scalar_type() &&
                  skip.device() == h.device(),
              "bias_residual_stats: h and skip must be aligned channels_last half-precision CUDA tensors of one dtype");
  TORCH_CHECK(skip.size(0) == h.size(0) && skip.size(1) == h.size(1),
              "bias_residual_stats: h and skip must share batch and channels");
  const int resize = skip_resize(h, skip);
  TORCH_CHECK(resize != 0 || skip.sizes() == h.sizes(),
              "bias_residual_stats: skip must have h's shape, half its height and width, or twice them");
  const int64_t channels = h.size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0 && unclip_rt::wide_geometry_fits(channels / groups, channels, groups),
              "bias_residual_stats: channels must be a multiple of 8 and of the groups, at least 8 per group and at "
              "most 8192 in all");
  const auto per_channel = [&](const at::Tensor& t) { return unclip_rt::is_channel_vector(t, h); };
  TORCH_CHECK(per_channel(bias) && (!bias2 || per_channel(*bias2)),
              "bias_residual_stats: biases must be [C] in h's dtype");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t batch = h.size(0), hw = h.size(2) * h.size(3);
  auto y = at::empty_like(h, h.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto chunks = unclip_rt::wide_chunks(batch, std::max<int64_t>(hw, 1));
  auto partial = at::empty({batch * groups, chunks.chunks, 2}, h.options().dtype(at::kFloat));
  if (h.numel() == 0) return {y, partial.zero_()};
  const dim3 block = unclip_rt::wide_block(channels);
  const dim3 grid(chunks.chunks, static_cast<unsigned>(batch));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  unclip_rt::dispatch_half_like(h, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const auto* hp = reinterpret_cast<const T*>(h.data_ptr());
    const auto* sp = reinterpret_cast<const T*>(skip.data_ptr());
    const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
    const auto* b2 = bias2 ? reinterpret_cast<const T*>(bias2->data_ptr()) : nullptr;
    auto* yp = reinterpret_cast<T*>(y.data_ptr());
    auto* pp = reinterpret_cast<float2*>(partial.data_ptr<float>());
    const auto kernel = resize == 1   ? bias_residual_stats_kernel<T, 1>
                        : resize == 2 ? bias_residual_stats_kernel<T, 2>
                                      : bias_residual_stats_kernel<T, 0>;
    unclip_rt::launch_overlapped(kernel, grid, block, unclip_rt::wide_shared_bytes(block), stream, hp, sp, bp, b2, yp,
                                 pp, channels, hw, h.size(3), static_cast<int>(groups), chunks.chunk_len,
                                 chunks.chunks);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, partial};
}
