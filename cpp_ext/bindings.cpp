// Python bindings of the fused CUDA kernels (module cpp_ext._C).

#include <torch/extension.h>

void guided_update(const at::Tensor& out, const at::Tensor& x, const at::Tensor& noise, const at::Tensor& coefs,
                   const at::Tensor& scale, at::Tensor& x_new, at::Tensor& x_in, at::Tensor& first_bad,
                   int64_t step, int64_t copies, bool guided, bool eps_prediction, bool learned_variance,
                   double clip);

at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                      const c10::optional<at::Tensor>& add, double eps, bool silu,
                      const c10::optional<at::Tensor>& add_bias, int64_t one_pass_mode, bool up, bool down,
                      const c10::optional<at::Tensor>& partial);

bool group_norm_takes_three_passes(int64_t channels, int64_t groups, int64_t hw);

bool group_norm_phased_serves(const at::Tensor& product, int64_t groups);

at::Tensor group_norm_phased(const at::Tensor& product, int64_t groups, const at::Tensor& weight,
                             const at::Tensor& bias, const c10::optional<at::Tensor>& scale,
                             const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& add,
                             double eps, bool silu, const c10::optional<at::Tensor>& add_bias);

at::Tensor group_norm_coefficients(const at::Tensor& x, int64_t groups, const at::Tensor& weight,
                                   const at::Tensor& bias, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& add,
                                   double eps, const c10::optional<at::Tensor>& add_bias,
                                   const c10::optional<at::Tensor>& partial);

std::vector<at::Tensor> group_norm_concat_coefficients(const at::Tensor& first, const at::Tensor& second,
                                                       int64_t groups, const at::Tensor& weight,
                                                       const at::Tensor& bias, double eps,
                                                       const c10::optional<at::Tensor>& first_bias,
                                                       const c10::optional<at::Tensor>& first_bias2);

std::vector<at::Tensor> group_norm_concat(const at::Tensor& first, const at::Tensor& second, int64_t groups,
                                          const at::Tensor& weight, const at::Tensor& bias, double eps, bool silu,
                                          const c10::optional<at::Tensor>& first_bias,
                                          const c10::optional<at::Tensor>& first_bias2);

void bias_residual_(at::Tensor& h, const at::Tensor& skip, const at::Tensor& bias,
                    const c10::optional<at::Tensor>& bias2);

std::vector<at::Tensor> bias_residual_stats(const at::Tensor& h, const at::Tensor& skip, const at::Tensor& bias,
                                            const c10::optional<at::Tensor>& bias2, int64_t groups);

at::Tensor prior_step_attention(const at::Tensor& qkv, const at::Tensor& past, const at::Tensor& keep,
                                int64_t heads);

std::vector<at::Tensor> pack_attention_kv(const at::Tensor& qkv, const at::Tensor& context_kv,
                                          const at::Tensor& keep);

at::Tensor residual_layer_norm(at::Tensor& x, const c10::optional<at::Tensor>& pending, const at::Tensor& weight,
                               const at::Tensor& beta, double eps);

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         int64_t activation, const c10::optional<at::Tensor>& out, int64_t warps,
                         int64_t block_features);

