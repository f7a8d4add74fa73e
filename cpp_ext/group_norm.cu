// Group normalisation (+ optional per-sample scale/shift, + optional SiLU) for NCHW and NHWC
// (channels-last) activations in fp16, bf16 or fp32, with float32 statistics.
//
// Why not at::native::group_norm: its statistics kernel gives one thread block to each
// (sample, group) row, so at batch 1 with 32 groups it runs 32 blocks on a 132-SM GPU, and at
// the super-res UNet's 256x256 maps that kernel dominated the forward. Here every
// row is split into chunks (pass 1: shifted sum / sum of squares per chunk, written to a
// buffer), a tiny pass folds the chunks in a fixed order (deterministic: no float atomics), and
// pass 3 normalises with vectorised loads, applying the affine, the optional FiLM scale/shift
// (the decoder's scale-shift ResBlocks) and SiLU in the same pass. NHWC is handled natively, so
// cuDNN's channels-last convolutions need no layout conversions around the norms.
//
//
// The passes' kernels: group_norm_stats.cu (statistics), group_norm_normalize.cu (normalising),
// group_norm_one_pass.cu (small maps in one launch); what they share: group_norm_parts.cuh.

#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "group_norm_parts.cuh"

bool group_norm_takes_three_passes(int64_t channels, int64_t groups, int64_t hw);
bool group_norm_phased_serves(const at::Tensor& product, int64_t groups);

