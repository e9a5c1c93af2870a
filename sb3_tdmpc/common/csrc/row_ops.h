// The fused CPU kernels' vectorised row operations: ELU (with a bias and a few inputs' rank update),
// LayerNorm-tanh, their backward and a dot product, each on one row while it is in L1. AVX2 (8 floats
// per instruction) where the build has it; the ELU and tanh passes, the costly ones, also AVX-512 (16).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace sb3_tdmpc {

// exp(x) for x in [-87, 0]: Cody-Waite range reduction and Cephes' polynomial, as the compiled path's
// (fast_layers._exp). ELU = exp(x) - 1 is then within 1e-7 of the exact value (tested).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_nonpositive(float x) {
  x = std::fmax(x, -87.f);
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
// One vector width's operations, so that each vectorised row operation below is written once for
// AVX2 (8 floats) and AVX-512 (16).
struct Avx2 {
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }  // b where either is NaN
  static V max(V a, V b) { return _mm256_max_ps(a, b); }  // b where either is NaN
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for whole numbers n within the float exponent's range, by writing the exponent bits.
  static V pow2(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
};
#endif

#if defined(__AVX512F__)
struct Avx512 {
  using V = __m512;
  static constexpr int64_t kWidth = 16;
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
};
#endif

template <typename S>
typename S::V exp_nonpositive(typename S::V x) {
  x = S::max(x, S::set1(-87.f));
  const auto n = S::round(S::mul(x, S::set1(kLog2e)));
  auto r = S::fnmadd(n, S::set1(kLn2Hi), x);
  r = S::fnmadd(n, S::set1(kLn2Lo), r);
  auto p = S::set1(kP0);
  for (const float c : {kP1, kP2, kP3, kP4, kP5}) p = S::fmadd(p, r, S::set1(c));
  p = S::fmadd(S::mul(p, r), r, S::add(r, S::set1(1.f)));
  return S::mul(p, S::pow2(n));
}

// bias + row + sum_k x[k] w[k] at column j, w [num_x, n].
template <typename S>
typename S::V bias_rank_k(const float* row, const float* bias, int64_t n, const float* x, const float* w, int64_t num_x,
                          int64_t j) {
  auto v = S::add(S::load(row + j), S::load(bias + j));
  for (int64_t k = 0; k < num_x; ++k) v = S::fmadd(S::set1(x[k]), S::load(w + k * n + j), v);
  return v;
}

// add_bias_elu (below) on the whole vectors of row from column j on; the next column left.
template <typename S>
int64_t add_bias_elu_vectors(float* row, const float* bias, int64_t n, const float* x, const float* w, int64_t num_x,
                             int64_t j) {
  for (; j + S::kWidth <= n; j += S::kWidth) {
    const auto v = bias_rank_k<S>(row, bias, n, x, w, num_x, j);
    const auto e = S::sub(exp_nonpositive<S>(S::min(v, S::set1(0.f))), S::set1(1.f));
    S::store(row + j, S::max(e, v));
  }
  return j;
}

// add_bias_rank_k (below) on the whole vectors of row from column j on; the next column left.
template <typename S>
int64_t add_bias_rank_k_vectors(float* row, const float* bias, int64_t n, const float* x, const float* w, int64_t num_x,
                                int64_t j) {
  for (; j + S::kWidth <= n; j += S::kWidth) S::store(row + j, bias_rank_k<S>(row, bias, n, x, w, num_x, j));
  return j;
}

// row = ELU(row + bias + sum_k x[k] w[k]) = max(v, exp(min(v, 0)) - 1), in place, where w is
// [num_x, n] (a first layer's rows for a few inputs, the actions: a rank-num_x update in the same
// pass); a NaN stays NaN (max and min return their second operand when one is NaN).
inline void add_bias_elu(float* __restrict row, const float* __restrict bias, int64_t n, const float* __restrict x = nullptr,
                         const float* __restrict w = nullptr, int64_t num_x = 0) {
  int64_t j = 0;
#if defined(__AVX512F__)
  j = add_bias_elu_vectors<Avx512>(row, bias, n, x, w, num_x, j);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  j = add_bias_elu_vectors<Avx2>(row, bias, n, x, w, num_x, j);
#endif
  for (; j < n; ++j) {
    float v = row[j] + bias[j];
    for (int64_t k = 0; k < num_x; ++k) v += x[k] * w[k * n + j];
    const float e = exp_nonpositive(v < 0.f ? v : 0.f) - 1.f;
    row[j] = e > v ? e : v;
  }
}

