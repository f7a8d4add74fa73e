// f16 operands, tile 128x192x64, cluster 1x1x1 of the CUTLASS convolution (conv_fprop.cuh):
// 192 output channels, which divide the decoder's 192, 384, 576 and 768 exactly.
#include "conv_fprop.cuh"

namespace unclip_cutlass {

Config config_5() {
  using F = Fprop<cutlass::half_t, 128, 192, 64, 1>;
  return {"f16_128x192x64_c1x1", false, &F::run, &F::workspace_bytes};
}

}  // namespace unclip_cutlass
