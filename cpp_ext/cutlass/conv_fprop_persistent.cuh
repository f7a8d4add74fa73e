// The same convolution as conv_fprop.cuh on CUTLASS 3's persistent cooperative Hopper GEMM kernel:
// two consumer warp groups share one 256-row tile (or 128, 64 rows each) and each CTA stays
// resident, taking output tiles from the tile scheduler, so one tile's epilogue overlaps the next
// tile's loads. CUTLASS's SM90 convolutions offer only the plain warp-specialised kernel (its
// dispatch policy refuses the persistent schedules); its conv mainloop already speaks the GEMM
// kernels' mainloop protocol (load_init / load / mma / mma_tail), so it runs inside the GEMM
// kernel once three things are adapted, which ConvMainloop below does:
//   - the kernel's problem shape is the mainloop's own linearised (M, N, (C, S, R), 1) shape, and
//     the convolution's full shape (padding, strides) travels in the mainloop's arguments, to make
//     the im2col TMA descriptor;
//   - the cooperative kernel indexes a batch (L) mode of the loaded tensors, which an im2col load
//     has not: load_init appends a unit mode and load takes it off again;
//   - the kernel checks the operands' strides for GEMM rank (3); the mainloop names such strides.
// The output is NHWC with stride 1, i.e. a row-major (N·P·Q) × K matrix: the epilogue is the plain
// GEMM epilogue with the same per-channel scale and bias (and residual, as C).
// The tile scheduler is a parameter: the persistent one (whole output tiles, each CTA taking the
// next) or stream-K, which also splits a tile's K loop between CTAs when the output has too few
// tiles to fill the GPU evenly (its partial sums meet in the workspace).
// Programmatic dependent launch: a configuration file that defines CUTLASS_ENABLE_GDC_FOR_SM90
// before including this header gets CUTLASS's grid-dependency waits compiled into its kernel, and
// only such a kernel may launch overlapped (Launches, kOverlapped). CUTLASS 4.2's stream-K
// scheduler does not compile with them (its const is_last_tile binds a member to a non-const
// reference), so the stream-K configurations go without.
#pragma once

#include <type_traits>

#include "conv_common.cuh"
#include "conv_shape.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace unclip_cutlass {

// The cooperative GEMM schedule under another name: the conv dispatch policy refuses its own
// cooperative tag, not this one.
struct ConvCooperativeSchedule : cutlass::gemm::KernelTmaWarpSpecializedCooperative {};

template <class Base>
struct ConvMainloop : Base {
  using ConvShapeT = typename Base::ProblemShape;
  // (M, N, K, L) with the mainloop's own M, N and (C, S, R) modes and a run-time L, as the GEMM
  // epilogue's descriptors are declared (the mainloop's own L is a static 1)
  using KShape = cute::remove_cvref_t<decltype(cute::get<2>(Base::get_problem_shape_MNKL(ConvShapeT{})))>;
  using ProblemShapeMNKL = cute::tuple<int, int, KShape, int>;

  static ProblemShapeMNKL problem_shape(ConvShapeT const& conv) {
    auto mnkl = Base::get_problem_shape_MNKL(conv);
    return {static_cast<int>(cute::get<0>(mnkl)), static_cast<int>(cute::get<1>(mnkl)), cute::get<2>(mnkl), 1};
  }
  using StrideA = cute::Stride<int64_t, cute::_1, int64_t>;  // for the kernel's rank check only
  using StrideB = cute::Stride<int64_t, cute::_1, int64_t>;
  using typename Base::Params;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  static constexpr int NumProducerThreadEvents = 1;  // one elected thread issues each stage's TMA loads

  struct Arguments {
    ConvShapeT conv{};
    typename Base::Arguments operands{};
  };

  static constexpr Params to_underlying_arguments(ProblemShapeMNKL const&, Arguments const& args, void* workspace) {
    return Base::to_underlying_arguments(args.conv, args.operands, workspace);
  }

  static bool can_implement(ProblemShapeMNKL const&, Arguments const& args) {
    return Base::can_implement(args.conv, args.operands);
  }