// row += bias + sum_k x[k] w[k] (w [num_x, n]: a first layer's rows for a few inputs, the actions).
inline void add_bias_rank_k(float* __restrict row, const float* __restrict bias, int64_t n, const float* __restrict x,
                            const float* __restrict w, int64_t num_x) {
  int64_t j = 0;
#if defined(__AVX512F__)
  j = add_bias_rank_k_vectors<Avx512>(row, bias, n, x, w, num_x, j);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  j = add_bias_rank_k_vectors<Avx2>(row, bias, n, x, w, num_x, j);
#endif
  for (; j < n; ++j) {
    float v = row[j] + bias[j];
    for (int64_t k = 0; k < num_x; ++k) v += x[k] * w[k * n + j];
    row[j] = v;
  }
}

// tanh(x) = x P(x^2) / Q(x^2) for x clamped to [-c, c]; coefficients in ascending powers.
constexpr float kTanhClamp = 7.90531110763549805f;
constexpr float kTanhP[7] = {4.89352455891786e-03f,  6.37261928875436e-04f, 1.48572235717979e-05f, 5.12229709037114e-08f,
                             -8.60467152213735e-11f, 2.00018790482477e-13f, -2.76076847742355e-16f};
constexpr float kTanhQ[4] = {4.89352518554385e-03f, 2.26843463243900e-03f, 1.18534705686654e-04f, 1.19825839466702e-06f};

inline float rational_tanh(float x) {
  x = x < -kTanhClamp ? -kTanhClamp : (x > kTanhClamp ? kTanhClamp : x);  // a NaN passes through
  const float x2 = x * x;
  float p = kTanhP[6];
  for (int i = 5; i >= 0; --i) p = p * x2 + kTanhP[i];
  float q = kTanhQ[3];
  for (int i = 2; i >= 0; --i) q = q * x2 + kTanhQ[i];
  return x * p / q;
}

template <typename S>
typename S::V rational_tanh(typename S::V x) {
  // max/min return their second operand when one is NaN: the constant first keeps a NaN
  x = S::min(S::set1(kTanhClamp), S::max(S::set1(-kTanhClamp), x));
  const auto x2 = S::mul(x, x);
  auto p = S::set1(kTanhP[6]);
  for (int i = 5; i >= 0; --i) p = S::fmadd(p, x2, S::set1(kTanhP[i]));
  auto q = S::set1(kTanhQ[3]);
  for (int i = 2; i >= 0; --i) q = S::fmadd(q, x2, S::set1(kTanhQ[i]));
  return S::div(S::mul(x, p), q);
}

// out = tanh((x rstd + shift) weight + bias) on the whole vectors from column j on; the next column left.
template <typename S>
int64_t tanh_affine_vectors(const float* x, float rstd, float shift, const float* weight, const float* bias, float* out,
                            int64_t n, int64_t j) {
  const auto rstd_v = S::set1(rstd), shift_v = S::set1(shift);
  for (; j + S::kWidth <= n; j += S::kWidth) {
    const auto normalized = S::fmadd(S::load(x + j), rstd_v, shift_v);
    S::store(out + j, rational_tanh<S>(S::fmadd(normalized, S::load(weight + j), S::load(bias + j))));
  }
  return j;
}

#if defined(__AVX2__) && defined(__FMA__)
inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// out = tanh((x - mean) * rstd * weight + bias) for one row of n; out may be x.
inline void layer_norm_tanh_row(const float* x, const float* __restrict weight, const float* __restrict bias, float* out,
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
#if defined(__AVX512F__)
  j = tanh_affine_vectors<Avx512>(x, rstd, shift, weight, bias, out, n, j);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  j = tanh_affine_vectors<Avx2>(x, rstd, shift, weight, bias, out, n, j);
#endif
  for (; j < n; ++j) out[j] = rational_tanh((x[j] * rstd + shift) * weight[j] + bias[j]);
  if (mean_out != nullptr) {
    *mean_out = mean;
    *rstd_out = rstd;
  }
}