namespace {

using namespace unclip_rt::group_norm_parts;

// One group norm call: the tensors and flags of `group_norm` (and, for group_norm_concat, the
// first part of the concatenation the statistics pass writes, or the statistics a producer of x
// already computed).
template <typename T>
struct GroupNormCall {
  const at::Tensor& x;
  int64_t groups;
  const at::Tensor& weight;
  const at::Tensor& bias;
  c10::optional<at::Tensor> scale, shift;  // FiLM rows [B, C], both or neither
  c10::optional<at::Tensor> add;           // [B, C] rows added before the norm
  c10::optional<at::Tensor> add_bias;      // [C] added before the norm
  double eps = 1e-5;
  bool silu = false;
  bool nhwc = false;
  int one_pass_mode = -1;  // 1 the one-launch kernel, 0 the three passes, -1 by the group's size
  bool up = false, down = false;
  const T* pass1_x = nullptr;  // with `concat`: the concatenation's first part
  Concat<T> concat = {};
  const at::Tensor* given_partial = nullptr;
  bool coefficients_only = false;  // return pass 2's [B, C, 2] coefficients instead of normalising
  bool phased = false;  // x is an up block's folded product; the map normalised is its interleave (Shape::phased)
};

template <typename T>
at::Tensor group_norm_typed(const GroupNormCall<T>& call) {
  const at::Tensor& x = call.x;
  const Add<T> add_ptr{call.add ? reinterpret_cast<const T*>(call.add->data_ptr()) : nullptr,
                       call.add ? call.add->stride(0) : 0,
                       call.add_bias ? reinterpret_cast<const T*>(call.add_bias->data_ptr()) : nullptr};
  Shape s{};
  s.batch = x.size(0);
  s.channels = call.phased ? x.size(1) / 4 : x.size(1);
  s.hw = call.phased ? 4 * (x.size(2) - 1) * (x.size(3) - 1) : x.numel() / (s.batch * x.size(1));
  s.groups = static_cast<int>(call.groups);
  s.phased = call.phased;
  const int64_t cg = s.channels / call.groups;
  const int elem = static_cast<int>(x.element_size());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  s.up = call.up;
  s.down = call.down;
  s.width = call.phased ? 2 * (x.size(3) - 1) : x.size(-1);
  // keeps x's memory format; 2x the height and width with `up`, half with `down`
  const auto resized = [&](int64_t h, int64_t w) {
    return at::empty({x.size(0), x.size(1), h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  };
  auto y = call.coefficients_only ? at::Tensor()
           : call.phased           ? at::empty({s.batch, s.channels, s.hw / s.width, s.width},
                                               x.options().memory_format(at::MemoryFormat::ChannelsLast))
           : call.up               ? resized(2 * x.size(2), 2 * x.size(3))
           : call.down             ? resized(x.size(2) / 2, x.size(3) / 2)
                                   : at::empty_like(x);
  const Film<T> film{call.scale ? reinterpret_cast<const T*>(call.scale->data_ptr()) : nullptr,
                     call.shift ? reinterpret_cast<const T*>(call.shift->data_ptr()) : nullptr,
                     call.scale ? call.scale->stride(0) : 0};
  const int mode = call.one_pass_mode;
  if (!call.coefficients_only && call.given_partial == nullptr && !call.down && !call.phased &&
      (mode > 0 || (mode < 0 && one_pass_by_size(cg, s.hw)))) {
    one_pass_norm<T>(x, add_ptr, call.weight, call.bias, film, y, s, call.eps, call.silu, call.nhwc, elem, stream);
    return y;
  }
  auto coef = at::empty({s.batch * s.channels, 2}, x.options().dtype(at::kFloat));  // [B * C, 2]
  at::Tensor partial;
  if (call.given_partial != nullptr) {  // pass 1 was done by the producer of x (bias_residual_stats)
    partial = *call.given_partial;
    s.chunks = static_cast<int>(partial.size(1));
  } else {
    partial = statistics_pass<T>(x, add_ptr, s, cg, call.nhwc, elem, stream, call.pass1_x, call.concat);
  }
  coefficients_pass<T>(x, add_ptr, partial, call.weight, call.bias, film, coef, s, call.eps, call.nhwc, stream);
  if (call.coefficients_only) return coef.view({s.batch, s.channels, 2});
  normalize_pass<T>(x, coef, y, s, call.silu, call.nhwc, elem, stream);
  return y;
}

}  // namespace

// Whether t is a [B, C] matrix (of `dtype`) whose rows may be strided or broadcast (stride 0)
// but whose channels are contiguous.
static bool per_sample_rows(const at::Tensor& t, const at::Tensor& x) {
  return t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.stride(1) == 1 && t.stride(0) >= 0 &&
         t.scalar_type() == x.scalar_type() && t.device() == x.device();
}

// y = GroupNorm(x [+ add + add_bias]) * weight + bias [* (1 + scale) + shift] [-> SiLU], x
// [B, C, *spatial] in NCHW (contiguous) or NHWC (channels_last) memory; weight/bias/add_bias [C],
// scale/shift/add [B, C] (rows may be strided, e.g. the two halves of one [B, 2C] projection, or
// broadcast), all in x's dtype. `add` is the ResBlock's time embedding and `add_bias` the bias of
// the convolution before the norm: both added before the norm without a pass of their own.
// `up`: write the output nearest-upsampled 2x ([B, C, 2H, 2W], channels_last x only: the up
// ResBlocks upsample the norm's output before their convolution).
// `down`: write it 2x2 average-pooled ([B, C, H/2, W/2], channels_last x only: the down ResBlocks).
// `one_pass_mode`: 1 the one-launch kernel, 0 the three passes, -1 (default) by the group's size.
// `partial`: x's statistics pass done already, [B * groups, chunks, 2] float32 sums of each
// chunk of each (sample, group), shifted by the group's first channel at pixel 0 (as
// bias_residual_stats writes them, when it made x): the norm runs its last two passes only.
// `coefficients_only`: group_norm_coefficients's form (no normalising pass).
// `phased`: group_norm_phased's form (x its folded product; the arguments describe the map).
static at::Tensor run_group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                                 const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                                 const c10::optional<at::Tensor>& add, double eps, bool silu,
                                 const c10::optional<at::Tensor>& add_bias, int64_t one_pass_mode, bool up, bool down,
                                 const c10::optional<at::Tensor>& partial, bool coefficients_only,
                                 bool phased = false) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 3, "group_norm: x must be a CUDA tensor [B, C, *spatial]");
  TORCH_CHECK(!phased || (group_norm_phased_serves(x, groups) && !up && !down && !partial && !coefficients_only),
              "group_norm_phased: product must be an aligned channels_last half-precision CUDA tensor "
              "[B, 4K, H + 1, W + 1] with K a multiple of 8 in groups the three-pass norm's wide statistics "
              "serve (group_norm_phased_serves)");
  // what the per-channel and per-sample arguments describe: x, or the map a phased product stands for
  const at::Tensor map = phased ? x.narrow(1, 0, x.size(1) / 4) : x;
  TORCH_CHECK(map.size(1) % groups == 0, "group_norm: channels ", std::to_string(map.size(1)), " not divisible by ",
              std::to_string(groups), " groups");
  const bool nhwc = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nhwc || x.is_contiguous(), "group_norm: x must be contiguous or channels_last");
  TORCH_CHECK(!up || nhwc, "group_norm: up (a fused nearest 2x upsampling) needs channels_last x");
  TORCH_CHECK(!down || (nhwc && x.size(2) % 2 == 0 && x.size(3) % 2 == 0),
              "group_norm: down (a fused 2x2 average pooling) needs channels_last x of even height and width");
  TORCH_CHECK(!(up && down), "group_norm: up or down, not both");
  const auto per_channel = [&](const at::Tensor& t) { return unclip_rt::is_channel_vector(t, map); };
  TORCH_CHECK(per_channel(weight) && per_channel(bias), "group_norm: weight and bias must be [C] in x's dtype");
  TORCH_CHECK(scale.has_value() == shift.has_value(), "group_norm: give both scale and shift, or neither");
  if (scale) {
    TORCH_CHECK(per_sample_rows(*scale, map) && per_sample_rows(*shift, map) && scale->stride(0) == shift->stride(0),
                "group_norm: scale and shift must be [B, C] in x's dtype, channels contiguous, one row stride");
  }
  if (add) {
    TORCH_CHECK(per_sample_rows(*add, map), "group_norm: add must be [B, C] in x's dtype, channels contiguous");
  }
  if (add_bias) {
    TORCH_CHECK(per_channel(*add_bias), "group_norm: add_bias must be [C] in x's dtype");
  }
  if (partial) {
    TORCH_CHECK(partial->is_cuda() && partial->device() == x.device() && partial->scalar_type() == at::kFloat &&
                    partial->is_contiguous() && partial->dim() == 3 && partial->size(0) == x.size(0) * groups &&
                    partial->size(1) >= 1 && partial->size(2) == 2,
                "group_norm: partial must be contiguous float32 [B * groups, chunks, 2] on x's device");
    TORCH_CHECK(!add && !add_bias, "group_norm: partial holds the sums of x alone: no add or add_bias with it");
  }
  const at::Tensor* given = partial ? &*partial : nullptr;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    GroupNormCall<T> call{x, groups, weight, bias};
    call.scale = scale;
    call.shift = shift;
    call.add = add;
    call.add_bias = add_bias;
    call.eps = eps;
    call.silu = silu;
    call.nhwc = nhwc;
    call.one_pass_mode = static_cast<int>(one_pass_mode);
    call.up = up;
    call.down = down;
    call.given_partial = given;
    call.coefficients_only = coefficients_only;
    call.phased = phased;
    return group_norm_typed<T>(call);
  };
  switch (x.scalar_type()) {
    case at::kFloat: return run(static_cast<float*>(nullptr));
    case at::kHalf: return run(static_cast<__half*>(nullptr));
    case at::kBFloat16: return run(static_cast<__nv_bfloat16*>(nullptr));
    default: TORCH_CHECK(false, "group_norm: x must be float32, float16 or bfloat16");
  }
}

