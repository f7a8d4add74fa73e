// The one-launch group norm for channels-last half-precision maps, bundled and optionally split
// over a thread-block cluster (Hopper), opt-in through set_norm_clusters.
//
// Bundled: one block (or cluster) takes 8 / gcd(cg, 8) adjacent groups, so that the channels it
// owns fill whole 16-byte packs. The plain one-launch kernel gives each group its own block, and
// where a group's channel count is not a multiple of 8 (the decoder's 320 channels in 32 groups:
// 10 a group) every pack it writes is shared with the next group's block and is stored element
// by element, a sector transaction per element; bundled, every store is a whole pack.
// In a cluster: the bundle's pixels are split over `ranks` blocks; each sums its share per group,
// thread 0 of every block folds all the blocks' sums through distributed shared memory in rank
// order (every block gets the same statistics, and the same from run to run), and each block
// normalises its share.

#include <cooperative_groups.h>

#include <atomic>

#include "group_norm_parts.cuh"

namespace unclip_rt::group_norm_parts {
namespace {

__device__ __forceinline__ unsigned rank_in_cluster() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

// Waits for every block of the cluster (and orders their shared-memory writes before the reads
// after it).
__device__ __forceinline__ void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#endif
}

// Block `rank`'s copy of `local` (a shared-memory address of this block) in the cluster.
__device__ __forceinline__ const float2* in_block(float2* local, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(local, rank);
#else
  return local;
#endif
}

// BUNDLE groups of cg channels per block or cluster (BUNDLE * cg a multiple of 8, at most
// kBundleMaxChannels); `ranks` consecutive blocks (one cluster, CLUSTER) share a bundle, block r
// its pixels [hw * r / ranks, hw * (r + 1) / ranks).
template <typename T, int BUNDLE, bool CLUSTER>
__global__ void __launch_bounds__(kOnePassThreads) bundled(const T* __restrict__ x, Add<T> add,
                                                           const T* __restrict__ weight, const T* __restrict__ bias,
                                                           Film<T> film, T* __restrict__ y, Shape s, float eps,
                                                           bool silu, int ranks) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ float2 smem[kOnePassThreads / 32];
  __shared__ float added[kBundleMaxChannels];
  __shared__ unsigned char group_of[kBundleMaxChannels];  // each channel's group within the bundle
  __shared__ float2 coef[kBundleMaxChannels];
  __shared__ float2 partial[BUNDLE];  // this block's sums per group (read by the cluster's other blocks)
  __shared__ float2 stats[BUNDLE];
  using P8 = Pack<T, 8>;
  const int rank = CLUSTER ? static_cast<int>(rank_in_cluster()) : 0;
  const int bundles = s.groups / BUNDLE;
  const int64_t row = blockIdx.x / ranks;  // (sample, bundle)
  const int64_t b = row / bundles;
  const int cg = static_cast<int>(s.channels / s.groups), width = cg * BUNDLE;
  const int c0 = static_cast<int>(row % bundles) * width, packs = width / 8;  // c0 a multiple of 8
  const int p0 = static_cast<int>(s.hw * rank / ranks), p1 = static_cast<int>(s.hw * (rank + 1) / ranks);
  const int items = (p1 - p0) * packs;
  const int64_t sample = b * s.hw * s.channels;
  for (int c = threadIdx.x; c < width; c += kOnePassThreads) {
    added[c] = add.at(b, c0 + c);
    group_of[c] = static_cast<unsigned char>(c / cg);
  }
  __syncthreads();
  // each group's sums are shifted by its first element (pixel 0, its first channel): every block
  // of a cluster uses the same shifts
  float pivot[BUNDLE];
  float2 acc[BUNDLE];
#pragma unroll
  for (int g = 0; g < BUNDLE; ++g) {
    pivot[g] = to_float(x[sample + c0 + g * cg]) + added[g * cg];
    acc[g] = make_float2(0.f, 0.f);
  }
  for (int e = threadIdx.x; e < items; e += kOnePassThreads) {
    const int local = e / packs, first = (e - local * packs) * 8;  // the pack's first channel - c0
    const P8 in = *reinterpret_cast<const P8*>(x + sample + static_cast<int64_t>(p0 + local) * s.channels + c0 + first);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int group = group_of[first + k];
      const float v = to_float(in.v[k]) + added[first + k];
#pragma unroll
      for (int g = 0; g < BUNDLE; ++g) {
        if (group == g) {
          const float d = v - pivot[g];
          acc[g].x += d;
          acc[g].y += d * d;
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < BUNDLE; ++g) {
    const float2 total = block_sum(acc[g], smem);  // valid in thread 0
    if (threadIdx.x == 0) partial[g] = total;
    __syncthreads();  // smem is reused by the next group's sum
  }
  if (CLUSTER) cluster_barrier();  // every block's partial sums written
  if (threadIdx.x < BUNDLE) {
    const int g = threadIdx.x;
    float2 total = make_float2(0.f, 0.f);
    for (int r = 0; r < ranks; ++r) {  // rank order: the same sums in every block
      const float2 p = CLUSTER ? in_block(partial, r)[g] : partial[g];
      total.x += p.x;
      total.y += p.y;
    }
    const float n = static_cast<float>(cg * s.hw);
    const float mean_shift = total.x / n;
    stats[g] = make_float2(pivot[g] + mean_shift, rsqrtf(fmaxf(total.y / n - mean_shift * mean_shift, 0.f) + eps));
  }
  if (CLUSTER) {
    cluster_barrier();  // stats visible in the block; no block leaves while another reads its partial sums
  } else {
    __syncthreads();
  }
  for (int c = threadIdx.x; c < width; c += kOnePassThreads) {
    coef[c] = channel_coefficients(stats[group_of[c]], added[c], weight, bias, film, b, c0 + c);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < items; e += kOnePassThreads) {
    const int local = e / packs, first = (e - local * packs) * 8;
    const int64_t i = sample + static_cast<int64_t>(p0 + local) * s.channels + c0 + first;
    const P8 in = *reinterpret_cast<const P8*>(x + i);
    P8 out;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float2 ab = coef[first + k];
      float v = to_float(in.v[k]) * ab.x + ab.y;
      if (silu) v = unclip_rt::silu_of(v);
      out.v[k] = from_float<T>(v);
    }
    store_pack<T, 8, true>(y, out, i, b, s);
  }
}

template <typename T, int BUNDLE>
void launch_bundled(const T* x, Add<T> add, const T* weight, const T* bias, Film<T> film, T* y, const Shape& s,
                    float eps, bool silu, int ranks, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(s.batch * (s.groups / BUNDLE) * ranks);
  if (ranks > 1) {
    unclip_rt::launch_overlapped_in_clusters(bundled<T, BUNDLE, true>, dim3(blocks), dim3(kOnePassThreads),
                                             static_cast<unsigned>(ranks), 0, stream, x, add, weight, bias, film, y,
                                             s, eps, silu, ranks);
  } else {
    unclip_rt::launch_overlapped(bundled<T, BUNDLE, false>, dim3(blocks), dim3(kOnePassThreads), 0, stream, x, add,
                                 weight, bias, film, y, s, eps, silu, 1);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Never, by default: measured slower than the plain kernels in the decoder's graphs (docs/kernels.md).
std::atomic<int> cluster_setting{1};

// The groups of `cg` channels a bundle takes: the fewest whose channels fill whole 8-channel packs.
int bundle_of(int64_t cg) {
  int64_t a = cg, b = 8;
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return static_cast<int>(8 / a);
}

}  // namespace

int norm_cluster_setting() { return cluster_setting.load(std::memory_order_relaxed); }

void set_norm_cluster_setting(int setting) {
  TORCH_CHECK(setting == 0 || setting == 1 || setting == 2 || setting == 4 || setting == 8,
              "set_norm_clusters: 0 (by size), 1 (never), 2, 4 or 8 blocks per group");
  cluster_setting.store(setting, std::memory_order_relaxed);
}

int cluster_ranks(int64_t cg, int64_t hw, int64_t channels) {
  const int setting = norm_cluster_setting();
  if (setting == 1 || cg <= 0 || channels % cg != 0) return 0;
  const int bundle = bundle_of(cg);
  const int64_t groups = channels / cg, elements = cg * bundle * hw;  // one bundle's
  if (groups % bundle != 0 || cg * bundle > kBundleMaxChannels || cg * hw > kClusterMaxElements ||
      hw * cg * bundle / 8 >= (int64_t{1} << 31) || unclip_rt::current_device_major() < 9) {
    return 0;
  }
  int ranks = setting;
  if (setting == 0) {
    ranks = 1;
    while (ranks < kClusterMaxRanks && elements > ranks * kClusterElementsPerBlock) ranks *= 2;
  }
  return hw >= ranks ? ranks : 0;
}

template <typename T>
void bundled_norm(const at::Tensor& x, Add<T> add, const at::Tensor& weight, const at::Tensor& bias, Film<T> film,
                  at::Tensor& y, const Shape& s, double eps, bool silu, int ranks, cudaStream_t stream) {
  const int64_t cg = s.channels / s.groups;
  TORCH_CHECK(unclip_rt::aligned16(x) && unclip_rt::aligned16(y) && s.channels % 8 == 0,
              "group_norm: the bundled kernel needs 16-byte aligned maps of a multiple of 8 channels");
  const auto* xp = reinterpret_cast<const T*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const T*>(weight.data_ptr());
  const auto* bp = reinterpret_cast<const T*>(bias.data_ptr());
  auto* yp = reinterpret_cast<T*>(y.data_ptr());
  const auto e = static_cast<float>(eps);
  switch (bundle_of(cg)) {
    case 1: launch_bundled<T, 1>(xp, add, wp, bp, film, yp, s, e, silu, ranks, stream); break;
    case 2: launch_bundled<T, 2>(xp, add, wp, bp, film, yp, s, e, silu, ranks, stream); break;
    case 4: launch_bundled<T, 4>(xp, add, wp, bp, film, yp, s, e, silu, ranks, stream); break;
    default: launch_bundled<T, 8>(xp, add, wp, bp, film, yp, s, e, silu, ranks, stream); break;
  }
}

template void bundled_norm<__half>(const at::Tensor&, Add<__half>, const at::Tensor&, const at::Tensor&, Film<__half>,
                                   at::Tensor&, const Shape&, double, bool, int, cudaStream_t);
template void bundled_norm<__nv_bfloat16>(const at::Tensor&, Add<__nv_bfloat16>, const at::Tensor&,
                                          const at::Tensor&, Film<__nv_bfloat16>, at::Tensor&, const Shape&, double,
                                          bool, int, cudaStream_t);

}  // namespace unclip_rt::group_norm_parts
