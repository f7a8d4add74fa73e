// Programmatic dependent launch (Hopper and newer): a kernel launched with `launch_overlapped`
// may start while the kernel before it on the stream still runs. It must call
// `wait_for_producers()` before it reads anything an earlier kernel wrote (or writes anything an
// earlier kernel reads); `allow_dependents()` lets the next such kernel start (the prior's kernels
// call it first thing, so the next one's blocks load their weights while this one runs; the next
// kernel's own wait still holds it until this one has finished). Work that needs no
// earlier output (loading weights) goes before the wait, so it overlaps the producer's tail and
// the launch gap. On older GPUs both are no-ops and the launch is an ordinary one. Stream capture
// records the overlap as a programmatic graph edge, so CUDA graph replays keep it.

#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <utility>

namespace unclip_rt {

__device__ __forceinline__ void wait_for_producers() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), overlapping the kernel before it where the
// device supports it (compute capability 9.0+) and UNCLIP_RT_NO_PDL is not set (read once).
template <typename... Params, typename... Args>
void launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  constexpr int kDevices = 64;
  static std::atomic<int> majors[kDevices] = {};  // per device, 0 until read (threads may race: same value)
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int major = device < kDevices ? majors[device].load(std::memory_order_relaxed) : 0;
  if (major == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (device < kDevices) majors[device].store(major, std::memory_order_relaxed);
  }
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  static const bool allowed = std::getenv("UNCLIP_RT_NO_PDL") == nullptr;
  config.numAttrs = major >= 9 && allowed ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace unclip_rt
