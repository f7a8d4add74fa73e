// A 2-D convolution (fprop, stride 1, any padding) as CUTLASS 3's Hopper implicit GEMM: the
// activation read by TMA in im2col mode (no gathered copy), wgmma on fp16 or e4m3 operands with
// fp32 accumulation, fp16 NHWC out. The epilogue multiplies each output channel by its scale
// (e4m3: the input's scale times the channel's weight scale; fp16: none) and adds its bias (and
// a residual map of the output's shape, where given). One
// instantiation per operand type and tile shape (config_N.cu); bindings.cpp picks among them.
#pragma once

#include "conv_common.cuh"
#include "conv_shape.h"

namespace unclip_cutlass {

template <class Element, int TileM, int TileN, int TileK, int ClusterM>
struct Fprop : Launches<Fprop<Element, TileM, TileN, TileK, ClusterM>> {
  using T = ConvTypes<Element, TileM, TileN, TileK, ClusterM>;
  using Epilogue = typename T::template EpilogueOn<cutlass::layout::TensorNHWC, cutlass::epilogue::TmaWarpSpecialized>;
  using Mainloop =
      typename T::template MainloopBuilder<cutlass::conv::collective::KernelScheduleAuto, Epilogue>::CollectiveOp;
  using ProblemShape = typename Mainloop::ProblemShape;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Adapter = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
  static constexpr bool kOverlapped = false;  // CUTLASS's conv kernel has no grid-dependency waits

  // `splits` is not taken (Config::takes_splits false: the bindings refuse one)
  static typename Adapter::Arguments arguments(ConvShape const& p, void const* x, void const* weight,
                                               float const* scale, void const* bias, void const* residual, void* out,
                                               int sm_count, int /*splits*/) {
    ProblemShape shape(cutlass::conv::Mode::kCrossCorrelation, {p.n, p.h, p.w, p.c}, {p.k, p.r, p.s, p.c},
                       {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {1, 1}, {1, 1}, 1);
    typename Kernel::StrideC stride_c;
    typename Kernel::StrideD stride_d;
    // the output's strides, innermost pixel mode first, as CUTLASS's own conv examples fill them
    cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
      cute::get<0, i>(stride_c) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideD{})>{}, [&](auto i) {
      cute::get<0, i>(stride_d) = shape.stride_C[ProblemShape::RankT - 2 - i];
    });
    auto* out_ptr = static_cast<typename T::ElementOut*>(out);
    // C: the residual (beta 1), else never read (beta 0)
    auto const* c_ptr = residual != nullptr ? static_cast<typename T::ElementOut const*>(residual) : out_ptr;
    typename Adapter::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        shape,
        {static_cast<typename T::ElementAct const*>(x), static_cast<typename T::ElementFlt const*>(weight)},
        {{}, c_ptr, stride_c, out_ptr, stride_d}};
    scale_and_bias<typename T::ElementOut>(args, scale, bias, residual != nullptr, sm_count);
    return args;
  }
};

}  // namespace unclip_cutlass
