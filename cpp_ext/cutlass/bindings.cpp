// Python bindings of the CUTLASS Hopper convolution (module cpp_ext._cutlass_conv): checks the
// tensors, allocates the channels-last output and the workspace from torch's allocator, and
// launches the chosen configuration on torch's current stream (so CUDA graphs capture it).
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "conv_shape.h"

namespace uc = unclip_cutlass;

// Error messages take numbers as std::to_string, as the other kernels' bindings do: a message
// built from strings alone formats no number through a stream inside the extension, which
// crashed where the toolchain had linked its own copy of the C++ library into it.

namespace {

// Whether the configurations that take it launch with programmatic dependent launch (the
// persistent ones): off until measured on a GPU, never with UNCLIP_RT_NO_PDL set (as cpp_ext's own
// kernels); `set_overlapped` changes it (CUDA graphs keep what their capture saw).
std::atomic<bool>& overlapped_setting() {
  static std::atomic<bool> setting{false};
  return setting;
}

bool overlap_forbidden() {
  static const bool forbidden = std::getenv("UNCLIP_RT_NO_PDL") != nullptr;
  return forbidden;
}

const uc::Config& config_at(int64_t index) {
  static const uc::Config configs[uc::kConfigs] = {uc::config_0(), uc::config_1(), uc::config_2(), uc::config_3(),
                                                   uc::config_4(), uc::config_5(), uc::config_6(), uc::config_7(),
                                                   uc::config_8(), uc::config_9(), uc::config_10(), uc::config_11(),
                                                   uc::config_12(), uc::config_13()};
  TORCH_CHECK(index >= 0 && index < uc::kConfigs, "config must be in [0, ", std::to_string(uc::kConfigs), "), got ",
              std::to_string(index));
  return configs[index];
}

void check_nhwc(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.dim() == 4, name, " must be a 4-D ",
              c10::toString(dtype), " CUDA tensor");
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), name, " must be channels-last contiguous");
}

void check_channel_vector(const c10::optional<torch::Tensor>& t, const char* name, torch::ScalarType dtype,
                          int64_t k, const torch::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == dtype && t->numel() == k && t->is_contiguous() &&
                  t->device() == x.device(),
              name, " must be a contiguous ", c10::toString(dtype), " CUDA tensor of ", std::to_string(k),
              " values on x's device");
}

// The launch both entry points share: shapes checked, output and workspace allocated.
torch::Tensor launch(const torch::Tensor& x, const torch::Tensor& weight, const float* scale, const void* bias,
                     const c10::optional<torch::Tensor>& residual, int64_t pad_h, int64_t pad_w, int64_t config,
                     int64_t align, int64_t splits) {
  const auto n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const auto k = weight.size(0), r = weight.size(2), s = weight.size(3);
  TORCH_CHECK(weight.size(1) == c, "weight has ", std::to_string(weight.size(1)), " input channels, x has ",
              std::to_string(c));
  TORCH_CHECK(c % align == 0 && k % 8 == 0, "channel counts must be multiples of ", std::to_string(align),
              " (in) and 8 (out), got ", std::to_string(c), " and ", std::to_string(k));
  TORCH_CHECK(x.device() == weight.device(), "x and weight must be on one device");
  const auto ho = h + 2 * pad_h - r + 1, wo = w + 2 * pad_w - s + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "padding too small for the kernel");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({n, k, ho, wo}, x.options().dtype(torch::kHalf).memory_format(at::MemoryFormat::ChannelsLast));
  if (residual.has_value()) {
    check_nhwc(*residual, "residual", torch::kHalf);
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->device() == x.device() &&
                    reinterpret_cast<uintptr_t>(residual->data_ptr()) % 16 == 0,
                "residual must have the output's shape [N, K, P, Q] on x's device, 16-byte aligned");
  }
  const uc::ConvShape shape{static_cast<int>(n), static_cast<int>(h), static_cast<int>(w), static_cast<int>(c),
                            static_cast<int>(k), static_cast<int>(r), static_cast<int>(s),
                            static_cast<int>(pad_h), static_cast<int>(pad_w)};
  const auto& cfg = config_at(config);
  TORCH_CHECK(splits >= 0 && splits <= 64, "splits must be in [0, 64], got ", std::to_string(splits));
  TORCH_CHECK(splits == 0 || cfg.takes_splits, "configuration ", cfg.name,
              " takes no split count (only the stream-K ones do)");
  int sm_count = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()) == cudaSuccess,
              "cannot read the device's SM count");
  const size_t bytes = cfg.workspace_bytes(shape, sm_count, static_cast<int>(splits));
  torch::Tensor workspace;
  if (bytes > 0) workspace = torch::empty({static_cast<int64_t>(bytes)}, x.options().dtype(torch::kUInt8));
  const int rc = cfg.run(shape, x.data_ptr(), weight.data_ptr(), scale, bias,
                         residual.has_value() ? residual->data_ptr() : nullptr, out.data_ptr(),
                         bytes > 0 ? workspace.data_ptr() : nullptr, sm_count, static_cast<int>(splits),
                         overlapped_setting().load() && !overlap_forbidden(),
                         c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(rc == 0, "CUTLASS convolution ", cfg.name, " failed: code ", std::to_string(rc),
              " (1000+: shape not implementable, 2000+: initialisation, 3000+: launch)");
  return out;
}

}  // namespace

