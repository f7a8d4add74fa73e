// f16 operands, tile 256x160x64, cluster 1x1x1, on the persistent cooperative kernel
// (conv_fprop_persistent.cuh), with the stream-K scheduler: shapes with too few output tiles
// for the GPU's SMs (the decoder's) split their K loops.
#include "conv_fprop_persistent.cuh"

namespace unclip_cutlass {

Config config_10() {
  using F = FpropPersistent<cutlass::half_t, 256, 160, 64, 1, cutlass::gemm::StreamKScheduler>;
  return {"f16_256x160x64_c1x1_streamk_persistent", false, &F::run, &F::workspace_bytes, F::kTakesSplits};
}

}  // namespace unclip_cutlass
