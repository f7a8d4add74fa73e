// Tile 128x128x64, cluster 2x1x1 of the CUTLASS convolution (conv_fprop.cuh).
#include "conv_fprop.cuh"

namespace unclip_cutlass {

Config config_1() {
  using F = Fprop<128, 128, 64, 2>;
  return {"128x128x64_c2x1", &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
