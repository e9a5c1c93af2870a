// Whole chains of layers on CPU with no gradient: the planner's latent rollout (sum_t gamma^t R(z_t, a_t)
// and z_H), the same for the policy prior's own trajectories (a_t = pi(z_t)), and min_i Q_i(z, pi(z))
// (the planner's terminal values, the TD targets). Each thread takes its own rows through every layer,
// each a single-threaded MKL GEMM on a block of up to 256 rows followed by its bias and ELU (or
// LayerNorm-tanh) in one vectorised pass per row. Layer by layer in PyTorch ops, each of the planner's
// GEMMs on 512 rows (or 25, the policy trajectories) is split over both threads and ends in a barrier,
// and the elementwise passes and Python's dispatch between them leave one thread waiting; here the
// threads meet once per call. The same computations as WorldModel's and QEnsemble's layers (the first
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

// out = ELU(x @ weight_t + bias [+ a @ weight_a]) for a block's rows: the GEMM, then the bias (and a
// first layer's action part, a rank-A update with a: the block's [n, A] actions, rows contiguous)
// inside the ELU's pass.
void linear_elu_into(const at::Tensor& x, const at::Tensor& weight_t, const float* bias, at::Tensor& out,
                     const float* a = nullptr, const at::Tensor* weight_a = nullptr) {
  at::mm_out(out, x, weight_t);
  float* data = out.data_ptr<float>();
  const int64_t width = out.size(1), action_dim = weight_a == nullptr ? 0 : weight_a->size(0);
  const float* w_a = weight_a == nullptr ? nullptr : weight_a->const_data_ptr<float>();
  for (int64_t i = 0; i < out.size(0); ++i)
    add_bias_elu(data + i * width, bias, width, a == nullptr ? nullptr : a + i * action_dim, w_a, action_dim);
}

// x <- ELU(x @ weight_t + b), written into out ([rows of x, out features]).
void elu_layer(at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& b, at::Tensor& out) {
  linear_elu_into(x, weight_t, b.const_data_ptr<float>(), out);
  x = out;
}

void check_float(const char* op, const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim && t.scalar_type() == at::kFloat && t.device().is_cpu(), op, ": ", what, " must be a ", dim,
              "-D float32 CPU tensor");
}

// d's and R's layers after their first layer (side by side, ELU, computed by the caller): transposed
// weights [in, out], ELU after all but the last; d ends in the latent, R in one output.
class DynamicsReward {
 public:
  DynamicsReward(const char* op, int64_t first_width, int64_t latent_dim, at::TensorList dynamics_weights_t,
                 at::TensorList dynamics_biases, at::TensorList reward_weights_t, at::TensorList reward_biases)
      : d_weight_(dynamics_weights_t), r_weight_(reward_weights_t), first_width_(first_width) {
    const int64_t num_layers = static_cast<int64_t>(dynamics_weights_t.size());
    TORCH_CHECK(num_layers >= 1 && reward_weights_t.size() == dynamics_weights_t.size() &&
                    dynamics_biases.size() == dynamics_weights_t.size() && reward_biases.size() == reward_weights_t.size(),
                op, ": d and R need as many layers, each with a bias");
    TORCH_CHECK(first_width % 2 == 0, op, ": the first layer's width is not d's and R's");
    int64_t d_in = first_width / 2, r_in = first_width / 2;
    for (int64_t l = 0; l < num_layers; ++l) {
      const auto &wd = dynamics_weights_t[l], &wr = reward_weights_t[l];
      check_float(op, wd, 2, "a dynamics weight");
      check_float(op, wr, 2, "a reward weight");
      TORCH_CHECK(wd.size(0) == d_in && wr.size(0) == r_in && dynamics_biases[l].numel() == wd.size(1) &&
                      reward_biases[l].numel() == wr.size(1),
                  op, ": layer ", l + 1, "'s shapes do not match");
      d_in = wd.size(1);
      r_in = wr.size(1);
      d_bias_.push_back(dynamics_biases[l].contiguous().view(-1));
      r_bias_.push_back(reward_biases[l].contiguous().view(-1));
    }
    TORCH_CHECK(d_in == latent_dim && r_in == 1, op, ": d must end in the latent, R in one output");
    num_hidden_ = num_layers - 1;
    reward_out_ = reward_weights_t[num_hidden_].contiguous();
  }