  template <class ProblemShape>
  CUTLASS_DEVICE auto load_init(ProblemShape const& problem_shape_MNKL, Params const& params) {
    auto [gA_mk, gB_nk] = Base::load_init(problem_shape_MNKL, params);
    return cute::make_tuple(with_unit_mode(gA_mk), with_unit_mode(gB_nk));
  }

  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState state,
                           cute::tuple<TensorA, TensorB> const& inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using cute::_;
    auto a = cute::get<0>(inputs)(_, _, _, _, 0);
    auto b = cute::get<1>(inputs)(_, _, _, _, 0);
    Base::load(params, pipeline, state, cute::make_tuple(a, b), blk_coord, k_tile_iter, k_tile_count, thread_idx,
               block_rank_in_cluster, shared_tensors);
  }

 private:
  // The tensor with a trailing mode of size 1 (its coordinates unchanged); an im2col TMA
  // tensor's layout is a composed layout, whose outer layout takes the mode.
  template <class Tensor>
  CUTLASS_DEVICE static auto with_unit_mode(Tensor const& t) {
    auto const& layout = t.layout();
    if constexpr (cute::is_composed_layout<cute::remove_cvref_t<decltype(layout)>>::value) {
      return cute::make_tensor(t.data(), cute::make_composed_layout(
          layout.layout_a(), layout.offset(), cute::append(layout.layout_b(), cute::Layout<cute::_1, cute::_0>{})));
    } else {
      return cute::make_tensor(t.data(), cute::append(layout, cute::Layout<cute::_1, cute::_0>{}));
    }
  }
};

template <class Element, int TileM, int TileN, int TileK, int ClusterM,
          class Scheduler = cutlass::gemm::PersistentScheduler>
struct FpropPersistent : Launches<FpropPersistent<Element, TileM, TileN, TileK, ClusterM, Scheduler>> {
  using T = ConvTypes<Element, TileM, TileN, TileK, ClusterM>;
  using Epilogue =
      typename T::template EpilogueOn<cutlass::layout::RowMajor, cutlass::epilogue::TmaWarpSpecializedCooperative>;

  // The builder's pieces for the cooperative arrangement (two warp groups along M), assembled
  // under the renamed schedule.
  using Builder = typename T::template MainloopBuilder<cutlass::conv::KernelImplicitTmaWarpSpecializedSm90Cooperative,
                                                      Epilogue>;
  using Policy = cutlass::conv::MainloopSm90TmaGmmaWarpSpecializedImplicitGemm<
      cutlass::conv::Operator::kFprop, Builder::PipelineStages, Builder::NumSpatialDimensions, typename T::ClusterShape,
      ConvCooperativeSchedule>;
  using Mainloop = ConvMainloop<cutlass::conv::collective::CollectiveConv<
      Policy, typename T::TileShape, Element, Element, typename Builder::TiledMma,
      cutlass::conv::collective::detail::Sm90ImplicitGemmTileTraits<typename Builder::GmemTiledCopyA,
                                                                   typename Builder::SmemLayoutA>,
      cutlass::conv::collective::detail::Sm90ImplicitGemmTileTraits<typename Builder::GmemTiledCopyB,
                                                                   typename Builder::SmemLayoutB>>>;
  using ProblemShape = typename Mainloop::ProblemShapeMNKL;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue, Scheduler>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static constexpr bool kTakesSplits = std::is_same_v<Scheduler, cutlass::gemm::StreamKScheduler>;
#ifdef CUTLASS_ENABLE_GDC_FOR_SM90
  static constexpr bool kOverlapped = true;  // the kernel waits on the GPU for its producer (Launches)
#else
  static constexpr bool kOverlapped = false;
#endif

  // `splits` > 0 (stream-K only): split-K with that many parts per output tile instead of the
  // scheduler's own choice; the parts meet in the workspace in a fixed order (deterministic).
  static typename Adapter::Arguments arguments(ConvShape const& p, void const* x, void const* weight,
                                               float const* scale, void const* bias, void const* residual, void* out,
                                               int sm_count, int splits) {
    typename Mainloop::ConvShapeT conv(cutlass::conv::Mode::kCrossCorrelation, {p.n, p.h, p.w, p.c},
                                       {p.k, p.r, p.s, p.c}, {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {1, 1}, {1, 1},
                                       1);
    const ProblemShape shape = Mainloop::problem_shape(conv);
    const int rows = static_cast<int>(cute::get<0>(shape));  // N·P·Q output pixels
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(rows, p.k, 1));
    auto* out_ptr = static_cast<typename T::ElementOut*>(out);
    // C: the residual (beta 1, the output's layout), else never read (beta 0)
    auto const* c_ptr = residual != nullptr ? static_cast<typename T::ElementOut const*>(residual) : out_ptr;
    typename Adapter::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        shape,
        {conv, {static_cast<typename T::ElementAct const*>(x), static_cast<typename T::ElementFlt const*>(weight)}},
        {{}, c_ptr, stride_d, out_ptr, stride_d}};
    scale_and_bias<typename T::ElementOut>(args, scale, bias, residual != nullptr, sm_count);
    if constexpr (kTakesSplits) {
      if (splits > 0) {
        args.scheduler.splits = splits;
        args.scheduler.decomposition_mode = Kernel::TileScheduler::DecompositionMode::SplitK;
      }
    }
    return args;
  }
};

}  // namespace unclip_cutlass
