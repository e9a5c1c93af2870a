// tanh(LayerNorm(x)) over the last dimension on CPU, one row at a time while the row is in L1: the
// statistics (two passes: the mean, then the variance around it), then the affine map and tanh in one
// vectorised pass. ATen's layer_norm, then its tanh (or 2 sigmoid(2x) - 1), take four passes over
// memory. tanh is the rational approximation of the compiled path (policies._rational_tanh, Eigen's),
// within a few ulp; the statistics are ATen's (biased variance, rstd = 1 / sqrt(var + eps)), which the
// backward (ATen's native_layer_norm_backward) reads. A NaN or an infinity in a row makes that row NaN,
// as ATen's. docs/performance.md measures it; tests/test_equivalence.py checks it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "row_ops.h"

namespace {

using sb3_tdmpc::layer_norm_tanh_row;

void check(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && bias.dim() == 1, "layer_norm_tanh: x [N, C], weight [C], bias [C]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "layer_norm_tanh: float32 tensors");
  TORCH_CHECK(x.size(1) == weight.size(0) && x.size(1) == bias.size(0), "layer_norm_tanh: shapes do not match");
  TORCH_CHECK(x.size(1) > 0, "layer_norm_tanh: empty rows");
}

void apply(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, at::Tensor& out,
           float* mean, float* rstd) {
  const auto weight_c = weight.contiguous(), bias_c = bias.contiguous();
  const float* w = weight_c.const_data_ptr<float>();
  const float* b = bias_c.const_data_ptr<float>();
  const float* in = x.const_data_ptr<float>();
  float* data = out.data_ptr<float>();
  const int64_t width = x.size(1), in_stride = x.stride(0), out_stride = out.stride(0);
  at::parallel_for(0, x.size(0), 16, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      layer_norm_tanh_row(in + row * in_stride, w, b, data + row * out_stride, width, static_cast<float>(eps),
                          mean == nullptr ? nullptr : mean + row, rstd == nullptr ? nullptr : rstd + row);
    }
  });
}

// The output and the statistics [N, 1] that native_layer_norm_backward reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_tanh(const at::Tensor& x, const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps) {
  check(x, weight, bias);
  const auto input = x.stride(1) == 1 ? x : x.contiguous();
  auto out = at::empty({input.size(0), input.size(1)}, input.options());
  auto mean = at::empty({input.size(0), 1}, input.options());
  auto rstd = at::empty({input.size(0), 1}, input.options());
  apply(input, weight, bias, eps, out, mean.data_ptr<float>(), rstd.data_ptr<float>());
  return {out, mean, rstd};
}

// In place, no statistics: where no gradient is needed.
void layer_norm_tanh_(at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check(x, weight, bias);
  TORCH_CHECK(x.stride(1) == 1, "layer_norm_tanh_: rows must be contiguous");
  apply(x, weight, bias, eps, x, nullptr, nullptr);
}

}  // namespace

// The schemas are defined in Python (sb3_tdmpc/common/cpu_kernels.py), before this library loads.
TORCH_LIBRARY_IMPL(sb3_tdmpc_cpu, CPU, m) {
  m.impl("layer_norm_tanh", &layer_norm_tanh);
  m.impl("layer_norm_tanh_", &layer_norm_tanh_);
}