  // Each thread's blocks of rows of z_end ([rows, L], z_0 in, z_H out) through `horizon` steps:
  // first_layer(t, start, z, hidden) fills hidden [n, 2M] with the first layers' ELU for the block's
  // (z_t, a_t) (start: its first row), then z <- d(z_t, a_t) and value += gamma^t R(z_t, a_t).
  template <typename FirstLayer>
  void roll_out(int64_t horizon, double gamma, at::Tensor& z_end, at::Tensor& value, const FirstLayer& first_layer) const {
    sb3_tdmpc::for_each_row_block(z_end.size(0), kBlockRows, [&](int64_t start, int64_t n) {
      auto hidden = at::empty({n, first_width_}, z_end.options());
      auto layers = buffers(n, z_end.options());
      auto z = z_end.narrow(0, start, n);
      float discount = 1.f;
      for (int64_t t = 0; t < horizon; ++t) {
        first_layer(t, start, z, hidden);
        step(hidden, layers, z, value.data_ptr<float>() + start, discount);
        discount *= static_cast<float>(gamma);
      }
    });
  }

 private:
  // A block's buffers for the hidden layers: d's, then R's.
  std::vector<at::Tensor> buffers(int64_t n, const at::TensorOptions& options) const {
    std::vector<at::Tensor> out;
    for (int64_t l = 0; l < num_hidden_; ++l) out.push_back(at::empty({n, d_weight_[l].size(1)}, options));
    for (int64_t l = 0; l < num_hidden_; ++l) out.push_back(at::empty({n, r_weight_[l].size(1)}, options));
    return out;
  }

  // From hidden [n, 2M], the first layers' ELU for (z_t, a_t): z <- d(z_t, a_t), value[i] += discount R(z_t, a_t).
  void step(const at::Tensor& hidden, std::vector<at::Tensor>& buffers, at::Tensor& z, float* value, float discount) const {
    const int64_t half = hidden.size(1) / 2;
    at::Tensor d = hidden.narrow(1, 0, half), r = hidden.narrow(1, half, half);
    for (int64_t l = 0; l < num_hidden_; ++l) {
      elu_layer(d, d_weight_[l], d_bias_[l], buffers[l]);
      elu_layer(r, r_weight_[l], r_bias_[l], buffers[num_hidden_ + l]);
    }
    at::addmm_out(z, d_bias_[num_hidden_], d, d_weight_[num_hidden_]);  // z_{t+1} = d(z_t, a_t)
    const float* r_data = r.const_data_ptr<float>();
    const float r_out_bias = *r_bias_[num_hidden_].const_data_ptr<float>();
    const int64_t r_width = r.size(1), r_stride = r.stride(0);
    for (int64_t i = 0; i < r.size(0); ++i)  // G += gamma^t R(z_t, a_t)
      value[i] += discount * (dot(r_data + i * r_stride, reward_out_.const_data_ptr<float>(), r_width) + r_out_bias);
  }

  at::TensorList d_weight_, r_weight_;
  int64_t first_width_;
  std::vector<at::Tensor> d_bias_, r_bias_;
  at::Tensor reward_out_;
  int64_t num_hidden_ = 0;
};

// The policy prior pi: transposed weights [in, out], ELU after all but the last, then tanh; with noise
// (already scaled and clipped), a = clamp(tanh(.) + noise, -1 + 1e-6, 1 - 1e-6), as WorldModel.pi.
class Policy {
 public:
  Policy(const char* op, int64_t latent_dim, at::TensorList weights_t, at::TensorList biases) : weight_(weights_t) {
    TORCH_CHECK(!weights_t.empty() && biases.size() == weights_t.size(), op, ": pi needs layers, each with a bias");
    int64_t in = latent_dim;
    for (size_t l = 0; l < weights_t.size(); ++l) {
      check_float(op, weights_t[l], 2, "a pi weight");
      TORCH_CHECK(weights_t[l].size(0) == in && biases[l].numel() == weights_t[l].size(1), op, ": pi's layer ", l + 1,
                  "'s shapes do not match");
      in = weights_t[l].size(1);
      bias_.push_back(biases[l].contiguous().view(-1));
    }
    action_dim_ = in;
  }

  int64_t action_dim() const { return action_dim_; }

