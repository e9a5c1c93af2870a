// Whole chains of layers on CPU with no gradient: the planner's latent rollout (sum_t gamma^t R(z_t, a_t)
// and z_H) and min_i Q_i(z, pi(z)) (the planner's terminal values, the TD targets). Each thread takes its
// own rows through every layer, each a single-threaded MKL GEMM on a block of up to 256 rows followed by
// its bias and ELU (or LayerNorm-tanh) in one vectorised pass per row. Layer by layer in PyTorch ops,
// each of the planner's GEMMs on 512 rows is split over both threads and ends in a barrier, and the
// elementwise passes and Python's dispatch between them leave one thread waiting; here the threads meet
// once per call. The same computations as WorldModel.rollout_return's and QEnsemble's layers (the first
// layer's action part a rank-A update inside the ELU's pass). docs/performance.md measures them;
// tests/test_equivalence.py checks them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "row_blocks.h"
#include "row_ops.h"

namespace {

using sb3_tdmpc::add_bias_elu;
using sb3_tdmpc::dot;
using sb3_tdmpc::layer_norm_tanh_row;

// Rows per block: a block's [256, 1024] first hidden layer (1 MiB) and its [256, 512] layers stay in L2/L3.
constexpr int64_t kBlockRows = 256;

// x <- ELU(x @ weight_t + b), written into out ([rows of x, out features]).
void elu_layer(at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& b, at::Tensor& out) {
  at::mm_out(out, x, weight_t);
  const int64_t rows = out.size(0), width = out.size(1);
  float* data = out.data_ptr<float>();
  for (int64_t i = 0; i < rows; ++i) add_bias_elu(data + i * width, b.const_data_ptr<float>(), width);
  x = out;
}

void check_float(const char* op, const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim && t.scalar_type() == at::kFloat && t.device().is_cpu(), op, ": ", what, " must be a ", dim,
              "-D float32 CPU tensor");
}

