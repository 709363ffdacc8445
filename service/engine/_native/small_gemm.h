// The engine's small-batch matmul (small_gemm.cc).
#pragma once

#include <cstdint>

namespace das {

// True where this CPU runs the engine's kernels (x86-64 with AVX2 and FMA).
bool cpu_supported();

// True where the AVX-512 kernel can run too (AVX-512F besides AVX2 and FMA).
bool cpu_has_avx512();

// y = x @ w.T for float32 row-major x [M, K], w [N, K], y [M, N]; K % 8 == 0; the weight rows
// split over `threads` threads of the pool. `wide`: the AVX-512 kernel (needs
// cpu_has_avx512()), else the AVX2 one (needs cpu_supported()).
void small_gemm(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N,
                int threads, bool wide);

}  // namespace das