at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                      const c10::optional<at::Tensor>& add, double eps, bool silu,
                      const c10::optional<at::Tensor>& add_bias, int64_t one_pass_mode, bool up, bool down,
                      const c10::optional<at::Tensor>& partial) {
  return run_group_norm(x, groups, weight, bias, scale, shift, add, eps, silu, add_bias, one_pass_mode, up, down,
                        partial, false);
}

// Whether group_norm_phased takes `product` in `groups` groups and the map's norm would run three
// passes in auto mode (group_norm_takes_three_passes; a small map's one-launch norm of the
// interleaved copy is the faster way there): what its callers check first.
bool group_norm_phased_serves(const at::Tensor& product, int64_t groups) {
  if (!unclip_rt::is_nhwc_half(product) || product.size(1) % 32 != 0 || product.size(2) < 2 || product.size(3) < 2 ||
      groups <= 0 || (product.size(1) / 4) % groups != 0)
    return false;
  return group_norm_takes_three_passes(product.size(1) / 4, groups, 4 * (product.size(2) - 1) * (product.size(3) - 1));
}

// group_norm (three passes) of the map an up block's folded convolution stands for, read from its
// product before the interleave (models/fused/upsampled_conv.py): `product` [B, 4K, H + 1, W + 1]
// channels-last half precision, whose phase (a, c) channels [(2a + c)K, +K) at pixel (i + a, j + c)
// are the map's pixel (2i + a, 2j + c); the output is the norm of that map, [B, K, 2H, 2W]
// channels-last. The statistics and normalising passes read each pixel where the product holds
// it, so the interleave's copy is never written. K a multiple of 8 whose groups the wide
// statistics geometry serves (wide_geometry_fits); scale/shift/add/add_bias as group_norm's.
at::Tensor group_norm_phased(const at::Tensor& product, int64_t groups, const at::Tensor& weight,
                             const at::Tensor& bias, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& add,
                             double eps, bool silu, const c10::optional<at::Tensor>& add_bias) {
  return run_group_norm(product, groups, weight, bias, scale, shift, add, eps, silu, add_bias, 0, false, false,
                        c10::nullopt, false, true);
}

