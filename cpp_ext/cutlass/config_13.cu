// e4m3 operands, tile 128x160x128, cluster 1x1x1, on the persistent cooperative kernel
// (conv_fprop_persistent.cuh: two warp groups of 64 rows each) with the stream-K scheduler, for
// the decoder's maps at batch 2 (64² down to 8²), whose output has a few dozen tiles or fewer:
// CTAs share the K loops of tiles instead of idling. 160 divides 320, 640, 960 and 1280.
#include "conv_fprop_persistent.cuh"

namespace unclip_cutlass {

Config config_13() {
  using F = FpropPersistent<cutlass::float_e4m3_t, 128, 160, 128, 1, cutlass::gemm::StreamKScheduler>;
  return {"e4m3_128x160x128_c1x1_streamk_persistent", true, &F::run, &F::workspace_bytes, F::kTakesSplits};
}

}  // namespace unclip_cutlass
