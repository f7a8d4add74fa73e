// f16 operands, tile 256x128x64, cluster 1x1x1, on the persistent cooperative kernel
// (conv_fprop_persistent.cuh): two warp groups of 128 rows each.
// with CUTLASS's grid-dependency waits: launched overlapped (conv_fprop_persistent.cuh)
#define CUTLASS_ENABLE_GDC_FOR_SM90
#include "conv_fprop_persistent.cuh"

namespace unclip_cutlass {

Config config_6() {
  using F = FpropPersistent<cutlass::half_t, 256, 128, 64, 1>;
  return {"f16_256x128x64_c1x1_persistent", false, &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
