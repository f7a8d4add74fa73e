// Group statistics of channels-last half-precision maps in the "wide" geometry, shared by the
// group norm's statistics pass (group_norm.cu, partial_nhwc_wide) and the residual join that
// computes them for the norm after it (residual.cu, bias_residual_stats): grid (chunks, batch),
// block (channels / 8 lanes, rows). Lane l holds channels [8l, 8l + 8) of the pixels
// begin + r, begin + r + rows, ... of its chunk; those 8 channels span at most two groups, so it
// keeps two shifted sums, and the block folds them per group in a fixed order (deterministic).
// Both kernels sharing this code and this geometry is what makes a norm over the join's
// statistics give the same bits as a norm that sums its input itself.

#pragma once

#include <algorithm>
#include <cstdint>

#include "elementwise.cuh"

namespace unclip_rt {

constexpr int kWideThreads = 256;
constexpr int64_t kWideTargetBlocks = 528;  // ~4 blocks per SM of a 132-SM GPU over the whole tensor

// Whether the wide geometry serves `channels` in `groups` of `cg`: one lane per 8 channels (at
// most 1024 lanes, at least one per group), a lane's 8 channels spanning at most two groups.
inline bool wide_geometry_fits(int64_t cg, int64_t channels, int64_t groups) {
  return cg >= 8 && channels % 8 == 0 && channels / 8 >= groups && channels / 8 <= 1024;
}

// How a [batch, hw, channels] map is split: `chunks` pieces of `chunk_len` pixels per sample.
struct WideChunks {
  int64_t chunk_len;
  int chunks;
};

// The split into about `target_blocks` blocks over the whole batch (the statistics passes':
// kWideTargetBlocks, one wave).
inline WideChunks wide_chunks(int64_t batch, int64_t hw, int64_t target_blocks = kWideTargetBlocks) {
  const int64_t want = std::max<int64_t>(1, target_blocks / batch);
  const int64_t chunk_len = std::max<int64_t>(1, (hw + want - 1) / want);
  return {chunk_len, static_cast<int>((hw + chunk_len - 1) / chunk_len)};
}

// The group norm's NHWC normalising passes (normalize_nhwc, normalize_down_nhwc): the same
// (channels / 8 lanes, rows) blocks over more, shorter chunks, ~8 blocks per SM of a 132-SM GPU
// (they keep no per-block sums, so more blocks cost nothing to fold). The residual join in this
// geometry was slower than its flat kernel, so it keeps that.
constexpr int64_t kElementwiseTargetBlocks = 1056;

// Lanes and rows of a wide block for `channels` channels.
inline dim3 wide_block(int64_t channels) {
  const int lanes = static_cast<int>(channels / 8);
  return dim3(lanes, std::max(1, kWideThreads / lanes));
}

// Dynamic shared memory of a wide block.
inline size_t wide_shared_bytes(dim3 block) { return sizeof(float2) * 2 * block.x * block.y; }

// One lane's shifted sums over its 8 channels c0 .. c0+7 (groups of cg channels): channel k
// counts towards the lane's first group (lo) or second (hi), shifted by `shift[k]`.
struct WideSums {
  float2 lo = make_float2(0.f, 0.f), hi = make_float2(0.f, 0.f);
  float shift[8];
  bool second[8];

  // pivot_lo / pivot_hi: the pivots of the lane's two groups; add[k]: what the norm adds to
  // channel c0 + k before normalising (0 where nothing)
  __device__ __forceinline__ WideSums(int c0, int cg, float pivot_lo, float pivot_hi, const float (&add)[8]) {
    const int g_lo = c0 / cg;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      second[k] = (c0 + k) / cg != g_lo;
      shift[k] = add[k] - (second[k] ? pivot_hi : pivot_lo);
    }
  }

  template <typename T>
  __device__ __forceinline__ void accumulate(const Pack<T, 8>& v) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float d = to_float(v.v[k]) + shift[k];
      if (second[k]) {
        hi.x += d;
        hi.y += d * d;
      } else {
        lo.x += d;
        lo.y += d * d;
      }
    }
  }

  // Fold the block's sums (rows in order, then each group's lanes in order) and write each
  // group's total for this chunk: partial[(b * groups + g) * chunks + chunk]. `sums` is the
  // block's dynamic shared memory (wide_shared_bytes). Every thread of the block calls it.
  __device__ __forceinline__ void fold(float2* sums, float2* __restrict__ partial, int64_t b, int groups, int cg,
                                       int chunks, int chunk) {
    const int lanes = blockDim.x, rows = blockDim.y;
    const int lane = threadIdx.x, r = threadIdx.y;
    sums[(r * lanes + lane) * 2] = lo;
    sums[(r * lanes + lane) * 2 + 1] = hi;
    __syncthreads();
    if (r == 0) {
      for (int rr = 1; rr < rows; ++rr) {
        const float2 a = sums[(rr * lanes + lane) * 2], c = sums[(rr * lanes + lane) * 2 + 1];
        lo.x += a.x;
        lo.y += a.y;
        hi.x += c.x;
        hi.y += c.y;
      }
      sums[lane * 2] = lo;
      sums[lane * 2 + 1] = hi;
    }
    __syncthreads();
    const int g = r * lanes + lane;  // one thread per group: the lanes it spans, in order
    if (g < groups) {
      float2 total = make_float2(0.f, 0.f);
      for (int l = g * cg / 8; l <= ((g + 1) * cg - 1) / 8; ++l) {
        const float2 part = sums[l * 2 + ((l * 8) / cg == g ? 0 : 1)];
        total.x += part.x;
        total.y += part.y;
      }
      partial[(b * groups + g) * chunks + chunk] = total;
    }
  }
};

}  // namespace unclip_rt
