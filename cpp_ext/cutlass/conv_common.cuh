// What the two convolution kernels (conv_fprop.cuh, conv_fprop_persistent.cuh) share: their types
// (operands, fp16 NHWC output, fp32 accumulation, the epilogue's per-channel scale and bias, the
// collective builders), the epilogue's arguments and the launch with its error codes.
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

namespace unclip_cutlass {

template <class Element, int TileM, int TileN, int TileK, int ClusterM>
struct ConvTypes {
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
  // the epilogue writing D in `Layout` under the kernel schedule's epilogue `Schedule`
  template <class Layout, class Schedule>
  using EpilogueOn = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      ElementOut, Layout, kAlignOut, ElementOut, Layout, kAlignOut, Schedule, Scaled>::CollectiveOp;
  // the convolution mainloop's builder under `Schedule`, its stages leaving room for `Epilogue`
  template <class Schedule, class Epilogue>
  using MainloopBuilder = cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      ElementAct, cutlass::layout::TensorNHWC, kAlign,
      ElementFlt, cutlass::layout::TensorNHWC, kAlign,
      ElementAcc, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>;
};

// D = scale · acc + bias per output channel (a null scale: the scalar 1), plus C where the call
// gives a residual (beta 1: C is the residual, read by the epilogue), else C is never read (beta 0).
template <class ElementOut, class Arguments>
void scale_and_bias(Arguments& args, float const* scale, void const* bias, bool residual, int sm_count) {
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.alpha_ptr = scale;
  fusion.beta = residual ? 1.0f : 0.0f;
  fusion.bias_ptr = static_cast<ElementOut const*>(bias);
  args.hw_info.sm_count = sm_count;
}

// run and workspace_bytes of a convolution type Op (Op::Adapter, Op::arguments): run returns 0 on
// success, else a cutlass::Status (as int): 1000 + status when the shape is not implementable,
// 2000 + status when initialisation failed, 3000 + status when the launch failed.
// An Op with kOverlapped (the persistent GEMM kernel, built with CUTLASS_ENABLE_GDC_FOR_SM90)
// launches with programmatic dependent launch where `overlap` asks: it may start while the kernel before it on the
// stream still runs (its set-up overlaps that kernel's tail) and waits on the GPU before it touches
// global memory; it lets the next kernel start once its CTAs reach their last tile. CUTLASS's
// convolution kernel has no such waits and launches as usual.
template <class Op>
struct Launches {
  static int run(ConvShape const& p, void const* x, void const* weight, float const* scale, void const* bias,
                 void const* residual, void* out, void* workspace, int sm_count, int splits, bool overlap,
                 cudaStream_t stream) {
    auto args = Op::arguments(p, x, weight, scale, bias, residual, out, sm_count, splits);
    typename Op::Adapter op;
    cutlass::Status status = op.can_implement(args);
    if (status != cutlass::Status::kSuccess) return 1000 + static_cast<int>(status);
    status = op.initialize(args, workspace, stream);
    if (status != cutlass::Status::kSuccess) return 2000 + static_cast<int>(status);
    if constexpr (Op::kOverlapped) {
      status = op.run(stream, nullptr, overlap);
    } else {
      status = op.run(stream);
    }
    if (status != cutlass::Status::kSuccess) return 3000 + static_cast<int>(status);
    return 0;
  }

  static size_t workspace_bytes(ConvShape const& p, int sm_count, int splits) {
    static uint16_t dummy[8];
    return Op::Adapter::get_workspace_size(
        Op::arguments(p, dummy, dummy, nullptr, dummy, nullptr, dummy, sm_count, splits));
  }
};

}  // namespace unclip_cutlass
