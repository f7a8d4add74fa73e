// One launch of a CUTLASS 3 device adapter (the convolution's or the GEMM kernel's), shared by
// conv_fprop.cuh and conv_fprop_persistent.cuh: 0 on success, else a cutlass::Status (as int):
// 1000 + status when the shape is not implementable, 2000 + status when initialisation failed,
// 3000 + status when the launch failed.
#pragma once

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace unclip_cutlass {

template <class Adapter>
int run_adapter(typename Adapter::Arguments const& args, void* workspace, cudaStream_t stream) {
  Adapter op;
  cutlass::Status status = op.can_implement(args);
  if (status != cutlass::Status::kSuccess) return 1000 + static_cast<int>(status);
  status = op.initialize(args, workspace, stream);
  if (status != cutlass::Status::kSuccess) return 2000 + static_cast<int>(status);
  status = op.run(stream);
  if (status != cutlass::Status::kSuccess) return 3000 + static_cast<int>(status);
  return 0;
}

}  // namespace unclip_cutlass
