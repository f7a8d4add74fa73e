// The group norm's statistics: pass 1 sums each chunk of each (sample, group) — shifted by one
// sample of the group (close to the mean), so the variance does not suffer the cancellation of a
// plain E[x^2] - E[x]^2 — and pass 2 folds the chunks in a fixed order (deterministic: no float
// atomics) into each channel's coefficients of pass 3's y = x * A + B. Splitting each row into
// chunks keeps the GPU busy where one block per (sample, group) would run 32 blocks at batch 1.

#include "group_norm_parts.cuh"

namespace unclip_rt::group_norm_parts {
namespace {

constexpr int64_t kNchwTargetBlocks = 528;  // NCHW statistics pass: ~4 blocks per SM of a 132-SM GPU (NHWC: wide_stats.cuh)

// Pass 1, NCHW: grid (chunks, batch*groups); each block sums one chunk of one contiguous group row.
template <typename T, int VEC>
__global__ void partial_nchw(const T* __restrict__ x, Add<T> add, float2* __restrict__ partial, Shape s) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ float2 smem[kThreads / 32];
  const int64_t row = blockIdx.y;
  const int64_t cg = s.channels / s.groups;
  const int64_t row_len = cg * s.hw;
  const T* base = x + row * row_len;
  // row = b * groups + g covers channels g*cg .. g*cg+cg-1.
  const int64_t b = row / s.groups, c_first = (row % s.groups) * cg;
  const float pivot = to_float(base[0]) + add.at(b, c_first);
  const int64_t begin = blockIdx.x * s.chunk_len;
  const int64_t end = min(row_len, begin + s.chunk_len);
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end; i += static_cast<int64_t>(blockDim.x) * VEC) {
    const auto p = *reinterpret_cast<const Pack<T, VEC>*>(base + i);
    const float a = add.any() ? add.at(b, c_first + i / s.hw) : 0.f;  // VEC | hw: one channel
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
__global__ void partial_nhwc(const T* __restrict__ x, Add<T> add, float2* __restrict__ partial, Shape s) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
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
  const float pivot = to_float(sample[g * cg]) + add.at(b, g * cg);
  float a[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) a[k] = valid ? add.at(b, c0 + k) : 0.f;
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

// Pass 1, NHWC, when a group's channel count is not a multiple of 8 (Karlo's 320 channels: 10 per
// group), or when it also concatenates (Concat): partial_nhwc's lanes would load 4 bytes each.
// Here every lane loads 16 bytes (8 channels) of a pixel, which span at most two groups (channels
// per group >= 8), keeps one shifted sum per group, and the block folds them per group in a fixed
// order (wide_stats.cuh, which the residual join's statistics share). grid (chunks, batch); block
// (channels / 8 lanes, rows).
template <typename T>
__global__ void partial_nhwc_wide(const T* __restrict__ x, Add<T> add, float2* __restrict__ partial, Shape s,
                                  Concat<T> concat) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  extern __shared__ float2 sums[];  // [rows][lanes][2]: the lane's first group, then its second
  const int rows = blockDim.y, r = threadIdx.y;
  const int64_t b = blockIdx.y;
  const int cg = static_cast<int>(s.channels / s.groups);
  const int c0 = threadIdx.x * 8, g_lo = c0 / cg, g_hi = (c0 + 7) / cg;
  const auto first_of = [&](int g) {  // pixel 0's value of group g's first channel, as finalize reads it
    const int c = g * cg;
    return to_float(concat.load(x, b, 0, c / 8 * 8, s).v[c % 8]) + add.at(b, c);
  };
  float added[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) added[k] = add.at(b, c0 + k);
  unclip_rt::WideSums acc(c0, cg, first_of(g_lo), first_of(g_hi), added);
  const int64_t begin = blockIdx.x * s.chunk_len;
  const int64_t end = min(s.hw, begin + s.chunk_len);
  for (int64_t p = begin + r; p < end; p += rows) {
    const auto v = concat.load(x, b, p, c0, s);
    if (concat.second != nullptr) *reinterpret_cast<Pack<T, 8>*>(concat.out + (b * s.hw + p) * s.channels + c0) = v;
    acc.accumulate(v);
  }
  acc.fold(sums, partial, b, s.groups, cg, s.chunks, blockIdx.x);
}

// Pass 2: fold the chunks of each (sample, group) into mean and 1/std; one warp per row, each
// lane summing a fixed stride of chunks, then a fixed shuffle tree (deterministic). The warp
// then writes, for each channel c of the group, the coefficients of pass 3's y = x * A + B
// (before SiLU): A = rstd * w[c] * (1 + scale), B = ((add[c] - mean) * rstd * w[c] + bias[c]) *
// (1 + scale) + shift — so pass 3 spends two loads and one FMA per element on the affine, the
// added embedding/bias and the FiLM scale/shift.
template <typename T, bool NHWC>
__global__ void finalize(const T* __restrict__ x, Add<T> add, const float2* __restrict__ partial,
                         const T* __restrict__ weight, const T* __restrict__ bias, Film<T> film,
                         float2* __restrict__ coef, Shape s, float eps) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= s.batch * s.groups) return;  // uniform across the warp
  float sum = 0.f, sq = 0.f;
  for (int c = lane; c < s.chunks; c += 32) {
    sum += partial[row * s.chunks + c].x;
    sq += partial[row * s.chunks + c].y;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffff, sum, offset);
    sq += __shfl_xor_sync(0xffffffff, sq, offset);
  }
  const int64_t b = row / s.groups, g = row % s.groups;
  const int64_t cg = s.channels / s.groups;
  float pivot = NHWC ? to_float(x[pixel_offset(s, b, 0) + g * cg]) : to_float(x[row * cg * s.hw]);
  pivot += add.at(b, g * cg);
  const float n = static_cast<float>(cg * s.hw);
  const float mean_shift = sum / n;
  const float var = fmaxf(sq / n - mean_shift * mean_shift, 0.f);
  const float mean = pivot + mean_shift, rstd = rsqrtf(var + eps);
  for (int64_t c = g * cg + lane; c < (g + 1) * cg; c += 32) {
    const float a = rstd * to_float(weight[c]);
    float scale = 1.f, shift = 0.f;
    if (film.scale != nullptr) {
      scale += to_float(film.scale[b * film.ld + c]);
      shift = to_float(film.shift[b * film.ld + c]);
    }
    coef[b * s.channels + c] = make_float2(a * scale, ((add.at(b, c) - mean) * a + to_float(bias[c])) * scale + shift);
  }
}

