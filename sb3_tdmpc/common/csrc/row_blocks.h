// Each thread's own blocks of rows, shared by the fused CPU kernels that split work by rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstdint>

namespace sb3_tdmpc {

// fn(start, n) for blocks of at most max_block_rows rows, as many blocks per thread (so that the threads
// finish together), each thread running its own inside one parallel region: MKL's GEMM there runs
// single-threaded, and no autograd (worker threads start without the caller's dispatch state).
template <typename Fn>
void for_each_row_block(int64_t rows, int64_t max_block_rows, const Fn& fn) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = std::max<int64_t>(1, (rows + threads * max_block_rows - 1) / (threads * max_block_rows));
  const int64_t num_blocks = threads * per_thread, block_rows = (rows + num_blocks - 1) / num_blocks;
  at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = block * block_rows, n = std::min(rows, start + block_rows) - start;
      if (n > 0) fn(start, n);
    }
  });
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
