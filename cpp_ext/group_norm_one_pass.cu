// The group norm in one launch, for small maps (the decoder's 8x8 to 32x32): one block per
// (sample, group) sums its group (shifted, as the statistics pass), folds the sums in a fixed
// order, then normalises the same elements again (an L1/L2 hit: a group is at most tens of
// kilobytes). Three launches of a few microseconds each cost more than the work at these sizes.

#include "group_norm_parts.cuh"

namespace unclip_rt::group_norm_parts {
namespace {

// A one-pass block's group statistics (mean, 1/std) from its threads' sums shifted by `pivot`:
// thread 0 folds them (block_sum's fixed order), every thread gets them through `stats`.
__device__ __forceinline__ float2 one_pass_stats(float2 acc, float2* smem, float2* stats, float pivot, float n,
                                                 float eps) {
  const float2 total = block_sum(acc, smem);
  if (threadIdx.x == 0) {
    const float mean_shift = total.x / n;
    *stats = make_float2(pivot + mean_shift, rsqrtf(fmaxf(total.y / n - mean_shift * mean_shift, 0.f) + eps));
  }
  __syncthreads();
  return *stats;
}

template <typename T, int VEC, bool NHWC>
__global__ void __launch_bounds__(kOnePassThreads) one_pass(const T* __restrict__ x, Add<T> add,
                                                            const T* __restrict__ weight, const T* __restrict__ bias,
                                                            Film<T> film, T* __restrict__ y, Shape s, float eps,
                                                            bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ float2 smem[kOnePassThreads / 32];
  __shared__ float2 stats;
  const int64_t b = blockIdx.x / s.groups, g = blockIdx.x % s.groups;
  const int64_t cg = s.channels / s.groups;
  const int64_t packs = cg * s.hw / VEC;
  // Pack e of the group: NHWC pixel e*VEC / cg at channels g*cg + (e*VEC) % cg (VEC | cg); NCHW
  // the group's contiguous row at e*VEC, channel g*cg + e*VEC / hw (VEC | hw).
  const auto offset = [&](int64_t e, int64_t& c) -> int64_t {
    const int64_t i = e * VEC;
    if (NHWC) {
      c = g * cg + i % cg;
      return (b * s.hw + i / cg) * s.channels + c;
    }
    c = g * cg + i / s.hw;
    return (b * s.channels + g * cg) * s.hw + i;
  };
  int64_t c_first;
  const float pivot = to_float(x[offset(0, c_first)]) + add.at(b, c_first);
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t e = threadIdx.x; e < packs; e += kOnePassThreads) {
    int64_t c;
    const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + offset(e, c));
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = to_float(in.v[k]) + add.at(b, NHWC ? c + k : c) - pivot;
      acc.x += d;
      acc.y += d * d;
    }
  }
  const float2 st = one_pass_stats(acc, smem, &stats, pivot, static_cast<float>(cg * s.hw), eps);
  for (int64_t e = threadIdx.x; e < packs; e += kOnePassThreads) {
    int64_t c0;
    const int64_t at = offset(e, c0);
    const auto in = *reinterpret_cast<const Pack<T, VEC>*>(x + at);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t c = NHWC ? c0 + k : c0;
      float v = (to_float(in.v[k]) + add.at(b, c) - st.x) * st.y * to_float(weight[c]) + to_float(bias[c]);
      if (film.scale != nullptr) v = v * (1.f + to_float(film.scale[b * film.ld + c])) + to_float(film.shift[b * film.ld + c]);
      if (silu) v = unclip_rt::silu_of(v);
      out.v[k] = from_float<T>(v);
    }
    store_pack<T, VEC, NHWC>(y, out, at, b, s);
  }
}

