// Attention for a ragged batch of decode and verify chunks in one call (ragged_attention.cc).
#pragma once

#include <cstdint>

namespace das {

struct RaggedAttention {
  const float* q;  // [tokens, heads, dim]
  const float* k;  // [slots, kv_heads, max_len, dim]: one layer's key cache
  const float* v;  // the same for values
  float* out;      // [tokens, heads, dim]
  int64_t heads, kv_heads, dim, slots, max_len;
  // Chunk c is row c of [chunks, 4]: (offset, slot, start, size). Its tokens are rows
  // [offset, offset + size) of q and out, cached at positions [start, start + size) of slot;
  // its token i attends positions 0..start + i of that slot.
  const int64_t* chunks;
  int64_t num_chunks;
  float scale;
};

// The head dims the kernel is compiled for (16, 32, 64, 96, 128).
bool attention_supports_dim(int64_t dim);

// out = softmax(scale * q . K^T) . V per token and head over its visible positions, query
// head h reading kv head h / (heads / kv_heads); the (chunk, kv head) pairs split over
// `threads` threads of the pool. Needs cpu_supported() and attention_supports_dim(dim);
// the caller checks the shapes and the chunks' bounds.
void ragged_attention(const RaggedAttention& a, int threads);

}  // namespace das
