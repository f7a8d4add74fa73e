// One denoising step's update in one launch: classifier-free guidance combine, x0 prediction
// (from epsilon or direct), clamp, the update x_prev = a*x_t + b*x0 + c*eps + sigma*z with a fixed
// or learned-range sigma, a non-finite check, and the next network input (x_prev cast to the
// network's dtype, written `copies` times for the conditional/unconditional halves).
//
// The math runs in float32 whatever the network dtype (the x0-from-eps division near t=999
// multiplies rounding by ~2e4, so it must not run in half precision). Coefficients come from the
// device (a row of the step table) and the guidance scale too, so a captured CUDA graph serves any
// scale. Mirrors `runtime.update.reference_update` operation for operation.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "elementwise.cuh"

namespace {

// Columns of a packed step-table row (runtime.update.COLUMNS).
enum Column {
  kX0FromXt, kX0FromEps, kEpsFromXt, kEpsFromX0, kCoefXt, kCoefX0, kCoefEps, kSigma,
  kLogVarMin, kLogVarMax, kNoiseScale, kNumColumns
};

struct Params {
  int64_t batch;       // images (rows of x)
  int64_t inner;       // elements per image of x
  int64_t out_stride;  // elements per row of the network output
  int64_t var_offset;  // offset of the variance values within an output row
  int copies;          // rows of x_in per row of x
  int step;            // step index recorded on a non-finite value
  bool guided, eps_prediction, learned_variance, has_clip;
  float clip;
};

using unclip_rt::from_float;
using unclip_rt::Pack;
using unclip_rt::to_float;

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) { return *reinterpret_cast<const Pack<T, VEC>*>(p); }

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& v) { *reinterpret_cast<Pack<T, VEC>*>(p) = v; }

template <typename TOut, typename TIn, int VEC>
__global__ void guided_update_kernel(const TOut* __restrict__ out, const float* __restrict__ x,
                                     const float* __restrict__ noise, const float* __restrict__ coefs,
                                     const float* __restrict__ scale, float* __restrict__ x_new,
                                     TIn* __restrict__ x_in, int* __restrict__ first_bad, Params p) {
  const int64_t n = p.batch * p.inner;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (base >= n) return;
  const int64_t row = base / p.inner;  // VEC divides inner: a pack never straddles two images
  const int64_t col = base - row * p.inner;

  const float g = p.guided ? scale[0] : 1.0f;
  const float x0_from_xt = coefs[kX0FromXt], x0_from_eps = coefs[kX0FromEps];
  const float eps_from_xt = coefs[kEpsFromXt], eps_from_x0 = coefs[kEpsFromX0];
  const float coef_xt = coefs[kCoefXt], coef_x0 = coefs[kCoefX0], coef_eps = coefs[kCoefEps];

  const TOut* cond_ptr = out + row * p.out_stride + col;
  const auto cond = load<TOut, VEC>(cond_ptr);
  Pack<TOut, VEC> uncond = cond, var = cond;
  if (p.guided) uncond = load<TOut, VEC>(out + (p.batch + row) * p.out_stride + col);
  if (p.learned_variance) var = load<TOut, VEC>(cond_ptr + p.var_offset);
  const auto xt = load<float, VEC>(x + base);
  const auto z = load<float, VEC>(noise + base);

  Pack<float, VEC> y;
  bool bad = false;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float pred = to_float(cond.v[k]);
    if (p.guided) {
      const float u = to_float(uncond.v[k]);
      pred = u + g * (pred - u);
    }
    float x0 = p.eps_prediction ? x0_from_xt * xt.v[k] - x0_from_eps * pred : pred;
    if (p.has_clip) x0 = x0 < -p.clip ? -p.clip : (x0 > p.clip ? p.clip : x0);  // keeps NaN, as torch.clamp
    const float eps = p.eps_prediction ? pred : eps_from_xt * xt.v[k] - eps_from_x0 * x0;
    const float mean = coef_xt * xt.v[k] + coef_x0 * x0 + coef_eps * eps;
    float sigma;
    if (p.learned_variance) {
      const float frac = (to_float(var.v[k]) + 1.0f) * 0.5f;
      const float log_var = frac * coefs[kLogVarMax] + (1.0f - frac) * coefs[kLogVarMin];
      sigma = expf(0.5f * log_var) * coefs[kNoiseScale];
    } else {
      sigma = coefs[kSigma];
    }
    y.v[k] = mean + sigma * z.v[k];
    bad |= !isfinite(y.v[k]);
  }
  store<float, VEC>(x_new + base, y);
  Pack<TIn, VEC> y_in;
