// e4m3 operands, tile 128x128x128, cluster 2x1x1 of the CUTLASS convolution (conv_fprop.cuh).
#include "conv_fprop.cuh"

namespace unclip_cutlass {

Config config_4() {
  using F = Fprop<cutlass::float_e4m3_t, 128, 128, 128, 2>;
  return {"e4m3_128x128x128_c2x1", true, &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
