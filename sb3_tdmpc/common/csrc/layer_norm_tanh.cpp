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

#include <cmath>
#include <cstdint>
#include <tuple>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// tanh(x) = x P(x^2) / Q(x^2) for x clamped to [-c, c]; coefficients in ascending powers.
constexpr float kClamp = 7.90531110763549805f;
constexpr float kP[7] = {4.89352455891786e-03f,  6.37261928875436e-04f, 1.48572235717979e-05f, 5.12229709037114e-08f,
                         -8.60467152213735e-11f, 2.00018790482477e-13f, -2.76076847742355e-16f};
constexpr float kQ[4] = {4.89352518554385e-03f, 2.26843463243900e-03f, 1.18534705686654e-04f, 1.19825839466702e-06f};

inline float rational_tanh(float x) {
  x = x < -kClamp ? -kClamp : (x > kClamp ? kClamp : x);  // a NaN passes through
  const float x2 = x * x;
  float p = kP[6];
  for (int i = 5; i >= 0; --i) p = p * x2 + kP[i];
  float q = kQ[3];
  for (int i = 2; i >= 0; --i) q = q * x2 + kQ[i];
  return x * p / q;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 rational_tanh(__m256 x) {
  // max/min return their second operand when one is NaN: the constant first keeps a NaN
  x = _mm256_min_ps(_mm256_set1_ps(kClamp), _mm256_max_ps(_mm256_set1_ps(-kClamp), x));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(kP[6]);
  for (int i = 5; i >= 0; --i) p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(kP[i]));
  __m256 q = _mm256_set1_ps(kQ[3]);
  for (int i = 2; i >= 0; --i) q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(kQ[i]));
  return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// out = tanh((x - mean) * rstd * weight + bias) for one row of n; out may be x.
void layer_norm_tanh_row(const float* x, const float* __restrict weight, const float* __restrict bias, float* out,
                         int64_t n, float eps, float* mean_out, float* rstd_out) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(x + j));
    acc1 = _mm256_add_ps(acc1, _mm256_loadu_ps(x + j + 8));
  }
  sum = horizontal_sum(_mm256_add_ps(acc0, acc1));
#endif
  for (; j < n; ++j) sum += x[j];
  const float mean = sum / static_cast<float>(n);

  j = 0;
  float squares = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 mean_v = _mm256_set1_ps(mean);
  acc0 = _mm256_setzero_ps();
  acc1 = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), mean_v);
    const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), mean_v);
    acc0 = _mm256_fmadd_ps(d0, d0, acc0);
    acc1 = _mm256_fmadd_ps(d1, d1, acc1);
  }
  squares = horizontal_sum(_mm256_add_ps(acc0, acc1));
#endif
  for (; j < n; ++j) squares += (x[j] - mean) * (x[j] - mean);
  const float rstd = 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
  const float shift = -mean * rstd;  // (x - mean) * rstd = x * rstd + shift

  j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 rstd_v = _mm256_set1_ps(rstd), shift_v = _mm256_set1_ps(shift);
  for (; j + 8 <= n; j += 8) {
    const __m256 normalized = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), rstd_v, shift_v);
    const __m256 y = _mm256_fmadd_ps(normalized, _mm256_loadu_ps(weight + j), _mm256_loadu_ps(bias + j));
    _mm256_storeu_ps(out + j, rational_tanh(y));
  }
#endif
  for (; j < n; ++j) out[j] = rational_tanh((x[j] * rstd + shift) * weight[j] + bias[j]);
  if (mean_out != nullptr) {
    *mean_out = mean;
    *rstd_out = rstd;
  }
}

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
