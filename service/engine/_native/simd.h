// What the engine's CPU kernels share of x86-64 SIMD: the platform test, the target attributes
// of the AVX2 and FMA code and of the AVX-512 code (compiled for them alone, so the module loads
// on any x86-64 CPU; the kernels run only where cpu_supported(), the AVX-512 ones only where
// cpu_has_avx512()), a vectorised exp and the horizontal sum.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DAS_X86 1
#define DAS_AVX2 __attribute__((target("avx2,fma")))
#define DAS_AVX512 __attribute__((target("avx512f")))

namespace das {

// exp(x) for x <= 0 (a value minus its row's or block's max), relative error about 1e-7.
DAS_AVX2 inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // exp(-87) is still a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 in two parts so that n * (high part) is exact.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  for (float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i two_n =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

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
