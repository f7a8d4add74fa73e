// A 2-D convolution (fprop, stride 1, any padding) as CUTLASS 3's Hopper implicit GEMM: the
// activation read by TMA in im2col mode (no gathered copy), wgmma on fp16 or e4m3 operands with
// fp32 accumulation, fp16 NHWC out. The epilogue multiplies each output channel by its scale
// (e4m3: the input's scale times the channel's weight scale; fp16: none) and adds its bias. One
// instantiation per operand type and tile shape (config_N.cu); bindings.cpp picks among them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

// In the order CUTLASS's own conv tests include them: the collective builders rely on what the
// adapter and kernel headers bring in (cutlass::KernelHardwareInfo among others).
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "conv_shape.h"
#include "device_run.cuh"

namespace unclip_cutlass {

template <class Element, int TileM, int TileN, int TileK, int ClusterM>
struct Fprop {
  using ElementAct = Element;
  using ElementFlt = Element;
  using ElementOut = cutlass::half_t;
  using ElementAcc = float;
  using ElementCompute = float;
  using TileShape = cute::Shape<cute::Int<TileM>, cute::Int<TileN>, cute::Shape<cute::Int<TileK>>>;
  using ClusterShape = cute::Shape<cute::Int<ClusterM>, cute::_1, cute::_1>;
  // 16 bytes of operand per access: channel counts must be multiples of it (8 fp16, 16 e4m3)
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  static constexpr int kAlignOut = 8;

  // D = per-channel scale · acc + per-channel bias (the scale a vector, or 1 without one)
  using Scaled = cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<
      cutlass::epilogue::thread::Identity, ElementOut, ElementCompute, ElementOut, ElementOut, ElementCompute>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      ElementOut, cutlass::layout::TensorNHWC, kAlignOut,
      ElementOut, cutlass::layout::TensorNHWC, kAlignOut,
      cutlass::epilogue::TmaWarpSpecialized, Scaled>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      ElementAct, cutlass::layout::TensorNHWC, kAlign,
      ElementFlt, cutlass::layout::TensorNHWC, kAlign,
      ElementAcc, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using ProblemShape = typename Mainloop::ProblemShape;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;

  static typename Conv::Arguments arguments(ConvShape const& p, void const* x, void const* weight, float const* scale,
                                            void const* bias, void* out, int sm_count) {
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
    auto* out_ptr = static_cast<ElementOut*>(out);
    typename Conv::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        shape,
        {static_cast<ElementAct const*>(x), static_cast<ElementFlt const*>(weight)},
        {{}, out_ptr, stride_c, out_ptr, stride_d}};  // C is never read: beta is 0
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.alpha_ptr = scale;  // per output channel; null: the scalar 1
    fusion.beta = 0.0f;
    fusion.bias_ptr = static_cast<ElementOut const*>(bias);
    args.hw_info.sm_count = sm_count;
    return args;
  }

  // 0, or the error code of `run_adapter` (device_run.cuh)
  static int run(ConvShape const& p, void const* x, void const* weight, float const* scale, void const* bias, void* out,
                 void* workspace, int sm_count, cudaStream_t stream) {
    return run_adapter<Conv>(arguments(p, x, weight, scale, bias, out, sm_count), workspace, stream);
  }

  static size_t workspace_bytes(ConvShape const& p, int sm_count) {
    static uint16_t dummy[8];
    return Conv::get_workspace_size(arguments(p, dummy, dummy, nullptr, dummy, dummy, sm_count));
  }
};

}  // namespace unclip_cutlass