// first_z_part [E, 2M]: the first layers' z-part plus bias at t = 0 (W_z z_0 + b, per environment);
// actions [H, E * S, A]; first_weight_z [L, 2M], first_weight_a [A, 2M], first_bias [2M]: d's and R's first
// layers side by side (transposed); then each network's further layers (transposed weights [in, out]),
// ELU after all but the last; R's last is [M, 1]. Returns the discounted rewards [E * S, 1] and z_H [E * S, L].
std::tuple<at::Tensor, at::Tensor> rollout_return(const at::Tensor& first_z_part, const at::Tensor& actions,
                                                  const at::Tensor& first_weight_z, const at::Tensor& first_weight_a,
                                                  const at::Tensor& first_bias, at::TensorList dynamics_weights_t,
                                                  at::TensorList dynamics_biases, at::TensorList reward_weights_t,
                                                  at::TensorList reward_biases, double gamma) {
  check_float("rollout_return", first_z_part, 2, "first_z_part");
  check_float("rollout_return", actions, 3, "actions");
  check_float("rollout_return", first_weight_z, 2, "first_weight_z");
  check_float("rollout_return", first_weight_a, 2, "first_weight_a");
  check_float("rollout_return", first_bias, 1, "first_bias");
  const int64_t horizon = actions.size(0), rows = actions.size(1), action_dim = actions.size(2);
  const int64_t num_envs = first_z_part.size(0), width = first_weight_z.size(1), latent_dim = first_weight_z.size(0);
  const int64_t num_layers = static_cast<int64_t>(dynamics_weights_t.size());
  TORCH_CHECK(num_envs > 0 && rows % num_envs == 0, "rollout_return: actions' rows are not E * S");
  TORCH_CHECK(first_z_part.size(1) == width && first_weight_a.size(0) == action_dim && first_weight_a.size(1) == width &&
                  first_bias.size(0) == width && width % 2 == 0,
              "rollout_return: the first layer's shapes do not match");
  TORCH_CHECK(num_layers >= 1 && reward_weights_t.size() == dynamics_weights_t.size() &&
                  dynamics_biases.size() == dynamics_weights_t.size() && reward_biases.size() == reward_weights_t.size(),
              "rollout_return: d and R need as many layers, each with a bias");
  int64_t d_in = width / 2, r_in = width / 2;
  for (int64_t l = 0; l < num_layers; ++l) {
    const auto &wd = dynamics_weights_t[l], &wr = reward_weights_t[l];
    check_float("rollout_return", wd, 2, "a dynamics weight");
    check_float("rollout_return", wr, 2, "a reward weight");
    TORCH_CHECK(wd.size(0) == d_in && wr.size(0) == r_in && dynamics_biases[l].numel() == wd.size(1) &&
                    reward_biases[l].numel() == wr.size(1),
                "rollout_return: layer ", l + 1, "'s shapes do not match");
    d_in = wd.size(1);
    r_in = wr.size(1);
  }
  TORCH_CHECK(d_in == latent_dim && r_in == 1, "rollout_return: d must end in the latent, R in one output");

  const int64_t num_seq = rows / num_envs, num_hidden = num_layers - 1;
  const auto options = actions.options();
  const auto z_part = first_z_part.contiguous(), acts = actions.contiguous(), w_a = first_weight_a.contiguous();
  const auto bias = first_bias.contiguous(), reward_out = reward_weights_t[num_hidden].contiguous();
  std::vector<at::Tensor> d_bias, r_bias;
  for (int64_t l = 0; l < num_layers; ++l) {
    d_bias.push_back(dynamics_biases[l].contiguous().view(-1));
    r_bias.push_back(reward_biases[l].contiguous().view(-1));
  }
  auto value = at::zeros({rows, 1}, options);
  auto z_end = at::empty({rows, latent_dim}, options);

  sb3_tdmpc::for_each_row_block(rows, kBlockRows, [&](int64_t start, int64_t n) {
    auto hidden = at::empty({n, width}, options);
    std::vector<at::Tensor> d_hidden, r_hidden;
    for (int64_t l = 0; l < num_hidden; ++l) {
      d_hidden.push_back(at::empty({n, dynamics_weights_t[l].size(1)}, options));
      r_hidden.push_back(at::empty({n, reward_weights_t[l].size(1)}, options));
    }
    auto z = z_end.narrow(0, start, n);
    float* block_value = value.data_ptr<float>() + start;
    float* h = hidden.data_ptr<float>();
    float discount = 1.f;
    for (int64_t t = 0; t < horizon; ++t) {
      const float* a = acts.const_data_ptr<float>() + (t * rows + start) * action_dim;
      // ELU(W_z z + b + W_a a): at t = 0, W_z z_0 + b per environment; later W_z z_t by GEMM
      if (t == 0) {
        for (int64_t i = 0; i < n; ++i) {
          const float* env_part = z_part.const_data_ptr<float>() + ((start + i) / num_seq) * width;
          std::fill(h + i * width, h + (i + 1) * width, 0.f);
          add_bias_elu(h + i * width, env_part, width, a + i * action_dim, w_a.const_data_ptr<float>(), action_dim);
        }
      } else {
        at::mm_out(hidden, z, first_weight_z);
        for (int64_t i = 0; i < n; ++i)
          add_bias_elu(h + i * width, bias.const_data_ptr<float>(), width, a + i * action_dim, w_a.const_data_ptr<float>(),
                       action_dim);
      }
      at::Tensor d = hidden.narrow(1, 0, width / 2), r = hidden.narrow(1, width / 2, width / 2);
      for (int64_t l = 0; l < num_hidden; ++l) {
        elu_layer(d, dynamics_weights_t[l], d_bias[l], d_hidden[l]);
        elu_layer(r, reward_weights_t[l], r_bias[l], r_hidden[l]);
      }
      at::addmm_out(z, d_bias[num_hidden], d, dynamics_weights_t[num_hidden]);  // z_{t+1} = d(z_t, a_t)
      const float* r_data = r.const_data_ptr<float>();
      const float r_out_bias = *r_bias[num_hidden].const_data_ptr<float>();
      const int64_t r_width = r.size(1), r_stride = r.stride(0);
      for (int64_t i = 0; i < n; ++i)  // G += gamma^t R(z_t, a_t)
        block_value[i] += discount * (dot(r_data + i * r_stride, reward_out.const_data_ptr<float>(), r_width) + r_out_bias);
      discount *= static_cast<float>(gamma);
    }
  });
  return {value, z_end};
}

