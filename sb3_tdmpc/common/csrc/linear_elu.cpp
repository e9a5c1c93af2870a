// ELU(x @ weight_t + bias), and x @ w, on CPU. Below 512 rows per thread (the planner's layers), MKL's
// GEMM with its own threads, then for linear_elu the bias and the ELU in one vectorised pass while the
// product is still in cache. From there on (the update's horizon x batch), each thread multiplies its
// own share of the rows in one MKL call (single-threaded inside the parallel region, so MKL packs the
// weight once per thread), and linear_elu then applies the bias and the ELU to those rows. With
// block_rows > 0, linear_elu splits each share into blocks of about that many rows, each multiplied and
// activated while in L2: 128 was its choice on the AMD EPYC VM (L2 512 KiB); on the Intel Xeon model
// 207, interleaved, 128-row blocks made the whole update 1%-2% slower than one call per thread.
// docs/performance.md measures it; tests/test_equivalence.py checks it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "row_blocks.h"
#include "row_ops.h"

namespace {

using sb3_tdmpc::add_bias_elu;

// From this many rows per thread on, each thread's own rows; below, MKL's threads (measured: docs).
constexpr int64_t kBlockedFromRowsPerThread = 512;

// Whether `rows` are many enough for each thread's own row blocks.
bool row_blocked(int64_t rows) { return rows >= at::get_num_threads() * kBlockedFromRowsPerThread; }

// out = input @ weight, each thread over its own rows, in blocks of about block_rows rows (<= 0: one
// block per thread), then `epilogue(block_data, block_rows)` on each block.
template <typename Epilogue>
void row_blocked_mm_out(const at::Tensor& input, const at::Tensor& weight, at::Tensor& out, int64_t block_rows,
                        const Epilogue& epilogue) {
  const int64_t rows = input.size(0);
  sb3_tdmpc::for_each_row_block(rows, block_rows > 0 ? block_rows : rows, [&](int64_t start, int64_t n) {
    auto out_block = out.narrow(0, start, n);
    at::mm_out(out_block, input.narrow(0, start, n), weight);
    epilogue(out_block.data_ptr<float>(), n);
  });
}

void check_matmul(const char* name, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, name, ": x [N, K], weight [K, M]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, name, ": float32 tensors");
  TORCH_CHECK(x.size(1) == weight.size(0), name, ": shapes do not match");
}

at::Tensor linear_elu(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias, int64_t block_rows) {
  check_matmul("linear_elu", x, weight_t);
  TORCH_CHECK(bias.dim() == 1 && bias.scalar_type() == at::kFloat && weight_t.size(1) == bias.size(0),
              "linear_elu: bias [M], float32");
  const auto input = x.stride(1) == 1 ? x : x.contiguous();  // any row stride: MKL reads it
  const auto bias_c = bias.contiguous();
  const int64_t rows = input.size(0), width = weight_t.size(1);
  auto out = at::empty({rows, width}, input.options());
  const float* bias_ptr = bias_c.const_data_ptr<float>();
  const auto add_bias_elu_rows = [&](float* data, int64_t n) {
    for (int64_t row = 0; row < n; ++row) add_bias_elu(data + row * width, bias_ptr, width);
  };
  if (row_blocked(rows)) {
    row_blocked_mm_out(input, weight_t, out, block_rows, add_bias_elu_rows);
    return out;
  }
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel's inner ops: no autograd
    at::mm_out(out, input, weight_t);
  }
  float* data = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) { add_bias_elu_rows(data + first * width, last - first); });
  return out;
}

// x @ weight: MKL's GEMM; over many rows (the backward's input gradients) each thread multiplies its own
// share of the rows in one call.
at::Tensor mm(const at::Tensor& x, const at::Tensor& weight) {
  check_matmul("mm", x, weight);
  if (!row_blocked(x.size(0))) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return at::mm(x, weight);
  }
  const auto input = x.stride(1) == 1 ? x : x.contiguous();
  auto out = at::empty({input.size(0), weight.size(1)}, input.options());
  row_blocked_mm_out(input, weight, out, 0, [](float*, int64_t) {});
  return out;
}

// The gradient through ELU from its output, as ATen's elu_backward (is_result): grad where out > 0,
// else grad (out + 1); and its column sums (the bias gradient of the layer before the ELU): one pass,
// each thread summing its own rows, instead of ATen's elu_backward and then a sum over the rows.
std::tuple<at::Tensor, at::Tensor> elu_backward_bias_grad(const at::Tensor& grad, const at::Tensor& out) {
  TORCH_CHECK(grad.dim() == 2 && grad.sizes() == out.sizes(), "elu_backward_bias_grad: grad and out [N, M]");
  TORCH_CHECK(grad.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, "elu_backward_bias_grad: float32 tensors");
  const auto grad_c = grad.contiguous(), out_c = out.contiguous();
  const int64_t rows = grad.size(0), width = grad.size(1);
  auto grad_input = at::empty({rows, width}, grad.options());
  const float *g = grad_c.const_data_ptr<float>(), *o = out_c.const_data_ptr<float>();
  float* gi = grad_input.data_ptr<float>();
  auto column_sums = sb3_tdmpc::per_thread_column_sums(rows, 1, width, grad.options(), [&](int64_t first, int64_t last, float* sum) {
    for (int64_t row = first; row < last; ++row)
      sb3_tdmpc::elu_backward_row(g + row * width, o + row * width, gi + row * width, sum, width);
  });
  return {grad_input, column_sums[0]};
}

// The threads' measured speeds, by which for_each_row_block splits its rows (row_blocks.h); `speeds`
// replaces them and `balance` turns the balancing on or off (tests and benchmarks).
std::vector<double> thread_shares(c10::optional<at::ArrayRef<double>> speeds, c10::optional<bool> balance) {
  if (speeds.has_value()) {
    TORCH_CHECK(static_cast<int64_t>(speeds->size()) <= sb3_tdmpc::kMaxBalancedThreads, "thread_shares: too many threads");
    for (size_t t = 0; t < speeds->size(); ++t) sb3_tdmpc::thread_speed[t].store(static_cast<float>((*speeds)[t]));
  }
  if (balance.has_value()) sb3_tdmpc::balance_thread_shares.store(*balance);
  std::vector<double> current;
  for (int64_t t = 0; t < at::get_num_threads() && t < sb3_tdmpc::kMaxBalancedThreads; ++t)
    current.push_back(sb3_tdmpc::thread_speed[t].load());
  return current;
}

}  // namespace

// The schemas are defined in Python (sb3_tdmpc/common/cpu_kernels.py), before this library loads.
TORCH_LIBRARY_IMPL(sb3_tdmpc_cpu, CPU, m) {
  m.impl("linear_elu", &linear_elu);
  m.impl("mm", &mm);
  m.impl("elu_backward_bias_grad", &elu_backward_bias_grad);
}

TORCH_LIBRARY_IMPL(sb3_tdmpc_cpu, CompositeImplicitAutograd, m) {  // no tensor to dispatch on
  m.impl("thread_shares", &thread_shares);
}
