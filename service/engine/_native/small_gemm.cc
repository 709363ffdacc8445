// y = x @ w.T for a few rows of x (service.engine._kernels.linear).
//
// A decode or verify step multiplies every weight matrix by a handful of token rows. MKL's
// sgemm packs the weights for every call, which at 2 to 64 rows costs more than the multiply:
// on this project's 2-core CPU, SmolLM2's weights times 9 rows took about 140 ms, 2.5x the
// 1-row gemv. Here the weights stream from memory once per call, each weight row meeting all
// of x's rows while it is in registers, so a few rows cost little more than one.
//
// Each y[m, n] is one 8-lane FMA chain over k in order, then the same horizontal sum, whatever
// M is and wherever row m sits: a row's result does not depend on its batch companions.
//
// The kernel needs AVX2 and FMA; only it is compiled for them (target attributes), so the
// module loads on any x86-64 CPU and available() tells Python whether to call it. Elsewhere
// available() is false and the runner uses torch.
#include "small_gemm.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>

#include "pool.h"
#include "simd.h"

namespace das {

struct Problem {
  const float* x;  // [M, K]
  const float* w;  // [N, K]
  float* y;        // [M, N]
  int64_t M, K, N;
};

#if DAS_X86
// Rows [0, MB) of x against weight rows [n0, n1), two weight rows at a time: 2 * MB
// accumulators stay in registers and each weight vector is loaded once for all MB rows.
// K is a multiple of 8 (checked by the caller).
template <int MB>
DAS_AVX2 void tile(const Problem& p, const float* x, float* y, int64_t n0, int64_t n1) {
  const int64_t K = p.K;
  int64_t n = n0;
  for (; n + 1 < n1; n += 2) {
    const float* w0 = p.w + n * K;
    const float* w1 = w0 + K;
    __m256 a[MB], b[MB];
    for (int m = 0; m < MB; ++m) a[m] = b[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 u = _mm256_loadu_ps(w0 + k), v = _mm256_loadu_ps(w1 + k);
      for (int m = 0; m < MB; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k);
        a[m] = _mm256_fmadd_ps(xv, u, a[m]);
        b[m] = _mm256_fmadd_ps(xv, v, b[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      y[m * p.N + n] = hsum(a[m]);
      y[m * p.N + n + 1] = hsum(b[m]);
    }
  }
  if (n < n1) {  // an odd last weight row: the same chain per output
    const float* w0 = p.w + n * K;
    __m256 a[MB];
    for (int m = 0; m < MB; ++m) a[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 u = _mm256_loadu_ps(w0 + k);
      for (int m = 0; m < MB; ++m) a[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), u, a[m]);
    }
    for (int m = 0; m < MB; ++m) y[m * p.N + n] = hsum(a[m]);
  }
}

// Weight rows [n0, n1) for all of x's rows: blocks of 32 weight rows (at most 32 * K floats,
// which stay in L2 while every group of 4 rows of x passes over them).
DAS_AVX2 void run_range(const Problem& p, int64_t n0, int64_t n1) {
  constexpr int64_t kBlock = 32;
  for (int64_t nb = n0; nb < n1; nb += kBlock) {
    const int64_t ne = std::min(nb + kBlock, n1);
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) tile<4>(p, p.x + m * p.K, p.y + m * p.N, nb, ne);
    const float* x = p.x + m * p.K;
    float* y = p.y + m * p.N;
    switch (p.M - m) {
      case 3: tile<3>(p, x, y, nb, ne); break;
      case 2: tile<2>(p, x, y, nb, ne); break;
      case 1: tile<1>(p, x, y, nb, ne); break;
      default: break;
    }
  }
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
void run_range(const Problem&, int64_t, int64_t) { throw std::runtime_error("needs x86-64"); }
bool cpu_supported() { return false; }
#endif

void small_gemm(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                int threads) {
  if (M == 0 || N == 0) return;
  const Problem p{x, w, y, M, K, N};
  // A slice of fewer than 64 weight rows is not worth a helper.
  const int parts = int(std::clamp<int64_t>(N / 64, 1, std::min(threads, 64)));
  // Slices of whole weight-row pairs, so the split does not change any output's arithmetic.
  const int64_t pairs = (N + 1) / 2;
  auto bound = [&](int i) { return std::min(N, 2 * (pairs * i / parts)); };
  pool().run(parts, [&](int part) { run_range(p, bound(part), bound(part + 1)); });
}

}  // namespace das