// one_pass for NHWC half-precision maps (channels a multiple of 8, groups of at most
// kOnePassMaxGroupChannels channels). Each item is one 16-byte pack of the run covering the
// group's channels in one pixel (when a group's channel count is not a multiple of 8 — the
// decoder's 16x16 maps: 960 channels, 30 per group — the edge packs hold other groups' channels,
// which are skipped; one_pass would load 2 channels at a time). The group's per-channel terms are
// read once into shared memory: the added embedding/bias for the statistics, then the normalising
// pass's y = x * A + B coefficients (finalize's formula), so an element costs one FMA and no
// global loads beyond its own. Packs wholly inside the group are stored whole, edge packs
// element by element (other blocks own their other channels).
template <typename T>
__global__ void __launch_bounds__(kOnePassThreads) one_pass_nhwc(const T* __restrict__ x, Add<T> add,
                                                                 const T* __restrict__ weight,
                                                                 const T* __restrict__ bias, Film<T> film,
                                                                 T* __restrict__ y, Shape s, float eps, bool silu) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ float2 smem[kOnePassThreads / 32];
  __shared__ float added[kOnePassMaxGroupChannels];
  __shared__ float2 coef[kOnePassMaxGroupChannels];
  __shared__ float2 stats;
  using P8 = Pack<T, 8>;
  const int64_t b = blockIdx.x / s.groups, g = blockIdx.x % s.groups;
  const int cg = static_cast<int>(s.channels / s.groups), c0 = static_cast<int>(g) * cg;
  const int first_pack = c0 / 8, span = (c0 + cg + 7) / 8 - first_pack;  // packs per pixel
  const int items = static_cast<int>(s.hw) * span;
  const int64_t sample = b * s.hw * s.channels;
  for (int c = threadIdx.x; c < cg; c += kOnePassThreads) added[c] = add.at(b, c0 + c);
  __syncthreads();
  const float pivot = to_float(x[sample + c0]) + added[0];
  float2 acc = make_float2(0.f, 0.f);
  for (int e = threadIdx.x; e < items; e += kOnePassThreads) {
    const int pixel = e / span, within = (first_pack + e - pixel * span) * 8 - c0;  // pack's first channel - c0
    const P8 in = *reinterpret_cast<const P8*>(x + sample + static_cast<int64_t>(pixel) * s.channels + c0 + within);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (static_cast<unsigned>(within + k) >= static_cast<unsigned>(cg)) continue;
      const float d = to_float(in.v[k]) + added[within + k] - pivot;
      acc.x += d;
      acc.y += d * d;
    }
  }
  const float2 st = one_pass_stats(acc, smem, &stats, pivot, static_cast<float>(cg * s.hw), eps);
  for (int c = threadIdx.x; c < cg; c += kOnePassThreads) {
    const int64_t cc = c0 + c;
    const float a = st.y * to_float(weight[cc]);
    float scale_a = a, shift_b = (added[c] - st.x) * a + to_float(bias[cc]);
    if (film.scale != nullptr) {
      const float sc = 1.f + to_float(film.scale[b * film.ld + cc]);
      scale_a *= sc;
      shift_b = shift_b * sc + to_float(film.shift[b * film.ld + cc]);
    }
    coef[c] = make_float2(scale_a, shift_b);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < items; e += kOnePassThreads) {
    const int pixel = e / span, within = (first_pack + e - pixel * span) * 8 - c0;
    const int64_t i = sample + static_cast<int64_t>(pixel) * s.channels + c0 + within;
    const P8 in = *reinterpret_cast<const P8*>(x + i);
    P8 out;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (static_cast<unsigned>(within + k) >= static_cast<unsigned>(cg)) continue;
      const float2 ab = coef[within + k];
      float v = to_float(in.v[k]) * ab.x + ab.y;
      if (silu) v = unclip_rt::silu_of(v);
      out.v[k] = from_float<T>(v);
    }
    if (within >= 0 && within + 8 <= cg) {
      store_pack<T, 8, true>(y, out, i, b, s);
    } else {
      for (int k = 0; k < 8; ++k) {
        if (static_cast<unsigned>(within + k) >= static_cast<unsigned>(cg)) continue;
        Pack<T, 1> one;
        one.v[0] = out.v[k];
        store_pack<T, 1, true>(y, one, i + k, b, s);
      }
    }
  }
}

template <typename T, int VEC>
void launch_one_pass(const at::Tensor& x, Add<T> add, const at::Tensor& weight, const at::Tensor& bias, Film<T> film,
                     at::Tensor& y, const Shape& s, double eps, bool silu, bool nhwc, cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr());
  const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  const auto blocks = static_cast<unsigned>(s.batch * s.groups);
  if (nhwc) {
    unclip_rt::launch_overlapped(one_pass<T, VEC, true>, dim3(blocks), dim3(kOnePassThreads), 0, stream, xp, add, wp, bp, film, yp, s, static_cast<float>(eps), silu);
  } else {
    unclip_rt::launch_overlapped(one_pass<T, VEC, false>, dim3(blocks), dim3(kOnePassThreads), 0, stream, xp, add, wp, bp, film, yp, s, static_cast<float>(eps), silu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void one_pass_norm(const at::Tensor& x, Add<T> add, const at::Tensor& weight, const at::Tensor& bias, Film<T> film,
                   at::Tensor& y, const Shape& s, double eps, bool silu, bool nhwc, int elem, cudaStream_t stream) {
  const int64_t cg = s.channels / s.groups;
  const int v = pick_vec(nhwc ? cg : s.hw, x.data_ptr(), y.data_ptr(), elem);
  if (nhwc && elem == 2 && s.channels % 8 == 0 && cg <= kOnePassMaxGroupChannels &&
      s.hw * ((cg + 14) / 8) < (int64_t{1} << 31) && unclip_rt::aligned16(x) && unclip_rt::aligned16(y)) {
    unclip_rt::launch_overlapped(one_pass_nhwc<T>, dim3(static_cast<unsigned>(s.batch * s.groups)), dim3(kOnePassThreads), 0, stream,
        reinterpret_cast<const T*>(x.data_ptr()), add, reinterpret_cast<const T*>(weight.data_ptr()),
        reinterpret_cast<const T*>(bias.data_ptr()), film, reinterpret_cast<T*>(y.data_ptr()), s,
        static_cast<float>(eps), silu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  switch (v) {
    case 8: launch_one_pass<T, 8>(x, add, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
    case 4: launch_one_pass<T, 4>(x, add, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
    case 2: launch_one_pass<T, 2>(x, add, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
    default: launch_one_pass<T, 1>(x, add, weight, bias, film, y, s, eps, silu, nhwc, stream); break;
  }
}

template void one_pass_norm<float>(const at::Tensor&, Add<float>, const at::Tensor&, const at::Tensor&, Film<float>,
                                     at::Tensor&, const Shape&, double, bool, bool, int, cudaStream_t);
template void one_pass_norm<__half>(const at::Tensor&, Add<__half>, const at::Tensor&, const at::Tensor&, Film<__half>,
                                     at::Tensor&, const Shape&, double, bool, bool, int, cudaStream_t);
template void one_pass_norm<__nv_bfloat16>(const at::Tensor&, Add<__nv_bfloat16>, const at::Tensor&, const at::Tensor&, Film<__nv_bfloat16>,
                                     at::Tensor&, const Shape&, double, bool, bool, int, cudaStream_t);

}  // namespace unclip_rt::group_norm_parts