// min_i Q_i(z, a) with a = pi(z) [+ noise]: pi's layers (transposed weights [in, out], ELU after all but
// the last, then tanh; with action_noise [N, A], already scaled and clipped: a = clamp(mu + noise,
// -1 + 1e-6, 1 - 1e-6)), then each Q member's Linear-LayerNorm-tanh-Linear-ELU-Linear from QEnsemble's
// stacked weights ([Q, in, out], biases [Q, 1, out]). Returns [N, 1]; a NaN in any member's value stays NaN.
at::Tensor min_q_of_policy(const at::Tensor& z, at::TensorList pi_weights_t, at::TensorList pi_biases,
                           const c10::optional<at::Tensor>& action_noise, at::TensorList q_weights, at::TensorList q_biases,
                           const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  check_float("min_q_of_policy", z, 2, "z");
  const int64_t rows = z.size(0), latent_dim = z.size(1), num_pi = static_cast<int64_t>(pi_weights_t.size());
  TORCH_CHECK(num_pi >= 1 && pi_biases.size() == pi_weights_t.size(), "min_q_of_policy: pi needs layers, each with a bias");
  int64_t in = latent_dim;
  for (int64_t l = 0; l < num_pi; ++l) {
    check_float("min_q_of_policy", pi_weights_t[l], 2, "a pi weight");
    TORCH_CHECK(pi_weights_t[l].size(0) == in && pi_biases[l].numel() == pi_weights_t[l].size(1),
                "min_q_of_policy: pi's layer ", l + 1, "'s shapes do not match");
    in = pi_weights_t[l].size(1);
  }
  const int64_t action_dim = in;
  TORCH_CHECK(q_weights.size() == 3 && q_biases.size() == 3, "min_q_of_policy: Q has three layers");
  const int64_t num_q = q_weights[0].size(0), width = q_weights[0].size(2);
  for (int64_t l = 0; l < 3; ++l) {
    check_float("min_q_of_policy", q_weights[l], 3, "a Q weight");
    check_float("min_q_of_policy", q_biases[l], 3, "a Q bias");
    TORCH_CHECK(q_weights[l].size(0) == num_q && q_biases[l].size(0) == num_q &&
                    q_biases[l].size(2) == q_weights[l].size(2) && q_weights[l].size(1) == (l == 0 ? latent_dim + action_dim : width) &&
                    q_weights[l].size(2) == (l == 2 ? 1 : width),
                "min_q_of_policy: Q's layer ", l + 1, "'s shapes do not match");
  }
  TORCH_CHECK(norm_weight.numel() == num_q * width && norm_bias.numel() == num_q * width,
              "min_q_of_policy: Q's LayerNorm shapes do not match");
  const bool noisy = action_noise.has_value();
  at::Tensor noise;
  if (noisy) {
    check_float("min_q_of_policy", *action_noise, 2, "action_noise");
    TORCH_CHECK(action_noise->size(0) == rows && action_noise->size(1) == action_dim, "min_q_of_policy: action_noise is [N, A]");
    noise = action_noise->contiguous();
  }

  const auto options = z.options();
  const auto input = z.contiguous();
  std::vector<at::Tensor> pi_bias, first_bias, hidden_bias, out_weight;
  for (int64_t l = 0; l < num_pi; ++l) pi_bias.push_back(pi_biases[l].contiguous().view(-1));
  const auto norm_weight_c = norm_weight.contiguous().view({num_q, width}), norm_bias_c = norm_bias.contiguous().view({num_q, width});
  for (int64_t q = 0; q < num_q; ++q) {
    first_bias.push_back(q_biases[0].select(0, q).contiguous().view(-1));
    hidden_bias.push_back(q_biases[1].select(0, q).contiguous().view(-1));
    out_weight.push_back(q_weights[2].select(0, q).contiguous().view(-1));
  }
  const auto out_bias = q_biases[2].contiguous().view(-1);
  auto value = at::empty({rows, 1}, options);

  sb3_tdmpc::for_each_row_block(rows, kBlockRows, [&](int64_t start, int64_t n) {
    // a = tanh(pi(z)) [+ noise], written next to z: [z, a] is Q's input
    auto z_action = at::empty({n, latent_dim + action_dim}, options);
    z_action.narrow(1, 0, latent_dim).copy_(input.narrow(0, start, n));
    at::Tensor x = input.narrow(0, start, n);
    for (int64_t l = 0; l + 1 < num_pi; ++l) {
      auto out = at::empty({n, pi_weights_t[l].size(1)}, options);
      elu_layer(x, pi_weights_t[l], pi_bias[l], out);
    }
    auto mu = z_action.narrow(1, latent_dim, action_dim);
    at::addmm_out(mu, pi_bias[num_pi - 1], x, pi_weights_t[num_pi - 1]);
    const float* noise_data = noisy ? noise.const_data_ptr<float>() : nullptr;
    float* za = z_action.data_ptr<float>();
    const int64_t za_width = z_action.size(1);
    for (int64_t i = 0; i < n; ++i) {
      float* a = za + i * za_width + latent_dim;
      for (int64_t k = 0; k < action_dim; ++k) {
        a[k] = std::tanh(a[k]);
        if (noisy) a[k] = std::clamp(a[k] + noise_data[(start + i) * action_dim + k], -1.f + 1e-6f, 1.f - 1e-6f);
      }
    }
    // min_i Q_i(z, a)
    auto hidden = at::empty({n, width}, options), hidden2 = at::empty({n, width}, options);
    float* h = hidden.data_ptr<float>();
    float* h2 = hidden2.data_ptr<float>();
    float* block_value = value.data_ptr<float>() + start;
    for (int64_t q = 0; q < num_q; ++q) {
      const float* norm_w = norm_weight_c.const_data_ptr<float>() + q * width;
      const float* norm_b = norm_bias_c.const_data_ptr<float>() + q * width;
      const float* bias2 = hidden_bias[q].const_data_ptr<float>();
      const float* w_out = out_weight[q].const_data_ptr<float>();
      const float b_out = out_bias.const_data_ptr<float>()[q];
      at::addmm_out(hidden, first_bias[q], z_action, q_weights[0].select(0, q));
      for (int64_t i = 0; i < n; ++i)
        layer_norm_tanh_row(h + i * width, norm_w, norm_b, h + i * width, width, static_cast<float>(eps), nullptr, nullptr);
      at::mm_out(hidden2, hidden, q_weights[1].select(0, q));
      for (int64_t i = 0; i < n; ++i) {
        add_bias_elu(h2 + i * width, bias2, width);
        const float v = dot(h2 + i * width, w_out, width) + b_out;
        if (q == 0 || std::isnan(v) || (v < block_value[i] && !std::isnan(block_value[i]))) block_value[i] = v;
      }
    }
  });
  return value;
}

}  // namespace

// The schema is defined in Python (sb3_tdmpc/common/cpu_kernels.py), before this library loads.
TORCH_LIBRARY_IMPL(sb3_tdmpc_cpu, CPU, m) {
  m.impl("rollout_return", &rollout_return);
  m.impl("min_q_of_policy", &min_q_of_policy);
}
