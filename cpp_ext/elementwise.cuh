// Shared by the kernels of cpp_ext: float32 conversions of the element types and aligned packs
// of VEC elements moved as one vector load/store.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace unclip_rt {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// SiLU in float32, v * sigmoid(v), through the fast division (__fdividef: within 2 ulp of
// v / (1 + e^-v), far below the half-precision rounding that follows; 0 once e^-v passes 2^126).
// The exact division cost the group norm's normalising pass more than its loads and stores.
__device__ __forceinline__ float silu_of(float v) { return __fdividef(v, 1.f + __expf(-v)); }

// VEC consecutive elements moved as one aligned vector load/store.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

}  // namespace unclip_rt
