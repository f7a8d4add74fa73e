// The group norm's normalising pass: y = x * A + B with the statistics pass's per-(sample,
// channel) coefficients, optional SiLU, the output optionally resized (nearest 2x up, 2x2 average
// down) as it is written, vectorised loads, NCHW or NHWC.

#include "group_norm_parts.cuh"

namespace unclip_rt::group_norm_parts {
namespace {

// The (A, B) pairs of a pack's channels: NHWC packs hold VEC consecutive channels, read as
// 16-byte pairs of pairs (the pack's first channel is a multiple of VEC, so they are aligned);
// an NCHW pack is one channel.
template <int VEC, bool NHWC>
__device__ __forceinline__ void load_coefficients(const float2* __restrict__ ab, float2 (&cf)[VEC]) {
  if constexpr (NHWC && VEC % 2 == 0) {
#pragma unroll
    for (int k = 0; k < VEC / 2; ++k) {
      const float4 q = reinterpret_cast<const float4*>(ab)[k];
      cf[2 * k] = make_float2(q.x, q.y);
      cf[2 * k + 1] = make_float2(q.z, q.w);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) cf[k] = NHWC ? ab[k] : ab[0];
  }
}

// Pass 3: y = x * A + B with pass 2's per-(sample, channel) coefficients, optional SiLU.
template <typename T, int VEC, bool NHWC>
__global__ void normalize(const T* __restrict__ x, const float2* __restrict__ coef, T* __restrict__ y, Shape s,
                          bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t n = s.batch * s.channels * s.hw;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= n) return;
  const int64_t per_sample = s.channels * s.hw;
  const int64_t b = i / per_sample;
  const int64_t within = i - b * per_sample;
  // NCHW: VEC divides hw, so a pack is one channel; NHWC: VEC consecutive channels.
  const float2* ab = coef + b * s.channels + (NHWC ? within % s.channels : within / s.hw);
  const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
  float2 cf[VEC];
  load_coefficients<VEC, NHWC>(ab, cf);
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float2 c = cf[k];
    float v = fmaf(to_float(in.v[k]), c.x, c.y);
    if (silu) v = unclip_rt::silu_of(v);
    out.v[k] = from_float<T>(v);
  }
  store_pack<T, VEC, NHWC>(y, out, i, b, s);
}

// use(p, load(p)) for the pixels p = first, first + step, ... below end, in that order, with the
// loads of kInFlight pixels issued before the first of them is used.
template <int kInFlight, typename Load, typename Use>
__device__ __forceinline__ void strided_pixels(int64_t first, int64_t end, int64_t step, Load load, Use use) {
  int64_t p = first;
  for (; p + (kInFlight - 1) * step < end; p += kInFlight * step) {
    decltype(load(p)) v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = load(p + u * step);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) use(p + u * step, v[u]);
  }
  for (; p < end; p += step) use(p, load(p));
}

// Pass 3, NHWC, 16-byte packs of VEC channels (channels a multiple of VEC): grid (chunks, batch),
// block (channels / VEC lanes, rows). A thread holds its channels' coefficients for its sample in
// registers and walks the pixels begin + r, begin + r + rows, ... of its chunk, four loads in
// flight (strided_pixels). `normalize` (one pack per thread) spent 64-bit index divisions and
// four coefficient loads per pack: compute-bound well below the DRAM bandwidth.
// PHASED: x is an up block's folded product (Shape::phased), read in place through pixel_offset.
template <typename T, int VEC, bool PHASED>
__global__ void __launch_bounds__(1024) normalize_nhwc(const T* __restrict__ x, const float2* __restrict__ coef,
                                                       T* __restrict__ y, Shape s, bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t b = blockIdx.y;
  const int c0 = threadIdx.x * VEC;
  float2 cf[VEC];
  load_coefficients<VEC, true>(coef + b * s.channels + c0, cf);
  const int64_t begin = blockIdx.x * s.chunk_len, end = min(s.hw, begin + s.chunk_len);
  const T* in_sample = x + b * s.hw * s.channels + c0;
  const int width = static_cast<int>(s.width), height = static_cast<int>(s.hw / s.width);  // of x
  strided_pixels<4>(
      begin + threadIdx.y, end, blockDim.y,
      [&](int64_t p) {
        const T* at = PHASED ? x + pixel_offset(s, b, p) + c0 : in_sample + p * s.channels;
        return *reinterpret_cast<const Pack<T, VEC>*>(at);
      },
      [&](int64_t p, const Pack<T, VEC>& in) {
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float v = fmaf(to_float(in.v[k]), cf[k].x, cf[k].y);
          if (silu) v = unclip_rt::silu_of(v);
          out.v[k] = from_float<T>(v);
        }
        if (!s.up) {
          *reinterpret_cast<Pack<T, VEC>*>(y + (b * s.hw + p) * s.channels + c0) = out;
          return;
        }
        const int py = static_cast<int>(p) / width, px = static_cast<int>(p) - py * width;  // hw < 2^31
        T* o = y + ((b * 2 * height + 2 * py) * 2 * width + 2 * px) * s.channels + c0;  // 2x2 nearest
        const int64_t down_row = 2 * width * s.channels;
        *reinterpret_cast<Pack<T, VEC>*>(o) = out;
        *reinterpret_cast<Pack<T, VEC>*>(o + s.channels) = out;
        *reinterpret_cast<Pack<T, VEC>*>(o + down_row) = out;
        *reinterpret_cast<Pack<T, VEC>*>(o + down_row + s.channels) = out;
      });
}