  // a = pi(z) for a block's rows into `action` [n, A] (any row stride); noise: the block's [n, A], or null.
  void act(const at::Tensor& z, const float* noise, at::Tensor action) const {
    at::Tensor x = z;
    const size_t last = weight_.size() - 1;
    for (size_t l = 0; l < last; ++l) {
      auto out = at::empty({z.size(0), weight_[l].size(1)}, z.options());
      elu_layer(x, weight_[l], bias_[l], out);
    }
    at::addmm_out(action, bias_[last], x, weight_[last]);
    float* a = action.data_ptr<float>();
    const int64_t stride = action.stride(0);
    for (int64_t i = 0; i < action.size(0); ++i) {
      for (int64_t k = 0; k < action_dim_; ++k) {
        float& a_k = a[i * stride + k];
        a_k = std::tanh(a_k);
        if (noise != nullptr) a_k = std::clamp(a_k + noise[i * action_dim_ + k], -1.f + 1e-6f, 1.f - 1e-6f);
      }
    }
  }

 private:
  at::TensorList weight_;
  std::vector<at::Tensor> bias_;
  int64_t action_dim_ = 0;
};

// The data of an optional action_noise of the given shape (contiguous, held in `kept`), or null.
const float* optional_noise(const char* op, const c10::optional<at::Tensor>& noise, at::IntArrayRef shape, at::Tensor& kept) {
  if (!noise.has_value()) return nullptr;
  check_float(op, *noise, static_cast<int64_t>(shape.size()), "action_noise");
  TORCH_CHECK(noise->sizes() == shape, op, ": action_noise's shape does not match the actions'");
  kept = noise->contiguous();
  return kept.const_data_ptr<float>();
}

// first_z_part [E, 2M]: the first layers' z-part plus bias at t = 0 (W_z z_0 + b, per environment);
// actions [H, E * S, A]; first_weight_z [L, 2M], first_weight_a [A, 2M], first_bias [2M]: d's and R's first
// layers side by side (transposed); then each network's further layers (DynamicsReward). Returns the
// discounted rewards [E * S, 1] and z_H [E * S, L].
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
  TORCH_CHECK(num_envs > 0 && rows % num_envs == 0, "rollout_return: actions' rows are not E * S");
  TORCH_CHECK(first_z_part.size(1) == width && first_weight_a.size(0) == action_dim && first_weight_a.size(1) == width &&
                  first_bias.size(0) == width,
              "rollout_return: the first layer's shapes do not match");
  const DynamicsReward dynamics_reward("rollout_return", width, latent_dim, dynamics_weights_t, dynamics_biases,
                                       reward_weights_t, reward_biases);

  const int64_t num_seq = rows / num_envs;
  const auto options = actions.options();
  const auto z_part = first_z_part.contiguous(), acts = actions.contiguous(), w_a = first_weight_a.contiguous();
  const auto bias = first_bias.contiguous();
  auto value = at::zeros({rows, 1}, options);
  auto z_end = at::empty({rows, latent_dim}, options);

  dynamics_reward.roll_out(horizon, gamma, z_end, value, [&](int64_t t, int64_t start, const at::Tensor& z, at::Tensor& hidden) {
    const float* a = acts.const_data_ptr<float>() + (t * rows + start) * action_dim;
    if (t > 0) {
      linear_elu_into(z, first_weight_z, bias.const_data_ptr<float>(), hidden, a, &w_a);
      return;
    }
    float* h = hidden.data_ptr<float>();  // t = 0: W_z z_0 + b is given per environment
    for (int64_t i = 0; i < hidden.size(0); ++i) {
      const float* env_part = z_part.const_data_ptr<float>() + ((start + i) / num_seq) * width;
      std::fill(h + i * width, h + (i + 1) * width, 0.f);
      add_bias_elu(h + i * width, env_part, width, a + i * action_dim, w_a.const_data_ptr<float>(), action_dim);
    }
  });
  return {value, z_end};
}

