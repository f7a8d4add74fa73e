// Host-side helpers shared by cpp_ext's half-precision entry points: the checks their arguments
// share and the fp16/bf16 dispatch.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cstdint>

namespace unclip_rt {

inline bool is_half_like(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// `t` is a 16-byte aligned channels-last (NHWC in memory) fp16/bf16 CUDA map [B, C, H, W].
inline bool is_nhwc_half(const at::Tensor& t) {
  return t.is_cuda() && t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && is_half_like(t) &&
         aligned16(t);
}

// `t` is a contiguous vector of one value per channel of `x` [B, C, ...], in x's dtype and device.
inline bool is_channel_vector(const at::Tensor& t, const at::Tensor& x) {
  return t.is_contiguous() && t.numel() == x.size(1) && t.scalar_type() == x.scalar_type() && t.device() == x.device();
}

// `t` is a contiguous fp16/bf16 CUDA matrix, 16-byte aligned.
inline void check_half_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous() && is_half_like(t) && aligned16(t), op, ": ", name,
              " must be a contiguous, 16-byte aligned half-precision CUDA matrix");
}

// `kv` is cached keys/values [B, 2, heads, N, ch] (keys at index 0, values at 1) in `like`'s dtype
// and device, each [heads, N, ch] block contiguous (a strided view of a larger cache is fine),
// read in 16-byte packs: ch and the two outer strides multiples of 8, the data 16-byte aligned.
inline void check_kv_blocks(const at::Tensor& kv, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(kv.dim() == 5 && kv.size(1) == 2 && kv.scalar_type() == like.scalar_type() &&
                  kv.device() == like.device(),
              op, ": ", name, " must be [B, 2, heads, N, ch] in the same dtype and device as the queries");
  const int64_t n = kv.size(3), ch = kv.size(4);
  TORCH_CHECK(kv.stride(4) == 1 && kv.stride(3) == ch && kv.stride(2) == n * ch, op, ": each [heads, N, ch] block of ",
              name, " must be contiguous");
  TORCH_CHECK(ch % 8 == 0 && kv.stride(0) % 8 == 0 && kv.stride(1) % 8 == 0 && aligned16(kv), op,
              ": the head size must be a multiple of 8 and ", name, " 16-byte aligned");
}

// The few-row linear layers' result (skinny_linear, skinny_linear_staged) after checking their
// optional bias [features] and output: `out` itself ([rows, features], contiguous, x's dtype and
// device, not overlapping x: other blocks still read x while one writes out), else a new tensor.
inline at::Tensor linear_output(const char* op, const at::Tensor& x, int64_t features,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out) {
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == features && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                op, ": bias must be a contiguous [features] vector in x's dtype");
  }
  if (!out) return at::empty({x.size(0), features}, x.options());
  TORCH_CHECK(out->dim() == 2 && out->size(0) == x.size(0) && out->size(1) == features && out->is_contiguous() &&
                  out->scalar_type() == x.scalar_type() && out->device() == x.device(),
              op, ": out must be a contiguous [rows, features] matrix in x's dtype");
  TORCH_CHECK(at::get_overlap_status(*out, x) == at::MemOverlapStatus::No, op,
              ": out must not overlap x (other blocks still read x while one writes out)");
  return *out;
}

// f(tag) with a null pointer of the element type of `t` (fp16 or bf16) as the tag.
template <typename F>
void dispatch_half_like(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kHalf) {
    f(static_cast<__half*>(nullptr));
  } else {
    f(static_cast<__nv_bfloat16*>(nullptr));
  }
}

}  // namespace unclip_rt