// Pass 3 of a down ResBlock's norm in normalize_nhwc's geometry over the output's pixels: a
// thread holds its channels' coefficients and makes the 2x2 average of the normalised (and
// SiLU'd) input packs of each output pixel of its chunk, four loads in flight (faster than
// normalize_down at every down norm's shape; docs/speed.md).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) normalize_down_nhwc(const T* __restrict__ x, const float2* __restrict__ coef,
                                                            T* __restrict__ y, Shape s, bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t b = blockIdx.y;
  const int c0 = threadIdx.x * VEC;
  float2 cf[VEC];
  load_coefficients<VEC, true>(coef + b * s.channels + c0, cf);
  const int width = static_cast<int>(s.width), out_w = width / 2;
  const int out_hw = static_cast<int>(s.hw / s.width / 2) * out_w;
  const T* in_sample = x + b * s.hw * s.channels + c0;
  T* out_sample = y + b * out_hw * s.channels + c0;
  const int64_t begin = blockIdx.x * s.chunk_len, end = min(static_cast<int64_t>(out_hw), begin + s.chunk_len);
  for (int64_t o = begin + threadIdx.y; o < end; o += blockDim.y) {
    const int oy = static_cast<int>(o) / out_w, ox = static_cast<int>(o) - oy * out_w;
    const T* in = in_sample + (static_cast<int64_t>(2 * oy) * width + 2 * ox) * s.channels;
    Pack<T, VEC> quad[4];
#pragma unroll
    for (int d = 0; d < 4; ++d) quad[d] = *reinterpret_cast<const Pack<T, VEC>*>(in + ((d / 2) * width + d % 2) * s.channels);
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
#pragma unroll
    for (int d = 0; d < 4; ++d) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float v = fmaf(to_float(quad[d].v[k]), cf[k].x, cf[k].y);
        if (silu) v = unclip_rt::silu_of(v);
        acc[k] += v;
      }
    }
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(0.25f * acc[k]);
    *reinterpret_cast<Pack<T, VEC>*>(out_sample + o * s.channels) = out;
  }
}

// Pass 3 of a down ResBlock's norm (NHWC only): each thread makes one pack of the 2x2
// average-pooled output from the four input packs it covers (normalised, SiLU'd, then averaged
// in float32), so the full-size normalised tensor is never written.
template <typename T, int VEC>
__global__ void normalize_down(const T* __restrict__ x, const float2* __restrict__ coef, T* __restrict__ y, Shape s,
                               bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int64_t height = s.hw / s.width, out_w = s.width / 2, out_hw = (height / 2) * out_w;
  const int64_t n = s.batch * s.channels * out_hw;
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (o >= n) return;
  const int64_t b = o / (out_hw * s.channels), within = o - b * out_hw * s.channels;
  const int64_t pixel = within / s.channels, c0 = within % s.channels;
  const int64_t oy = pixel / out_w, ox = pixel % out_w;
  float2 cf[VEC];
  load_coefficients<VEC, true>(coef + b * s.channels + c0, cf);
  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
#pragma unroll
  for (int d = 0; d < 4; ++d) {
    const int64_t iy = 2 * oy + d / 2, ix = 2 * ox + d % 2;
    const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + ((b * height + iy) * s.width + ix) * s.channels + c0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float v = fmaf(to_float(in.v[k]), cf[k].x, cf[k].y);
      if (silu) v = unclip_rt::silu_of(v);
      acc[k] += v;
    }
  }
  Pack<T, VEC> out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(0.25f * acc[k]);
  *reinterpret_cast<Pack<T, VEC>*>(y + o) = out;
}

