// Each thread's own blocks of rows, shared by the fused CPU kernels that split work by rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sb3_tdmpc {

// Each thread's share of the rows follows its measured speed. On a shared machine one core can run
// markedly slower than the other for seconds at a time (the host's other load; docs/performance.md),
// and with equal shares every call waits for the slower one. The speeds (rows per second, relative to
// the threads' mean) measure the cores, not the work, so all the kernels share them: each call over
// enough rows updates them, and the next call splits its rows by them. Each balanced share is at least
// kMinBalancedRows rows, so every row still goes through a GEMM of many rows, whose rows do not depend
// on how the others are split (MKL gives a row the same bits in any block of two rows or more), and
// the results do not depend on the timing (checked by tests/test_equivalence.py).
constexpr int64_t kMaxBalancedThreads = 64;
constexpr int64_t kMinBalancedRows = 32;
inline std::atomic<float> thread_speed[kMaxBalancedThreads];  // 0: not measured yet
inline std::atomic<bool> balance_thread_shares{true};

// Whether `rows` are enough for kMinBalancedRows per share: speeds clamped to [0.5, 1.5] of their mean
// give a thread at least 1 / (3 threads) of the rows.
inline bool balanceable(int64_t rows, int64_t threads) {
  return threads >= 2 && threads <= kMaxBalancedThreads && rows >= 3 * threads * kMinBalancedRows;
}

// The first row of each thread's share ([threads + 1]) in proportion to the measured speeds, when
// balancing, balanceable and measured; else none.
inline std::vector<int64_t> balanced_shares(int64_t rows, int64_t threads) {
  if (!balance_thread_shares.load(std::memory_order_relaxed) || !balanceable(rows, threads)) return {};
  std::vector<double> cumulative(threads + 1, 0.0);
  for (int64_t t = 0; t < threads; ++t) {
    const float speed = thread_speed[t].load(std::memory_order_relaxed);
    if (speed <= 0.f) return {};
    cumulative[t + 1] = cumulative[t] + speed;
  }
  std::vector<int64_t> first_row(threads + 1, rows);
  for (int64_t t = 0; t < threads; ++t) first_row[t] = std::llround(rows * cumulative[t] / cumulative[threads]);
  return first_row;
}

// Blends each thread's speed over its share (rows per second, relative to the mean and clamped to
// [0.5, 1.5]) into thread_speed.
inline void measure_thread_speeds(const std::vector<int64_t>& first_row, const std::vector<double>& seconds) {
  const int64_t threads = static_cast<int64_t>(seconds.size());
  std::vector<double> speed(threads);
  double mean = 0.0;
  for (int64_t t = 0; t < threads; ++t) {
    if (seconds[t] <= 0.0) return;
    speed[t] = (first_row[t + 1] - first_row[t]) / seconds[t];
    mean += speed[t] / threads;
  }
  for (int64_t t = 0; t < threads; ++t) {
    const double measured = std::clamp(speed[t] / mean, 0.5, 1.5);
    const float previous = thread_speed[t].load(std::memory_order_relaxed);
    thread_speed[t].store(static_cast<float>(previous > 0.f ? 0.5 * (previous + measured) : measured),
                          std::memory_order_relaxed);
  }
}

// fn(start, n) for blocks of rows, each thread running its own inside one parallel region: MKL's GEMM
// there runs single-threaded, and no autograd (worker threads start without the caller's dispatch
// state). Each thread takes a contiguous share of the rows (equal, or by the measured speeds above), in
// as many blocks as an equal share of at most max_block_rows rows would need.
template <typename Fn>
void for_each_row_block(int64_t rows, int64_t max_block_rows, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = std::max<int64_t>(1, (rows + threads * max_block_rows - 1) / (threads * max_block_rows));
  const int64_t equal_block_rows = (rows + threads * per_thread - 1) / (threads * per_thread);
  std::vector<int64_t> first_row = balanced_shares(rows, threads);
  const bool balanced = !first_row.empty();
  if (!balanced) {  // equal shares of equal blocks (the last ones shorter)
    first_row.resize(threads + 1);
    for (int64_t t = 0; t <= threads; ++t) first_row[t] = std::min(rows, t * per_thread * equal_block_rows);
  }
  std::vector<double> seconds(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = first; t < last; ++t) {
      const auto begin = std::chrono::steady_clock::now();
      const int64_t start = first_row[t], share = first_row[t + 1] - start;
      const int64_t block_rows = balanced ? (share + per_thread - 1) / per_thread : equal_block_rows;
      for (int64_t offset = 0; offset < share; offset += block_rows) fn(start + offset, std::min(block_rows, share - offset));
      seconds[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
    }
  });
  if (balanceable(rows, threads)) measure_thread_speeds(first_row, seconds);
}

// Column sums over all rows, [count, width] (e.g. a bias's gradient): fn(first, last, sums) adds rows
// [first, last) into its thread's own zeroed [count, width] block; the blocks are summed at the end.
template <typename Fn>
at::Tensor per_thread_column_sums(int64_t rows, int64_t count, int64_t width, const at::TensorOptions& options,
                                  const Fn& fn) {
  auto partial = at::zeros({at::get_num_threads(), count, width}, options);
  float* sums = partial.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) { fn(first, last, sums + at::get_thread_num() * count * width); });
  return partial.sum(0);
}

}  // namespace sb3_tdmpc