at::Tensor skinny_linear_staged(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                int64_t activation, const c10::optional<at::Tensor>& out, int64_t block_features,
                                int64_t stages);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unclip-rt fused CUDA kernels";
  m.def("guided_update", &guided_update,
        "guidance + x0 + clamp + update + finite check + next network input, in one launch");
  m.def("group_norm", &group_norm, "group norm (+ add before, + scale/shift, + SiLU) for NCHW or NHWC, float32 statistics",
        py::arg("x"), py::arg("groups"), py::arg("weight"), py::arg("bias"), py::arg("scale") = py::none(),
        py::arg("shift") = py::none(), py::arg("add") = py::none(), py::arg("eps") = 1e-5, py::arg("silu") = false,
        py::arg("add_bias") = py::none(), py::arg("one_pass_mode") = -1, py::arg("up") = false, py::arg("down") = false,
        py::arg("partial") = py::none());
  m.def("group_norm_takes_three_passes", &group_norm_takes_three_passes,
        "whether group_norm (auto mode) runs a channels-last half-precision map of this size in three passes over "
        "the wide statistics geometry: the maps whose statistics bias_residual_stats computes for it",
        py::arg("channels"), py::arg("groups"), py::arg("hw"));
  m.def("group_norm_phased", &group_norm_phased,
        "group_norm (three passes) of the upsampled map an up block's folded product [B, 4K, H+1, W+1] stands for, "
        "read in place (no interleave copy): [B, K, 2H, 2W], channels_last half precision",
        py::arg("product"), py::arg("groups"), py::arg("weight"), py::arg("bias"), py::arg("scale") = py::none(),
        py::arg("shift") = py::none(), py::arg("add") = py::none(), py::arg("eps") = 1e-5, py::arg("silu") = false,
        py::arg("add_bias") = py::none());
  m.def("group_norm_phased_serves", &group_norm_phased_serves,
        "whether group_norm_phased takes this folded product in these groups and the map's norm runs three passes",
        py::arg("product"), py::arg("groups"));
  m.def("group_norm_coefficients", &group_norm_coefficients,
        "group_norm's float32 [B, C, 2] coefficients (A, B): its output before SiLU is x * A + B (no normalising pass)",
        py::arg("x"), py::arg("groups"), py::arg("weight"), py::arg("bias"), py::arg("scale") = py::none(),
        py::arg("shift") = py::none(), py::arg("add") = py::none(), py::arg("eps") = 1e-5,
        py::arg("add_bias") = py::none(), py::arg("partial") = py::none());
  m.def("group_norm_concat_coefficients", &group_norm_concat_coefficients,
        "[group_norm_coefficients of cat(first, second, dim=1), that concatenation], channels_last half precision",
        py::arg("first"), py::arg("second"), py::arg("groups"), py::arg("weight"), py::arg("bias"),
        py::arg("eps") = 1e-5, py::arg("first_bias") = py::none(), py::arg("first_bias2") = py::none());
  m.def("group_norm_concat", &group_norm_concat,
        "[group norm (+ SiLU) of cat(first, second, dim=1), that concatenation], channels_last half precision; the "
        "norm's statistics pass writes the concatenation (first_bias, first_bias2: [C1] added to first's channels)",
        py::arg("first"), py::arg("second"), py::arg("groups"), py::arg("weight"), py::arg("bias"),
        py::arg("eps") = 1e-5, py::arg("silu") = false, py::arg("first_bias") = py::none(),
        py::arg("first_bias2") = py::none());
  m.def("bias_residual_", &bias_residual_, "h += skip + bias (+ bias2), in place, NCHW or NHWC", py::arg("h"),
        py::arg("skip"), py::arg("bias"), py::arg("bias2") = py::none());
  m.def("bias_residual_stats", &bias_residual_stats,
        "[h + skip + bias (+ bias2), its group norm statistics pass (group_norm's partial)], channels_last half "
        "precision, out of place",
        py::arg("h"), py::arg("skip"), py::arg("bias"), py::arg("bias2") = py::none(), py::arg("groups") = 32);
  m.def("prior_step_attention", &prior_step_attention,
        "the prior step tokens' attention over cached caption keys and their own keys", py::arg("qkv"),
        py::arg("past"), py::arg("keep"), py::arg("heads"));
  m.def("pack_attention_kv", &pack_attention_kv,
        "a decoder step's image and cached context keys/values packed for varlen flash attention (kept tokens first)",
        py::arg("qkv"), py::arg("context_kv"), py::arg("keep"));
  m.def("residual_layer_norm", &residual_layer_norm,
        "x += pending bias (in place), then layer norm of x with float32 statistics", py::arg("x"),
        py::arg("pending"), py::arg("weight"), py::arg("beta"), py::arg("eps") = 1e-5);
  m.def("skinny_linear", &skinny_linear,
        "act(x W^T + b) for 1 to 64 rows, weights streamed through the tensor cores (activation 0 none, 1 GELU, "
        "2 SiLU); with out: out += it, in place",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("activation") = 0,
        py::arg("out") = py::none(), py::arg("warps") = 8, py::arg("block_features") = 16);
  m.def("skinny_linear_staged", &skinny_linear_staged,
        "skinny_linear with the weights staged through a ring of shared-memory stages (bulk copies; Hopper+)",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("activation") = 0,
        py::arg("out") = py::none(), py::arg("block_features") = 16, py::arg("stages") = 4);
}
