// Attention of a ragged batch (service.engine._kernels.attention): every chunk of a decode or
// verify step (its last token, or its last token and its draft) against its own slot's cache,
// in one call per layer.
//
// Torch's scaled_dot_product_attention takes rectangles: chunks of one width share a padded
// call over a span of slots, and a chunk of a width that few others share attends alone, one
// call per chunk and layer. A verify step where a quarter of the rows carry a draft then made
// hundreds of calls (measured on SmolLM2, 32 rows with 8 drafting 2 tokens: 270 attention
// calls per forward, +48 ms of a 205 ms step). Here each (chunk, kv head) pair is one task:
// its query heads' scores against the keys it sees, a softmax, then the values, with the keys
// and values read from memory once per task and no padding.
//
// Per query: scores s_j = scale * q . k_j for the visible j, m = max s_j, p_j = exp(s_j - m)
// (a vectorised exp: range reduction to |r| <= ln2 / 2 and the series to r^7), out =
// sum_j p_j v_j / sum_j p_j. The same AVX2 and FMA requirement as small_gemm.cc.
#include "ragged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <stdexcept>
#include <vector>

#include "pool.h"
#include "simd.h"

namespace das {

bool attention_supports_dim(int64_t dim) {
  return dim == 16 || dim == 32 || dim == 64 || dim == 96 || dim == 128;
}

#if DAS_X86
namespace {

// The four sums of a, b, c, d's lanes.
DAS_AVX2 inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// One query vector of D = 8 * kLanes floats against keys [0, n) and values [0, n).
// `scores` has room for n rounded up to 8.
template <int kLanes>
DAS_AVX2 void attend_one(const float* q, const float* k, const float* v, float* out, int64_t n,
                         float scale, float* scores) {
  constexpr int64_t D = 8 * kLanes;
  __m256 qv[kLanes];
  const __m256 scale_v = _mm256_set1_ps(scale);
  for (int l = 0; l < kLanes; ++l) qv[l] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * l), scale_v);
  // Scores, four keys at a time.
  float m = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  __m128 max4 = _mm_set1_ps(m);
  for (; j + 4 <= n; j += 4) {
    const float* kj = k + j * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int l = 0; l < kLanes; ++l) {
      a0 = _mm256_fmadd_ps(qv[l], _mm256_loadu_ps(kj + 8 * l), a0);
      a1 = _mm256_fmadd_ps(qv[l], _mm256_loadu_ps(kj + D + 8 * l), a1);
      a2 = _mm256_fmadd_ps(qv[l], _mm256_loadu_ps(kj + 2 * D + 8 * l), a2);
      a3 = _mm256_fmadd_ps(qv[l], _mm256_loadu_ps(kj + 3 * D + 8 * l), a3);
    }
    const __m128 s = sum4(a0, a1, a2, a3);
    _mm_storeu_ps(scores + j, s);
    max4 = _mm_max_ps(max4, s);
  }
  for (int i = 0; i < 4; ++i) m = std::max(m, max4[i]);
  for (; j < n; ++j) {
    __m256 a = _mm256_setzero_ps();
    for (int l = 0; l < kLanes; ++l)
      a = _mm256_fmadd_ps(qv[l], _mm256_loadu_ps(k + j * D + 8 * l), a);
    scores[j] = hsum(a);
    m = std::max(m, scores[j]);
  }
  // Weights p_j = exp(s_j - m), eight at a time, then the last n % 8.
  const __m256 mv = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mv));
    _mm256_storeu_ps(scores + j, p);
    total = _mm256_add_ps(total, p);
  }
  float sum = hsum(total);
  if (j < n) {
    alignas(32) float tail[8];
    std::fill(tail, tail + 8, m);  // the unused lanes weigh exp(0), and are never read
    std::copy(scores + j, scores + n, tail);
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(tail), mv));
    _mm256_store_ps(tail, p);
    for (int64_t i = j; i < n; ++i) {
      scores[i] = tail[i - j];
      sum += tail[i - j];
    }
  }
  // Values.
  __m256 acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = _mm256_setzero_ps();
  for (j = 0; j < n; ++j) {
    const __m256 p = _mm256_set1_ps(scores[j]);
    const float* vj = v + j * D;
    for (int l = 0; l < kLanes; ++l)
      acc[l] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * l), acc[l]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int l = 0; l < kLanes; ++l) _mm256_storeu_ps(out + 8 * l, _mm256_mul_ps(acc[l], inv));
}

// Tasks [t0, t1): task t is chunk t / kv_heads with kv head t % kv_heads.
template <int kLanes>
DAS_AVX2 void run_tasks(const RaggedAttention& a, int64_t t0, int64_t t1) {
  thread_local std::vector<float> scores;
  scores.resize(size_t(a.max_len) + 8);
  const int64_t D = a.dim, group = a.heads / a.kv_heads;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t* chunk = a.chunks + 4 * (t / a.kv_heads);
    const int64_t g = t % a.kv_heads, offset = chunk[0], slot = chunk[1], start = chunk[2];
    const int64_t size = chunk[3];
    const size_t cache = size_t((slot * a.kv_heads + g) * a.max_len * D);
    for (int64_t i = 0; i < size; ++i) {
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const size_t row = size_t(((offset + i) * a.heads + h) * D);
        attend_one<kLanes>(a.q + row, a.k + cache, a.v + cache, a.out + row, start + i + 1,
                           a.scale, scores.data());
      }
    }
  }
}

}  // namespace

void ragged_attention(const RaggedAttention& a, int threads) {
  const int64_t tasks = a.num_chunks * a.kv_heads;
  if (tasks == 0) return;
  // Contiguous task ranges of about equal work (query-key pairs).
  std::vector<int64_t> cost(size_t(tasks) + 1, 0);
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t* chunk = a.chunks + 4 * (t / a.kv_heads);
    cost[size_t(t) + 1] = cost[size_t(t)] + chunk[3] * (chunk[2] + chunk[3]);
  }
  const int parts = int(std::clamp<int64_t>(tasks, 1, std::max(threads, 1)));
  auto bound = [&](int part) {
    const int64_t target = cost.back() * part / parts;
    return int64_t(std::lower_bound(cost.begin(), cost.end(), target) - cost.begin());
  };
  auto run = [&](auto tasks) {
    pool().run(parts, [&](int part) { tasks(a, bound(part), bound(part + 1)); });
  };
  switch (a.dim) {  // the dims of attention_supports_dim
    case 16: run(run_tasks<2>); break;
    case 32: run(run_tasks<4>); break;
    case 64: run(run_tasks<8>); break;
    case 96: run(run_tasks<12>); break;
    default: run(run_tasks<16>); break;
  }
}
#else
void ragged_attention(const RaggedAttention&, int) { throw std::runtime_error("needs x86-64"); }
#endif

}  // namespace das
