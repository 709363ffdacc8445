// Log-sum-exp over blocks of each row, for the sampler (block_logsumexp.cc).
#pragma once

#include <cstdint>

namespace das {

struct BlockLogsumexp {
  const float* x;        // [?, cols]
  const int64_t* index;  // [rows]: the rows of x to reduce, in order
  float* out;            // [rows, ceil(cols / block)]
  int64_t rows, cols, block;
  float scale;  // > 0
};

// out[i, b] = log sum_j exp(scale * x[index[i], j]) over the columns j of block b ([b * block,
// (b + 1) * block), the last block partial); -inf where all of them are -inf. The (row,
// block) pairs split over `threads` threads of the pool, each computed alone, so a value does
// not depend on the other rows. Needs cpu_supported(); the caller checks the shapes and the
// index's bounds.
void block_logsumexp(const BlockLogsumexp& a, int threads);

}  // namespace das