// group_norm's statistics and coefficients passes without the normalising one: float32
// [B, C, 2] (A, B) such that group_norm's output (before SiLU) is x * A + B, the affine, the
// FiLM scale/shift and what is added before the norm folded in. A consumer that normalises as it
// reads x (the FP8 layers' quantising normalisation, models.fp8.normalize_kernel) takes these
// instead of a normalised copy.
at::Tensor group_norm_coefficients(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                   const at::Tensor& bias, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& add,
                                   double eps, const c10::optional<at::Tensor>& add_bias,
                                   const c10::optional<at::Tensor>& partial) {
  return run_group_norm(x, groups, weight, bias, scale, shift, add, eps, false, add_bias, 0, false, false, partial,
                        true);
}

// GroupNorm(cat(first, second, dim=1)) * weight + bias [-> SiLU] and the concatenation itself,
// for channels-last half-precision [B, C1, H, W] and [B, C2, H, W] (C1, C2 multiples of 8): the
// UNets' output blocks norm their input concatenation and also feed it to their 1x1 skip
// convolution. Where the norm runs three passes, its first pass reads the two inputs and writes
// the concatenation as it sums it (no separate concatenation kernel, whose read of both inputs
// it saves); where it runs one (small maps), torch's concatenation and the one-pass norm.
// Returns {y, cat}.
// `coefficients_only`: group_norm_concat_coefficients's form (no normalising pass).
static std::vector<at::Tensor> run_group_norm_concat(const at::Tensor& first, const at::Tensor& second,
                                                     int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                                                     double eps, bool silu,
                                                     const c10::optional<at::Tensor>& first_bias,
                                                     const c10::optional<at::Tensor>& first_bias2,
                                                     bool coefficients_only) {
  TORCH_CHECK(unclip_rt::is_nhwc_half(first) && unclip_rt::is_nhwc_half(second) &&
                  first.scalar_type() == second.scalar_type() &&
                  first.device() == second.device(),
              "group_norm_concat: first and second must be aligned channels_last half-precision CUDA tensors of one dtype");
  TORCH_CHECK(first.size(0) == second.size(0) && first.size(2) == second.size(2) && first.size(3) == second.size(3),
              "group_norm_concat: first and second must share batch, height and width");
  const int64_t c1 = first.size(1), channels = c1 + second.size(1), hw = first.size(2) * first.size(3);
  TORCH_CHECK(c1 % 8 == 0 && second.size(1) % 8 == 0 && channels % groups == 0,
              "group_norm_concat: both channel counts must be multiples of 8 and their sum of the groups");
  const auto first_part_bias = [&](const c10::optional<at::Tensor>& t) {
    return !t || (t->dim() == 1 && t->size(0) == c1 && t->is_contiguous() && t->scalar_type() == first.scalar_type() &&
                  t->device() == first.device());
  };
  TORCH_CHECK(first_part_bias(first_bias) && first_part_bias(first_bias2) && (first_bias || !first_bias2),
              "group_norm_concat: first_bias (and first_bias2) must be contiguous [C1] vectors in the inputs' dtype, "
              "first_bias2 only with first_bias");
  const int64_t cg = channels / groups;
  if (one_pass_by_size(cg, hw) || !wide_geometry_fits(cg, channels, groups)) {  // group_norm_typed's choices
    at::Tensor head = first;
    if (first_bias) {  // the biases in float, rounded once, as the fused pass adds them
      auto total = first_bias->to(at::kFloat);
      if (first_bias2) total = total + first_bias2->to(at::kFloat);
      head = (first.to(at::kFloat) + total.view({1, c1, 1, 1})).to(first.scalar_type());
    }
    auto cat = at::cat({head, second}, 1).contiguous(at::MemoryFormat::ChannelsLast);
    return {run_group_norm(cat, groups, weight, bias, c10::nullopt, c10::nullopt, c10::nullopt, eps, silu,
                           c10::nullopt, coefficients_only ? 0 : -1, false, false, c10::nullopt, coefficients_only),
            cat};
  }
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == channels && bias.is_contiguous() &&
                  bias.numel() == channels && weight.scalar_type() == first.scalar_type() &&
                  bias.scalar_type() == first.scalar_type() && weight.device() == first.device(),
              "group_norm_concat: weight and bias must be [C1 + C2] in the inputs' dtype");
  const c10::cuda::CUDAGuard guard(first.device());
  auto cat = at::empty({first.size(0), channels, first.size(2), first.size(3)},
                       first.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor y;
  unclip_rt::dispatch_half_like(first, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const Concat<T> concat{reinterpret_cast<const T*>(second.data_ptr()), c1, reinterpret_cast<T*>(cat.data_ptr()),
                           first_bias ? reinterpret_cast<const T*>(first_bias->data_ptr()) : nullptr,
                           first_bias2 ? reinterpret_cast<const T*>(first_bias2->data_ptr()) : nullptr};
    GroupNormCall<T> call{cat, groups, weight, bias};
    call.eps = eps;
    call.silu = silu;
    call.nhwc = true;
    call.one_pass_mode = 0;
    call.pass1_x = reinterpret_cast<const T*>(first.data_ptr());
    call.concat = concat;
    call.coefficients_only = coefficients_only;
    y = group_norm_typed<T>(call);
  });
  return {y, cat};
}