// out = conv2d(x, weight, bias, padding) (+ residual) for stride 1, dilation 1, one group; fp16
// channels-last. `splits` > 0: split-K with that many parts (stream-K configurations only;
// Config::takes_splits). `residual`: a map of the output's shape added in the epilogue.
torch::Tensor conv2d(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                     int64_t pad_h, int64_t pad_w, int64_t config, int64_t splits,
                     const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(!config_at(config).e4m3, "configuration ", config_at(config).name, " takes e4m3 operands (conv2d_e4m3)");
  check_nhwc(x, "x", torch::kHalf);
  check_nhwc(weight, "weight", torch::kHalf);
  check_channel_vector(bias, "bias", torch::kHalf, weight.size(0), x);
  return launch(x, weight, nullptr, bias.has_value() ? bias->data_ptr() : nullptr, residual, pad_h, pad_w, config, 8,
                splits);
}

// out = scale[k] · conv2d(x_q, weight_q)[k] + bias[k], e4m3 operands (x_q, weight_q), fp32
// accumulation, fp16 channels-last out; `scale` is the input's scale times each channel's weight scale.
torch::Tensor conv2d_e4m3(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                          const c10::optional<torch::Tensor>& bias, int64_t pad_h, int64_t pad_w, int64_t config,
                          int64_t splits, const c10::optional<torch::Tensor>& residual) {
  TORCH_CHECK(config_at(config).e4m3, "configuration ", config_at(config).name, " takes fp16 operands (conv2d)");
  check_nhwc(x, "x", torch::kFloat8_e4m3fn);
  check_nhwc(weight, "weight", torch::kFloat8_e4m3fn);
  check_channel_vector(scale, "scale", torch::kFloat, weight.size(0), x);
  check_channel_vector(bias, "bias", torch::kHalf, weight.size(0), x);
  return launch(x, weight, scale.data_ptr<float>(), bias.has_value() ? bias->data_ptr() : nullptr, residual, pad_h,
                pad_w, config, 16, splits);
}

std::vector<std::string> configs() {
  std::vector<std::string> names;
  for (int i = 0; i < uc::kConfigs; ++i) names.emplace_back(config_at(i).name);
  return names;
}

std::vector<int64_t> split_configs() {
  std::vector<int64_t> indices;
  for (int i = 0; i < uc::kConfigs; ++i) {
    if (config_at(i).takes_splits) indices.push_back(i);
  }
  return indices;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("conv2d", &conv2d, "fp16 channels-last 2-D convolution, stride 1 (CUTLASS, Hopper)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("pad_h"), py::arg("pad_w"), py::arg("config"),
        py::arg("splits") = 0, py::arg("residual") = py::none());
  m.def("conv2d_e4m3", &conv2d_e4m3, "e4m3 channels-last 2-D convolution with per-channel scales, fp16 out",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("bias"), py::arg("pad_h"), py::arg("pad_w"),
        py::arg("config"), py::arg("splits") = 0, py::arg("residual") = py::none());
  m.def("configs", &configs, "the instantiated configurations, by index (names start with f16_ or e4m3_)");
  m.def("split_configs", &split_configs, "the indices of the configurations that take a split count");
  m.def("overlapped", [] { return overlapped_setting().load() && !overlap_forbidden(); },
        "whether the persistent configurations launch with programmatic dependent launch");
  m.def("set_overlapped", [](bool on) { overlapped_setting().store(on); },
        "launch the persistent configurations with programmatic dependent launch (on) or as usual (off)",
        py::arg("on"));
}