// The gradient through ELU from its output, as ATen's elu_backward (is_result): grad where out > 0,
// else grad (out + 1) (NaN for a NaN output), into grad_in; column_sum += grad_in.
inline void elu_backward_row(const float* __restrict grad, const float* __restrict out, float* __restrict grad_in,
                             float* __restrict column_sum, int64_t n) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
  for (; j + 8 <= n; j += 8) {
    const __m256 g = _mm256_loadu_ps(grad + j), o = _mm256_loadu_ps(out + j);
    const __m256 v = _mm256_blendv_ps(_mm256_mul_ps(g, _mm256_add_ps(o, one)), g, _mm256_cmp_ps(o, zero, _CMP_GT_OQ));
    _mm256_storeu_ps(grad_in + j, v);
    _mm256_storeu_ps(column_sum + j, _mm256_add_ps(_mm256_loadu_ps(column_sum + j), v));
  }
#endif
  for (; j < n; ++j) {
    const float v = out[j] > 0.f ? grad[j] : grad[j] * (out[j] + 1.f);
    grad_in[j] = v;
    column_sum[j] += v;
  }
}

// The gradients of out = tanh(y weight + bias), y = (x - mean) rstd, for one row of n, from out's:
// g_u = grad (1 - out^2), grad_x = rstd (g_u weight - mean(g_u weight) - y mean(g_u weight y)) (ATen's
// native_layer_norm_backward); weight_sum += g_u y and bias_sum += g_u (the parameters' gradients).
inline void layer_norm_tanh_backward_row(const float* __restrict grad, const float* __restrict x, const float* __restrict out,
                                         const float* __restrict weight, float mean, float rstd, float* __restrict grad_x,
                                         float* __restrict weight_sum, float* __restrict bias_sum, int64_t n) {
  int64_t j = 0;
  float sum_gy = 0.f, sum_gy_y = 0.f;
  const float shift = -mean * rstd;  // y = x rstd + shift
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 one = _mm256_set1_ps(1.f), rstd_v = _mm256_set1_ps(rstd), shift_v = _mm256_set1_ps(shift);
  __m256 acc_gy = _mm256_setzero_ps(), acc_gy_y = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 o = _mm256_loadu_ps(out + j);
    const __m256 g_u = _mm256_mul_ps(_mm256_loadu_ps(grad + j), _mm256_fnmadd_ps(o, o, one));
    const __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), rstd_v, shift_v);
    const __m256 g_y = _mm256_mul_ps(g_u, _mm256_loadu_ps(weight + j));
    acc_gy = _mm256_add_ps(acc_gy, g_y);
    acc_gy_y = _mm256_fmadd_ps(g_y, y, acc_gy_y);
    _mm256_storeu_ps(weight_sum + j, _mm256_fmadd_ps(g_u, y, _mm256_loadu_ps(weight_sum + j)));
    _mm256_storeu_ps(bias_sum + j, _mm256_add_ps(_mm256_loadu_ps(bias_sum + j), g_u));
  }
  sum_gy = horizontal_sum(acc_gy);
  sum_gy_y = horizontal_sum(acc_gy_y);
#endif
  for (int64_t k = j; k < n; ++k) {
    const float g_u = grad[k] * (1.f - out[k] * out[k]), y = x[k] * rstd + shift;
    sum_gy += g_u * weight[k];
    sum_gy_y += g_u * weight[k] * y;
    weight_sum[k] += g_u * y;
    bias_sum[k] += g_u;
  }
  const float mean_gy = sum_gy / static_cast<float>(n), mean_gy_y = sum_gy_y / static_cast<float>(n);
  j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 mean_gy_v = _mm256_set1_ps(mean_gy), mean_gy_y_v = _mm256_set1_ps(mean_gy_y);
  for (; j + 8 <= n; j += 8) {
    const __m256 o = _mm256_loadu_ps(out + j);
    const __m256 g_u = _mm256_mul_ps(_mm256_loadu_ps(grad + j), _mm256_fnmadd_ps(o, o, one));
    const __m256 y = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), rstd_v, shift_v);
    const __m256 centred = _mm256_fnmadd_ps(y, mean_gy_y_v, _mm256_fmsub_ps(g_u, _mm256_loadu_ps(weight + j), mean_gy_v));
    _mm256_storeu_ps(grad_x + j, _mm256_mul_ps(rstd_v, centred));
  }
#endif
  for (; j < n; ++j) {
    const float g_u = grad[j] * (1.f - out[j] * out[j]), y = x[j] * rstd + shift;
    grad_x[j] = rstd * (g_u * weight[j] - mean_gy - y * mean_gy_y);
  }
}

// sum_j x[j] y[j] (a one-output layer's row).
inline float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), acc);
  sum = horizontal_sum(acc);
#endif
  for (; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

}  // namespace sb3_tdmpc