std::vector<at::Tensor> group_norm_concat(const at::Tensor& first, const at::Tensor& second, int64_t groups,
                                          const at::Tensor& weight, const at::Tensor& bias, double eps, bool silu,
                                          const c10::optional<at::Tensor>& first_bias,
                                          const c10::optional<at::Tensor>& first_bias2) {
  return run_group_norm_concat(first, second, groups, weight, bias, eps, silu, first_bias, first_bias2, false);
}

// group_norm_concat's statistics pass (which writes the concatenation) and coefficients pass
// without the normalising one: {[B, C1 + C2, 2] float32 coefficients as group_norm_coefficients
// gives them, the concatenation}.
std::vector<at::Tensor> group_norm_concat_coefficients(const at::Tensor& first, const at::Tensor& second,
                                                       int64_t groups, const at::Tensor& weight,
                                                       const at::Tensor& bias, double eps,
                                                       const c10::optional<at::Tensor>& first_bias,
                                                       const c10::optional<at::Tensor>& first_bias2) {
  return run_group_norm_concat(first, second, groups, weight, bias, eps, false, first_bias, first_bias2, true);
}


// Whether group_norm in auto mode runs a channels-last half-precision map of `channels` over
// `hw` pixels in three passes whose statistics pass has the wide geometry (wide_stats.cuh):
// the maps for which a producer's statistics (bias_residual_stats) replace that pass.
bool group_norm_takes_three_passes(int64_t channels, int64_t groups, int64_t hw) {
  TORCH_CHECK(groups > 0 && channels > 0 && channels % groups == 0 && hw > 0,
              "group_norm_takes_three_passes: channels must be a positive multiple of groups, hw positive");
  const int64_t cg = channels / groups;
  return !one_pass_by_size(cg, hw) && wide_geometry_fits(cg, channels, groups);
}
