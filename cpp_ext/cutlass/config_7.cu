// e4m3 operands, tile 256x128x128, cluster 1x1x1, on the persistent cooperative kernel
// (conv_fprop_persistent.cuh): two warp groups of 128 rows each.
// with CUTLASS's grid-dependency waits: launched overlapped (conv_fprop_persistent.cuh)
#define CUTLASS_ENABLE_GDC_FOR_SM90
#include "conv_fprop_persistent.cuh"

namespace unclip_cutlass {

Config config_7() {
  using F = FpropPersistent<cutlass::float_e4m3_t, 256, 128, 128, 1>;
  return {"e4m3_256x128x128_c1x1_persistent", true, &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
