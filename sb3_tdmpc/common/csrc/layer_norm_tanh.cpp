// tanh(LayerNorm(x)) over the last dimension on CPU, one row at a time while the row is in L1: the
// statistics (two passes: the mean, then the variance around it), then the affine map and tanh in one
// vectorised pass. ATen's layer_norm, then its tanh (or 2 sigmoid(2x) - 1), take four passes over
// memory. tanh is the rational approximation of the compiled path (fast_layers._rational_tanh, Eigen's),
// within a few ulp; the statistics are ATen's (biased variance, rstd = 1 / sqrt(var + eps)), which the
// backward (ATen's native_layer_norm_backward) reads. A NaN or an infinity in a row makes that row NaN,
// as ATen's. docs/performance.md measures it; tests/test_equivalence.py checks it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "row_blocks.h"
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

// Q's first layer and activation where z W_z comes from one GEMM (the policy prior's step): h += bias +
// x @ x_weight (x [N, K], the action: a rank-K update) in place, then tanh(LayerNorm(h)) and its
// statistics, one pass per row while it is in L1 instead of addmm's copies of the bias and of h, a
// K = 4 GEMM and the LayerNorm-tanh pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> first_layer_norm_tanh_(at::Tensor& h, const at::Tensor& bias, const at::Tensor& x,
                                                                     const at::Tensor& x_weight, const at::Tensor& weight,
                                                                     const at::Tensor& norm_bias, double eps) {
  check(h, weight, norm_bias);
  TORCH_CHECK(h.stride(1) == 1, "first_layer_norm_tanh_: rows of h must be contiguous");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h.size(1) && x.dim() == 2 && x.size(0) == h.size(0) &&
                  x_weight.dim() == 2 && x_weight.size(0) == x.size(1) && x_weight.size(1) == h.size(1),
              "first_layer_norm_tanh_: bias [C], x [N, K], x_weight [K, C]");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && x_weight.scalar_type() == at::kFloat,
              "first_layer_norm_tanh_: float32 tensors");
  const auto bias_c = bias.contiguous(), x_c = x.contiguous(), x_weight_c = x_weight.contiguous();
  const auto weight_c = weight.contiguous(), norm_bias_c = norm_bias.contiguous();
  const int64_t rows = h.size(0), width = h.size(1), num_x = x.size(1), stride = h.stride(0);
  auto out = at::empty({rows, width}, h.options());
  auto mean = at::empty({rows, 1}, h.options()), rstd = at::empty({rows, 1}, h.options());
  float* data = h.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float *mean_data = mean.data_ptr<float>(), *rstd_data = rstd.data_ptr<float>();
  const float *b = bias_c.const_data_ptr<float>(), *xs = x_c.const_data_ptr<float>(), *xw = x_weight_c.const_data_ptr<float>();
  const float *w = weight_c.const_data_ptr<float>(), *nb = norm_bias_c.const_data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    for (int64_t row = first; row < last; ++row) {
      float* h_row = data + row * stride;
      sb3_tdmpc::add_bias_rank_k(h_row, b, width, xs + row * num_x, xw, num_x);
      layer_norm_tanh_row(h_row, w, nb, out_data + row * width, width, static_cast<float>(eps), mean_data + row, rstd_data + row);
    }
  });
  return {out, mean, rstd};
}

// The gradients of out = tanh(y weight + bias), y = (h - mean) rstd, from the gradient of out:
// g_u = grad (1 - out^2), g_y = g_u weight, grad_h = rstd (g_y - mean(g_y) - y mean(g_y y)) (ATen's
// native_layer_norm_backward), grad_weight = sum over rows of g_u y, grad_bias = sum of g_u. Two
// passes per row while it is in L1 (row_ops.h; each thread sums the weight's and bias's over its own
// rows) instead of ATen's tanh_backward and layer-norm backward, five passes over memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_tanh_backward(const at::Tensor& grad, const at::Tensor& h,
                                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                                        const at::Tensor& out, const at::Tensor& weight) {
  TORCH_CHECK(h.dim() == 2 && grad.sizes() == h.sizes() && out.sizes() == h.sizes() && weight.dim() == 1 &&
                  weight.size(0) == h.size(1) && mean.numel() == h.size(0) && rstd.numel() == h.size(0),
              "layer_norm_tanh_backward: grad, h, out [N, C], mean, rstd [N, 1], weight [C]");
  for (const auto* t : {&grad, &h, &mean, &rstd, &out, &weight})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "layer_norm_tanh_backward: float32 tensors");
  const auto g_c = grad.contiguous(), h_c = h.contiguous(), mean_c = mean.contiguous(), rstd_c = rstd.contiguous(),
             out_c = out.contiguous(), weight_c = weight.contiguous();
  const int64_t rows = h.size(0), width = h.size(1);
  auto grad_h = at::empty({rows, width}, h.options());
  const float *g = g_c.const_data_ptr<float>(), *x = h_c.const_data_ptr<float>(), *o = out_c.const_data_ptr<float>();
  const float *m = mean_c.const_data_ptr<float>(), *r = rstd_c.const_data_ptr<float>(), *w = weight_c.const_data_ptr<float>();
  float* dh = grad_h.data_ptr<float>();
  // The weight's and the bias's gradients: [2, C].
  auto param_grads = sb3_tdmpc::per_thread_column_sums(rows, 2, width, h.options(), [&](int64_t first, int64_t last, float* sums) {
    for (int64_t row = first; row < last; ++row)
      sb3_tdmpc::layer_norm_tanh_backward_row(g + row * width, x + row * width, o + row * width, w, m[row], r[row],
                                              dh + row * width, sums, sums + width, width);
  });
  return {grad_h, param_grads[0], param_grads[1]};
}

}  // namespace

// The schemas are defined in Python (sb3_tdmpc/common/cpu_kernels.py), before this library loads.
TORCH_LIBRARY_IMPL(sb3_tdmpc_cpu, CPU, m) {
  m.impl("layer_norm_tanh", &layer_norm_tanh);
  m.impl("layer_norm_tanh_", &layer_norm_tanh_);
  m.impl("layer_norm_tanh_backward", &layer_norm_tanh_backward);
  m.impl("first_layer_norm_tanh_", &first_layer_norm_tanh_);
}
