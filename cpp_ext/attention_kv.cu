// The decoder attention's keys and values of one step, packed for flash attention's
// variable-length form: per sample, the image positions' keys/values (from the QKV projection's
// output, Karlo's per-head [q | k | v] layout) followed by the context tokens' cached keys/values
// with the kept tokens first, and the count of keys each sample uses (image positions + kept
// context tokens), so the context padding needs no additive mask.
//
// Why: torch's path concatenates the cached context keys and the image keys (two copies per
// attention block) and runs cuDNN's SDPA with an additive [B, 1, 1, N] mask; flash attention's
// varlen kernel with `seqused_k` (no mask to read) is faster at the decoder's shapes, and this pack
// costs less than the concatenations it replaces (docs/speed.md). Attention does not depend on
// the order of its keys, so moving
// the kept context tokens first is exact.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include "half_tensors.h"
#include "pdl.cuh"

namespace {

constexpr int kMaxThreads = 1024;

// grid (hw + n_ctx, B): one block per packed row. Row r < hw of sample b is image position r;
// row hw + k is the context token of rank k (kept tokens in order, then the dropped ones), which
// the block's first warp finds by ballots over the keep mask. Data move in 16-byte packs of 8
// half-precision values (`ch` is a multiple of 8), one pack per thread.
__global__ void pack_attention_kv_kernel(const uint4* __restrict__ qkv, const uint4* __restrict__ ctx,
                                         const bool* __restrict__ keep, uint4* __restrict__ out,
                                         int* __restrict__ used, int hw, int n_ctx, int heads, int ch,
                                         int64_t ctx_b, int64_t ctx_kv) {
  unclip_rt::wait_for_producers();  // pdl.cuh: nothing is read or written before
  unclip_rt::allow_dependents();
  __shared__ int source;
  const int r = blockIdx.x, b = blockIdx.y, rows = hw + n_ctx;
  if (r >= hw) {  // a context row: which token has rank r - hw
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      const bool* keep_b = keep + static_cast<int64_t>(b) * n_ctx;
      int kept = 0;
      for (int base = 0; base < n_ctx; base += 32)
        kept += __popc(__ballot_sync(0xffffffffu, base + lane < n_ctx && keep_b[base + lane]));
      const int rank = r - hw;
      const bool want_kept = rank < kept;
      const int target = want_kept ? rank : rank - kept;  // its place among the kept (or the dropped)
      int seen = 0;
      for (int base = 0; base < n_ctx; base += 32) {
        const int j = base + lane;
        const unsigned hits = __ballot_sync(0xffffffffu, j < n_ctx && keep_b[j] == want_kept);
        const int count = __popc(hits);
        if (seen + count > target) {
          if (((hits >> lane) & 1u) && __popc(hits & ((1u << lane) - 1u)) == target - seen) source = j;
          break;
        }
        seen += count;
      }
      if (r == rows - 1 && lane == 0) used[b] = hw + kept;
    }
    __syncthreads();
  }
  const int packs_per_head = 2 * ch / 8, packs_per_row = heads * packs_per_head;
  for (int p = threadIdx.x; p < packs_per_row; p += blockDim.x) {
    const int h = p / packs_per_head, q = p % packs_per_head;
    uint4 v;
    if (r < hw) {  // the [k | v] of head h sit together in the projection's row
      v = qkv[(static_cast<int64_t>(b) * hw + r) * heads * 3 * ch / 8 + h * 3 * ch / 8 + ch / 8 + q];
    } else {
      const int kv = q / (ch / 8), d = q % (ch / 8);
      v = ctx[(b * ctx_b + kv * ctx_kv + (static_cast<int64_t>(h) * n_ctx + source) * ch) / 8 + d];
    }
    out[(static_cast<int64_t>(b) * rows + r) * packs_per_row + p] = v;
  }
}

}  // namespace

// qkv [B * hw, heads * 3 * ch] contiguous (per head [q | k | v]); context_kv [B, 2, heads, N, ch]
// (keys at index 0, values at 1; each [heads, N, ch] block contiguous, a strided view is fine);
// keep [B, N] bool (False: that context token is padding). Returns (kv [B, hw + N, heads, 2, ch]:
// image keys/values then the context's, kept tokens first; used [B] int32: hw + kept tokens).
std::vector<at::Tensor> pack_attention_kv(const at::Tensor& qkv, const at::Tensor& context_kv,
                                          const at::Tensor& keep) {
  unclip_rt::check_half_matrix(qkv, "pack_attention_kv", "qkv");
  unclip_rt::check_kv_blocks(context_kv, qkv, "pack_attention_kv", "context_kv");
  const int64_t batch = context_kv.size(0), heads = context_kv.size(2), n_ctx = context_kv.size(3),
                ch = context_kv.size(4);
  TORCH_CHECK(qkv.size(1) == heads * 3 * ch && qkv.size(0) % batch == 0,
              "pack_attention_kv: qkv must be [B * hw, heads * 3 * ch]");
  TORCH_CHECK(n_ctx >= 1, "pack_attention_kv: no context tokens");
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == batch && keep.size(1) == n_ctx && keep.is_contiguous() &&
                  keep.scalar_type() == at::kBool && keep.device() == qkv.device(),
              "pack_attention_kv: keep must be a contiguous bool [B, N] on qkv's device");
  const int64_t hw = qkv.size(0) / batch, rows = hw + n_ctx;
  const c10::cuda::CUDAGuard guard(qkv.device());
  auto out = at::empty({batch, rows, heads, 2, ch}, qkv.options());
  auto used = at::empty({batch}, qkv.options().dtype(at::kInt));
  const int64_t packs_per_row = heads * 2 * ch / 8;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (packs_per_row + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(batch));
  unclip_rt::launch_overlapped(pack_attention_kv_kernel, dim3(grid), dim3(threads), 0, c10::cuda::getCurrentCUDAStream(), 
      reinterpret_cast<const uint4*>(qkv.data_ptr()), reinterpret_cast<const uint4*>(context_kv.data_ptr()),
      keep.data_ptr<bool>(), reinterpret_cast<uint4*>(out.data_ptr()), used.data_ptr<int>(), static_cast<int>(hw),
      static_cast<int>(n_ctx), static_cast<int>(heads), static_cast<int>(ch), context_kv.stride(0),
      context_kv.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, used};
}
