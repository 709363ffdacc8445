// y = x @ w.T for a few rows of x (service.engine._kernels.linear).
//
// A decode or verify step multiplies every weight matrix by a handful of token rows. MKL's
// sgemm packs the weights for every call, which at 2 to 64 rows costs more than the multiply:
// on this project's 2-core CPU, SmolLM2's weights times 9 rows took about 140 ms, 2.5x the
// 1-row gemv. Here the weights stream from memory once per call, each weight row meeting all
// of x's rows while it is in registers, so a few rows cost little more than one.
//
// Two kernels of the same shape: AVX2 (8 lanes, two weight rows at a time) and AVX-512 (16
// lanes, four weight rows at a time, prefetching ahead), the wider where the CPU has it. On an
// Intel Xeon with AVX-512 here, SmolLM2's weights times 8 rows took 40.6 ms in the AVX2 kernel,
// 40.1 in MKL and 33.3 in the AVX-512 one.
// In either kernel each y[m, n] is one FMA chain over k in order, then the same horizontal
// sum, whatever M is and wherever row m sits: a row's result does not depend on its batch
// companions (the two kernels differ from each other in rounding).
//
// The kernels need AVX2 and FMA (AVX-512F for the wide one); only they are compiled for them
// (target attributes), so the module loads on any x86-64 CPU and available() tells Python
// whether to call them. Elsewhere available() is false and the runner uses torch.
#include "small_gemm.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iterator>
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

// How far ahead in each weight row the AVX-512 tiles prefetch. Without it SmolLM2's weights
// times 4 rows took 31.4 ms here; 512 bytes ahead 25.8-27.4, 1024 27.1, 2048 27.1.
constexpr int64_t kPrefetchBytes = 512;

// Rows [0, MB) of x against NB weight rows from n, 16 lanes: MB * NB accumulators stay in
// registers and each weight vector is loaded once for all MB rows. K is a multiple of 8: a last
// half vector is loaded masked (zeros past K), the same for every output.
template <int MB, int NB>
DAS_AVX512 void block_wide(const Problem& p, const float* x, float* y, int64_t n) {
  const int64_t K = p.K;
  const float* w = p.w + n * K;
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 lanes = K - k >= 16 ? 0xFFFF : 0x00FF;
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + kPrefetchBytes,
                   _MM_HINT_T0);
      wv[j] = _mm512_maskz_loadu_ps(lanes, w + j * K + k);
    }
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + m * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) y[m * p.N + n + j] = _mm512_reduce_add_ps(acc[m][j]);
}

template <int MB>
DAS_AVX512 void tile_wide(const Problem& p, const float* x, float* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) block_wide<MB, 4>(p, x, y, n);
  for (; n < n1; ++n) block_wide<MB, 1>(p, x, y, n);
}

// A tile: rows [0, MB) of x against weight rows [n0, n1).
using Tile = void (*)(const Problem&, const float*, float*, int64_t, int64_t);
// Each kernel's tiles by rows of x (index 0 unused), the last its group size: AVX2 4 rows at a
// time; AVX-512 6 (24 accumulators; its first version, 4 rows at a time without the prefetch,
// took 37.1 ms at 6 rows and 45.7 at 12 where this one takes 28.5 and 38.7).
constexpr Tile kTiles[] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>};
constexpr Tile kWideTiles[] = {nullptr,       tile_wide<1>, tile_wide<2>, tile_wide<3>,
                               tile_wide<4>, tile_wide<5>, tile_wide<6>};

// Weight rows [n0, n1) for all of x's rows: blocks of 32 weight rows (at most 32 * K floats,
// which stay in L2 while every group of rows of x passes over them).
void run_range(const Problem& p, int64_t n0, int64_t n1, bool wide) {
  constexpr int64_t kBlock = 32;
  const Tile* tiles = wide ? kWideTiles : kTiles;
  const int64_t group = wide ? std::size(kWideTiles) - 1 : std::size(kTiles) - 1;
  for (int64_t nb = n0; nb < n1; nb += kBlock) {
    const int64_t ne = std::min(nb + kBlock, n1);
    int64_t m = 0;
    for (; m + group <= p.M; m += group) tiles[group](p, p.x + m * p.K, p.y + m * p.N, nb, ne);
    if (m < p.M) tiles[p.M - m](p, p.x + m * p.K, p.y + m * p.N, nb, ne);
  }
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_has_avx512() { return cpu_supported() && __builtin_cpu_supports("avx512f"); }
#else
void run_range(const Problem&, int64_t, int64_t, bool) { throw std::runtime_error("needs x86-64"); }
bool cpu_supported() { return false; }
bool cpu_has_avx512() { return false; }
#endif

void small_gemm(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                int threads, bool wide) {
  if (M == 0 || N == 0) return;
  const Problem p{x, w, y, M, K, N};
  // A slice of fewer than 64 weight rows is not worth a helper.
  const int parts = int(std::clamp<int64_t>(N / 64, 1, std::min(threads, 64)));
  // Slices of whole groups of `step` weight rows (the tile's), so the split does not change
  // any output's arithmetic.
  const int64_t step = wide ? 4 : 2, groups = (N + step - 1) / step;
  auto bound = [&](int i) { return std::min(N, step * (groups * i / parts)); };
  pool().run(parts, [&](int part) { run_range(p, bound(part), bound(part + 1), wide); });
}

}  // namespace das
