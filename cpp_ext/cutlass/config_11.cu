// e4m3 operands, tile 256x160x128, cluster 1x1x1, on the persistent cooperative kernel
// (conv_fprop_persistent.cuh), with the stream-K scheduler: shapes with too few output tiles
// for the GPU's SMs (the decoder's) split their K loops.
#include "conv_fprop_persistent.cuh"

namespace unclip_cutlass {

Config config_11() {
  using F = FpropPersistent<cutlass::float_e4m3_t, 256, 160, 128, 1, cutlass::gemm::StreamKScheduler>;
  return {"e4m3_256x160x128_c1x1_streamk_persistent", true, &F::run, &F::workspace_bytes, F::kTakesSplits};
}

}  // namespace unclip_cutlass
