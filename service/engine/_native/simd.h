// What the engine's CPU kernels share of x86-64 SIMD: the platform test, the target attributes
// of the AVX2 and FMA code and of the AVX-512 code (compiled for them alone, so the module loads
// on any x86-64 CPU; the kernels run only where cpu_supported(), the AVX-512 ones only where
// cpu_has_avx512()), and the horizontal sum.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DAS_X86 1
#define DAS_AVX2 __attribute__((target("avx2,fma")))
#define DAS_AVX512 __attribute__((target("avx512f")))

namespace das {

// The sum of v's 8 lanes, in a fixed order.
DAS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace das
#else
#define DAS_X86 0
#endif
