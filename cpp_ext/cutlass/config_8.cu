// f16 operands, tile 256x160x64, cluster 1x1x1, on the persistent cooperative kernel
// (conv_fprop_persistent.cuh), with a tile as wide as half of 320 output channels (a quarter of
// 640, a sixth of 960), where 128 leaves a sixth of the last tile idle.
// with CUTLASS's grid-dependency waits: launched overlapped (conv_fprop_persistent.cuh)
#define CUTLASS_ENABLE_GDC_FOR_SM90
#include "conv_fprop_persistent.cuh"

namespace unclip_cutlass {

Config config_8() {
  using F = FpropPersistent<cutlass::half_t, 256, 160, 64, 1>;
  return {"f16_256x160x64_c1x1_persistent", false, &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