template <typename T, int VEC>
void launch_normalize(const at::Tensor& x, const at::Tensor& coef, at::Tensor& y, const Shape& s, bool silu, bool nhwc,
                      cudaStream_t stream) {
  const int64_t n = s.down ? y.numel() : x.numel();  // one thread per pack of the output (down) or input
  const int64_t blocks = (n / VEC + kThreads - 1) / kThreads;
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* cp = reinterpret_cast<const float2*>(coef.data_ptr<float>());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  if (s.down) {
    unclip_rt::launch_overlapped(normalize_down<T, VEC>, dim3(blocks), dim3(kThreads), 0, stream, xp, cp, yp, s, silu);
  } else if (nhwc) {
    unclip_rt::launch_overlapped(normalize<T, VEC, true>, dim3(blocks), dim3(kThreads), 0, stream, xp, cp, yp, s, silu);
  } else {
    unclip_rt::launch_overlapped(normalize<T, VEC, false>, dim3(blocks), dim3(kThreads), 0, stream, xp, cp, yp, s, silu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void normalize_pass(const at::Tensor& x, const at::Tensor& coef, at::Tensor& y, Shape& s, bool silu, bool nhwc,
                    int elem, cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* cp = reinterpret_cast<const float2*>(coef.data_ptr<float>());
  constexpr int kPack = 16 / sizeof(T);  // elements of a 16-byte pack
  if (nhwc && s.channels % kPack == 0 && s.channels / kPack <= 1024 && unclip_rt::aligned16(x) &&
      unclip_rt::aligned16(y)) {
    const int lanes = static_cast<int>(s.channels / kPack);
    const dim3 block(lanes, std::max(1, kThreads / lanes));
    // chunks of each sample's pixels (down: of the output's)
    const auto chunks = unclip_rt::wide_chunks(s.batch, s.down ? s.hw / 4 : s.hw,
                                             unclip_rt::kElementwiseTargetBlocks);
    s.chunk_len = chunks.chunk_len;
    const dim3 grid(static_cast<unsigned>(chunks.chunks), static_cast<unsigned>(s.batch));
    auto* yp = reinterpret_cast<T*>(y.data_ptr());
    if (s.down) {
      unclip_rt::launch_overlapped(normalize_down_nhwc<T, kPack>, grid, block, 0, stream, xp, cp, yp, s, silu);
    } else if (s.phased) {
      unclip_rt::launch_overlapped(normalize_nhwc<T, kPack, true>, grid, block, 0, stream, xp, cp, yp, s, silu);
    } else {
      unclip_rt::launch_overlapped(normalize_nhwc<T, kPack, false>, grid, block, 0, stream, xp, cp, yp, s, silu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  TORCH_CHECK(!s.phased, "group_norm: the phased read needs the channels-last 16-byte pass");
  // Pass 3 vector width: NHWC packs run along channels (within one sample: VEC | channels);
  // NCHW packs along pixels of one channel (VEC | hw).
  const int nvec = pick_vec(nhwc ? s.channels : s.hw, x.data_ptr(), y.data_ptr(), elem);
  switch (nvec) {
    case 8: launch_normalize<T, 8>(x, coef, y, s, silu, nhwc, stream); break;
    case 4: launch_normalize<T, 4>(x, coef, y, s, silu, nhwc, stream); break;
    case 2: launch_normalize<T, 2>(x, coef, y, s, silu, nhwc, stream); break;
    default: launch_normalize<T, 1>(x, coef, y, s, silu, nhwc, stream); break;
  }
}

template void normalize_pass<float>(const at::Tensor&, const at::Tensor&, at::Tensor&, Shape&, bool, bool, int,
                                      cudaStream_t);
template void normalize_pass<__half>(const at::Tensor&, const at::Tensor&, at::Tensor&, Shape&, bool, bool, int,
                                      cudaStream_t);
template void normalize_pass<__nv_bfloat16>(const at::Tensor&, const at::Tensor&, at::Tensor&, Shape&, bool, bool, int,
                                      cudaStream_t);

}  // namespace unclip_rt::group_norm_parts