// The policy prior's own trajectories, num_seq from each environment's z0 [E, L]: H steps of a_t = pi(z_t)
// (action_noise [H, E * S, A] as WorldModel.pi's), z_{t+1} = d(z_t, a_t) and G += gamma^t R(z_t, a_t), d's
// and R's first layers side by side as rollout_return's. Returns the actions [H, E * S, A], the discounted
// rewards [E * S, 1] and z_H [E * S, L].
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_rollout(
    const at::Tensor& z0, int64_t num_seq, int64_t horizon, at::TensorList pi_weights_t, at::TensorList pi_biases,
    const c10::optional<at::Tensor>& action_noise, const at::Tensor& first_weight_z, const at::Tensor& first_weight_a,
    const at::Tensor& first_bias, at::TensorList dynamics_weights_t, at::TensorList dynamics_biases,
    at::TensorList reward_weights_t, at::TensorList reward_biases, double gamma) {
  check_float("policy_rollout", z0, 2, "z0");
  check_float("policy_rollout", first_weight_z, 2, "first_weight_z");
  check_float("policy_rollout", first_weight_a, 2, "first_weight_a");
  check_float("policy_rollout", first_bias, 1, "first_bias");
  TORCH_CHECK(num_seq >= 0 && horizon >= 0, "policy_rollout: negative sizes");
  const int64_t num_envs = z0.size(0), latent_dim = z0.size(1), rows = num_envs * num_seq, width = first_weight_z.size(1);
  const Policy pi("policy_rollout", latent_dim, pi_weights_t, pi_biases);
  const int64_t action_dim = pi.action_dim();
  TORCH_CHECK(first_weight_z.size(0) == latent_dim && first_weight_a.size(0) == action_dim && first_weight_a.size(1) == width &&
                  first_bias.size(0) == width,
              "policy_rollout: the first layer's shapes do not match");
  const DynamicsReward dynamics_reward("policy_rollout", width, latent_dim, dynamics_weights_t, dynamics_biases,
                                       reward_weights_t, reward_biases);
  at::Tensor noise_kept;
  const float* noise = optional_noise("policy_rollout", action_noise, {horizon, rows, action_dim}, noise_kept);

  const auto options = z0.options();
  const auto w_a = first_weight_a.contiguous(), bias = first_bias.contiguous();
  auto actions = at::empty({horizon, rows, action_dim}, options);
  auto value = at::zeros({rows, 1}, options);
  auto z_end = z0.contiguous().repeat_interleave(num_seq, 0);  // each trajectory's z_0, then z_H

  dynamics_reward.roll_out(horizon, gamma, z_end, value, [&](int64_t t, int64_t start, const at::Tensor& z, at::Tensor& hidden) {
    auto action = actions.select(0, t).narrow(0, start, hidden.size(0));
    pi.act(z, noise == nullptr ? nullptr : noise + (t * rows + start) * action_dim, action);
    linear_elu_into(z, first_weight_z, bias.const_data_ptr<float>(), hidden, action.const_data_ptr<float>(), &w_a);
  });
  return {actions, value, z_end};
}

// min_i Q_i(z, a) with a = pi(z) [+ noise]: pi's layers (transposed weights [in, out], ELU after all but
// the last, then tanh; with action_noise [N, A], already scaled and clipped: a = clamp(mu + noise,
// -1 + 1e-6, 1 - 1e-6)), then each Q member's Linear-LayerNorm-tanh-Linear-ELU-Linear from QEnsemble's
// stacked weights ([Q, in, out], biases [Q, 1, out]). Returns [N, 1]; a NaN in any member's value stays NaN.
at::Tensor min_q_of_policy(const at::Tensor& z, at::TensorList pi_weights_t, at::TensorList pi_biases,
                           const c10::optional<at::Tensor>& action_noise, at::TensorList q_weights, at::TensorList q_biases,
                           const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  check_float("min_q_of_policy", z, 2, "z");
  const int64_t rows = z.size(0), latent_dim = z.size(1);
  const Policy pi("min_q_of_policy", latent_dim, pi_weights_t, pi_biases);
  const int64_t action_dim = pi.action_dim();
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
  at::Tensor noise_kept;
  const float* noise = optional_noise("min_q_of_policy", action_noise, {rows, action_dim}, noise_kept);

  const auto options = z.options();
  const auto input = z.contiguous();
  std::vector<at::Tensor> first_bias, hidden_bias, out_weight;
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
    pi.act(input.narrow(0, start, n), noise == nullptr ? nullptr : noise + start * action_dim,
           z_action.narrow(1, latent_dim, action_dim));
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
  m.impl("policy_rollout", &policy_rollout);
}
