// f16 operands, tile 128x160x64, cluster 1x1x1, on the persistent cooperative kernel
// (conv_fprop_persistent.cuh: two warp groups of 64 rows each) with the stream-K scheduler, for
// the decoder's maps at batch 2 (64² down to 8²), whose output has a few dozen tiles or fewer:
// CTAs share the K loops of tiles instead of idling. 160 divides 320, 640, 960 and 1280.
#include "conv_fprop_persistent.cuh"

namespace unclip_cutlass {

Config config_12() {
  using F = FpropPersistent<cutlass::half_t, 128, 160, 64, 1, cutlass::gemm::StreamKScheduler>;
  return {"f16_128x160x64_c1x1_streamk_persistent", false, &F::run, &F::workspace_bytes, F::kTakesSplits};
}

}  // namespace unclip_cutlass
