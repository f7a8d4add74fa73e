// f16 operands, tile 128x64x64, cluster 1x1x1 of the CUTLASS convolution (conv_fprop.cuh).
#include "conv_fprop.cuh"

namespace unclip_cutlass {

Config config_2() {
  using F = Fprop<cutlass::half_t, 128, 64, 64, 1>;
  return {"f16_128x64x64_c1x1", false, &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
