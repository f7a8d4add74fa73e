// f16 operands, tile 128x128x64, cluster 2x1x1 of the CUTLASS convolution (conv_fprop.cuh).
#include "conv_fprop.cuh"

namespace unclip_cutlass {

Config config_1() {
  using F = Fprop<cutlass::half_t, 128, 128, 64, 2>;
  return {"f16_128x128x64_c2x1", false, &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