#pragma unroll
  for (int k = 0; k < VEC; ++k) y_in.v[k] = from_float<TIn>(y.v[k]);
  for (int c = 0; c < p.copies; ++c) store<TIn, VEC>(x_in + c * n + base, y_in);
  if (bad) atomicCAS(first_bad, -1, p.step);  // steps run in order: the first bad step wins
}

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename TOut, typename TIn>
void launch(const at::Tensor& out, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& coefs,
            const at::Tensor& scale, at::Tensor& x_new, at::Tensor& x_in, at::Tensor& first_bad, const Params& p) {
  const auto* out_ptr = reinterpret_cast<const TOut*>(out.data_ptr());
  auto* in_ptr = reinterpret_cast<TIn*>(x_in.data_ptr());
  constexpr int kVec = 4;
  const bool vec = p.inner % kVec == 0 && p.out_stride % kVec == 0 && p.var_offset % kVec == 0 &&
                   aligned(out_ptr, sizeof(TOut) * kVec) && aligned(in_ptr, sizeof(TIn) * kVec) &&
                   aligned(x.data_ptr(), 16) && aligned(noise.data_ptr(), 16) && aligned(x_new.data_ptr(), 16);
  const int64_t n = p.batch * p.inner;
  const int threads = 256;
  const int per_thread = vec ? kVec : 1;
  const int64_t blocks = (n + static_cast<int64_t>(threads) * per_thread - 1) / (static_cast<int64_t>(threads) * per_thread);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* args[] = {x.data_ptr<float>(), noise.data_ptr<float>(), coefs.data_ptr<float>(), scale.data_ptr<float>()};
  if (vec) {
    guided_update_kernel<TOut, TIn, kVec><<<blocks, threads, 0, stream>>>(
        out_ptr, args[0], args[1], args[2], args[3], x_new.data_ptr<float>(), in_ptr, first_bad.data_ptr<int>(), p);
  } else {
    guided_update_kernel<TOut, TIn, 1><<<blocks, threads, 0, stream>>>(
        out_ptr, args[0], args[1], args[2], args[3], x_new.data_ptr<float>(), in_ptr, first_bad.data_ptr<int>(), p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename TOut>
void dispatch_in(const at::Tensor& out, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& coefs,
                 const at::Tensor& scale, at::Tensor& x_new, at::Tensor& x_in, at::Tensor& first_bad, const Params& p) {
  switch (x_in.scalar_type()) {
    case at::kFloat: return launch<TOut, float>(out, x, noise, coefs, scale, x_new, x_in, first_bad, p);
    case at::kHalf: return launch<TOut, __half>(out, x, noise, coefs, scale, x_new, x_in, first_bad, p);
    case at::kBFloat16: return launch<TOut, __nv_bfloat16>(out, x, noise, coefs, scale, x_new, x_in, first_bad, p);
    default: TORCH_CHECK(false, "x_in must be float32, float16 or bfloat16, got ", x_in.scalar_type());
  }
}

}  // namespace

// See runtime.update.guided_update for the meaning of each argument.
void guided_update(const at::Tensor& out, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& coefs,
                   const at::Tensor& scale, at::Tensor& x_new, at::Tensor& x_in, at::Tensor& first_bad,
                   int64_t step, int64_t copies, bool guided, bool eps_prediction, bool learned_variance,
                   double clip) {
  const at::Tensor* tensors[] = {&out, &x, &noise, &coefs, &scale, &x_new, &x_in, &first_bad};
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == x.device(), "guided_update: every tensor must be on x's CUDA device");
    TORCH_CHECK(t->is_contiguous(), "guided_update: every tensor must be contiguous");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && noise.scalar_type() == at::kFloat && x_new.scalar_type() == at::kFloat,
              "guided_update: x, noise and x_new must be float32");
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.numel() == kNumColumns, "guided_update: coefs must be one "
              "float32 row of ", std::to_string(kNumColumns), " step-table columns");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == 1, "guided_update: scale must be one float32");
  TORCH_CHECK(first_bad.scalar_type() == at::kInt && first_bad.numel() == 1, "guided_update: first_bad must be one int32");
  TORCH_CHECK(x.dim() >= 2 && x.size(0) > 0, "guided_update: x must be [batch, ...]");
  TORCH_CHECK(noise.numel() == x.numel() && x_new.numel() == x.numel(), "guided_update: noise/x_new shape != x");
  TORCH_CHECK(copies >= 1 && x_in.numel() == copies * x.numel(), "guided_update: x_in must hold `copies` x's");
  Params p{};
  p.batch = x.size(0);
  p.inner = x.numel() / p.batch;
  const int64_t rows = guided ? 2 * p.batch : p.batch;
  TORCH_CHECK(out.dim() >= 1 && out.size(0) == rows, "guided_update: out must have ", std::to_string(rows), " rows");
  p.out_stride = out.numel() / rows;
  TORCH_CHECK(p.out_stride >= (learned_variance ? 2 : 1) * p.inner, "guided_update: out rows too small for x",
              learned_variance ? " and its variance values" : "");
  p.var_offset = learned_variance ? p.inner : 0;
  p.copies = static_cast<int>(copies);
  p.step = static_cast<int>(step);
  p.guided = guided;
  p.eps_prediction = eps_prediction;
  p.learned_variance = learned_variance;
  p.has_clip = clip >= 0;
  p.clip = static_cast<float>(clip);
  const c10::cuda::CUDAGuard guard(x.device());
  switch (out.scalar_type()) {
    case at::kFloat: return dispatch_in<float>(out, x, noise, coefs, scale, x_new, x_in, first_bad, p);
    case at::kHalf: return dispatch_in<__half>(out, x, noise, coefs, scale, x_new, x_in, first_bad, p);
    case at::kBFloat16: return dispatch_in<__nv_bfloat16>(out, x, noise, coefs, scale, x_new, x_in, first_bad, p);
    default: TORCH_CHECK(false, "out must be float32, float16 or bfloat16, got ", out.scalar_type());
  }
}