template <typename T, int VEC>
void launch_partial(const at::Tensor& x, Add<T> add, at::Tensor& partial, Shape& s, bool nhwc,
                    cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  auto* pp = reinterpret_cast<float2*>(partial.data_ptr<float>());
  if (nhwc) {
    const int lanes = s.groups_per_block * static_cast<int>(s.channels / s.groups / VEC);
    const int rows = std::max(1, kThreads / lanes);
    const dim3 block(lanes, rows);
    const dim3 grid(s.chunks, static_cast<unsigned>(s.batch), (s.groups + s.groups_per_block - 1) / s.groups_per_block);
    unclip_rt::launch_overlapped(partial_nhwc<T, VEC>, dim3(grid), dim3(block), sizeof(float2) * lanes * rows, stream, xp, add, pp, s);
  } else {
    const dim3 grid(s.chunks, static_cast<unsigned>(s.batch * s.groups));
    unclip_rt::launch_overlapped(partial_nchw<T, VEC>, dim3(grid), dim3(kThreads), 0, stream, xp, add, pp, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Pass 1 over x: its geometry (~4 blocks per SM over the whole tensor), its partial sums
// [batch * groups, chunks, 2] (float32) and the choice of kernel. With `concat` it reads its two
// sources (pass1_x, concat.second) and writes x: the wide pass.
template <typename T>
at::Tensor statistics_pass(const at::Tensor& x, Add<T> add_ptr, Shape& s, int64_t cg, bool nhwc, int elem,
                           cudaStream_t stream, const T* pass1_x, Concat<T> concat) {
  const int64_t groups = s.groups;
  int vec;
  if (nhwc) {
    vec = pick_vec(cg, x.data_ptr(), x.data_ptr(), elem);
    const int64_t lanes_per_group = cg / vec;
    TORCH_CHECK(lanes_per_group <= 1024, "group_norm: too many channels per group for the NHWC kernel");
    s.groups_per_block = static_cast<int>(std::min<int64_t>(groups, 1024 / lanes_per_group));
    const auto chunks = unclip_rt::wide_chunks(s.batch, s.hw);  // partial_nhwc's too
    s.chunk_len = chunks.chunk_len;
    s.chunks = chunks.chunks;
  } else {
    const int64_t row_len = cg * s.hw;
    vec = pick_vec(s.hw, x.data_ptr(), x.data_ptr(), elem);
    const int64_t want = std::max<int64_t>(1, kNchwTargetBlocks / (s.batch * groups));
    s.chunk_len = std::max<int64_t>(kThreads * vec, (row_len + want - 1) / want);
    s.chunk_len = (s.chunk_len + vec - 1) / vec * vec;
    s.chunks = static_cast<int>((row_len + s.chunk_len - 1) / s.chunk_len);
  }
  auto partial = at::empty({s.batch * groups, s.chunks, 2}, x.options().dtype(at::kFloat));
  const bool wide = concat.second != nullptr || s.phased ||  // the phased read: the wide pass only
                    (nhwc && cg % 8 != 0 && wide_geometry_fits(cg, s.channels, groups) &&
                     unclip_rt::aligned16(x) && elem == 2);
  if (wide) {
    const dim3 block = unclip_rt::wide_block(s.channels);
    unclip_rt::launch_overlapped(partial_nhwc_wide<T>, dim3(s.chunks, static_cast<unsigned>(s.batch)), block,
                                 unclip_rt::wide_shared_bytes(block), stream,
                                 concat.second != nullptr ? pass1_x : reinterpret_cast<const T*>(x.data_ptr()), add_ptr,
                                 reinterpret_cast<float2*>(partial.data_ptr<float>()), s, concat);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else switch (vec) {
    case 8: launch_partial<T, 8>(x, add_ptr, partial, s, nhwc, stream); break;
    case 4: launch_partial<T, 4>(x, add_ptr, partial, s, nhwc, stream); break;
    case 2: launch_partial<T, 2>(x, add_ptr, partial, s, nhwc, stream); break;
    default: launch_partial<T, 1>(x, add_ptr, partial, s, nhwc, stream); break;
  }
  return partial;
}

template <typename T>
void coefficients_pass(const at::Tensor& x, Add<T> add, const at::Tensor& partial, const at::Tensor& weight,
                       const at::Tensor& bias, Film<T> film, at::Tensor& coef, const Shape& s, double eps, bool nhwc,
                       cudaStream_t stream) {
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const int64_t rows = s.batch * s.groups;
  const int fin_blocks = static_cast<int>((rows + 7) / 8);  // 8 warps of 32 per block, one warp per row
  const auto* pp = reinterpret_cast<const float2*>(partial.data_ptr<float>());
  auto* cp = reinterpret_cast<float2*>(coef.data_ptr<float>());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr());
  const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
  if (nhwc) {
    unclip_rt::launch_overlapped(finalize<T, true>, dim3(fin_blocks), dim3(256), 0, stream, xp, add, pp, wp, bp, film, cp, s, eps);
  } else {
    unclip_rt::launch_overlapped(finalize<T, false>, dim3(fin_blocks), dim3(256), 0, stream, xp, add, pp, wp, bp, film, cp, s, eps);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template at::Tensor statistics_pass<float>(const at::Tensor&, Add<float>, Shape&, int64_t, bool, int, cudaStream_t,
                                            const float*, Concat<float>);
template at::Tensor statistics_pass<__half>(const at::Tensor&, Add<__half>, Shape&, int64_t, bool, int, cudaStream_t,
                                            const __half*, Concat<__half>);
template at::Tensor statistics_pass<__nv_bfloat16>(const at::Tensor&, Add<__nv_bfloat16>, Shape&, int64_t, bool, int, cudaStream_t,
                                            const __nv_bfloat16*, Concat<__nv_bfloat16>);
template void coefficients_pass<float>(const at::Tensor&, Add<float>, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, Film<float>, at::Tensor&, const Shape&, double, bool, cudaStream_t);
template void coefficients_pass<__half>(const at::Tensor&, Add<__half>, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, Film<__half>, at::Tensor&, const Shape&, double, bool, cudaStream_t);
template void coefficients_pass<__nv_bfloat16>(const at::Tensor&, Add<__nv_bfloat16>, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, Film<__nv_bfloat16>, at::Tensor&, const Shape&, double, bool, cudaStream_t);

}  // namespace unclip_rt::group_norm_parts
