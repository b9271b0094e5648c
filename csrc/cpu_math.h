// CPU math the C++ kernels share: run-time AVX2 selection (CMK_DISPATCHED compiles a hot loop for
// baseline x86-64 and for x86-64-v3 and picks one at run time, so one build runs everywhere and
// fast where it can; cpu_has_avx2() says which, build_info() reports it), and the exp / sigmoid /
// SiLU that vectorise (no libm calls in the loops; -fno-trapping-math lets gcc turn the selects
// into blends), scalar and AVX2 (silu8). Host code only: not for nvcc.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "common.h"

// Hot CPU loops are compiled twice: for baseline x86-64 and for x86-64-v3 (AVX2 + FMA), picked at
// run time by cpu_has_avx2(), so one build runs everywhere and fast where it can.
//   CMK_DISPATCHED(name, (params), (args), body-calling-a-template)
// defines name_avx2, name_base and name, which forwards to the best one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__NVCC__)
#define CMK_HAVE_AVX2_PATH 1
#define CMK_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define CMK_HAVE_AVX2_PATH 0
#define CMK_TARGET_AVX2
#endif

// Alternative for simple leaf functions: let gcc emit both variants and an ifunc resolver.
#if CMK_HAVE_AVX2_PATH && !defined(__clang__)
#define CMK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CMK_CPU_CLONES
#endif

#if CMK_HAVE_AVX2_PATH
#include <immintrin.h>
#endif

namespace cmkernels {

// CMKERNELS_NO_AVX2=1 forces the baseline code (what CPUs without AVX2 run), for tests.
inline bool cpu_has_avx2() {
#if CMK_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("CMKERNELS_NO_AVX2") == nullptr;
  return has;
#else
  return false;
#endif
}

#define CMK_DISPATCHED(name, params, args, body)                      \
  CMK_TARGET_AVX2 static void name##_avx2 params { body; }             \
  static void name##_base params { body; }                             \
  static inline void name params {                                     \
    if (cpu_has_avx2()) name##_avx2 args; else name##_base args;       \
  }

// exp(z) = 2^n e^r: Cody-Waite range reduction (n = round(z / ln2), r = z - n ln2 in two parts)
// and e^r = 1 + r + r^2 p(r), p(r) = c0 + c1 r + ... + c5 r^5 (a few ulp). Shared by the scalar
// and the AVX2 code below.
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpC0 = 5.0000001201e-1f, kExpC1 = 1.6666665459e-1f, kExpC2 = 4.1665795894e-2f,
                kExpC3 = 8.3334519073e-3f, kExpC4 = 1.3981999507e-3f, kExpC5 = 1.9875691500e-4f;

// exp(z) for z in [-87, 0].
CMK_INLINE float exp_nonpositive(float z) {
  // Round z / ln2 to the nearest integer with the 1.5 * 2^23 trick (no floor(), vectorises on SSE2).
  const float n = (z * kLog2e + 12582912.0f) - 12582912.0f;
  float r = z - n * kLn2Hi;
  r = r - n * kLn2Lo;
  // p(r) by Estrin's scheme (pairs, then powers of r^2): a shorter dependency chain than Horner's,
  // ~6% faster on AVX2 where the loop is latency-bound.
  const float r2 = r * r;
  const float p01 = kExpC1 * r + kExpC0;
  const float p23 = kExpC3 * r + kExpC2;
  const float p45 = kExpC5 * r + kExpC4;
  const float p = p01 + r2 * (p23 + r2 * p45);
  const float e = p * r2 + (r + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  return e * std::bit_cast<float>(bits);
}

// sigmoid(a) from t = exp(-|a|) <= 1, which cannot overflow: s = 1 / (1 + t) for a >= 0 and t s
// below. |a| is clamped to 87 on its bit pattern (an integer min, cheaper than float compares
// with NaN semantics); a NaN input still yields NaN through the caller's a * sigmoid(a).
CMK_INLINE float sigmoid(float a) {
  const int32_t abits = std::bit_cast<int32_t>(a) & 0x7fffffff;
  const float m = std::bit_cast<float>(abits < 0x42ae0000 ? abits : 0x42ae0000);  // min(|a|, 87)
  const float t = exp_nonpositive(-m);
  const float s = 1.0f / (1.0f + t);
  return a >= 0.0f ? s : t * s;
}
CMK_INLINE double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }

// silu(a) = a / (1 + exp(-a)), written as (a >= 0 ? a : a t) / (1 + t) with the same t: one
// division and no separate multiply by sigmoid. The forward's fp32 AVX2 path uses silu8 below;
// this serves the baseline build, the other dtypes and the loop tails.
CMK_INLINE float silu(float a) {
  const int32_t abits = std::bit_cast<int32_t>(a) & 0x7fffffff;
  const float m = std::bit_cast<float>(abits < 0x42ae0000 ? abits : 0x42ae0000);  // min(|a|, 87)
  const float t = exp_nonpositive(-m);
  return (a >= 0.0f ? a : a * t) / (1.0f + t);
}
CMK_INLINE double silu(double a) { return a * sigmoid(a); }

#if CMK_HAVE_AVX2_PATH
// t = exp(-a) for 8 floats, -a clamped to [-86, 86]: the exponential of silu8 (and of the JVP
// kernel's silu_jvp8, which must match silu8 to the bit).
CMK_TARGET_AVX2 CMK_INLINE __m256 exp_neg8(__m256 a) {
  const __m256 z = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), a),
                                               _mm256_set1_ps(-86.0f)),
                                 _mm256_set1_ps(86.0f));  // a NaN becomes -86 here; a / ... stays NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(z, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), z);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 p01 = _mm256_fmadd_ps(_mm256_set1_ps(kExpC1), r, _mm256_set1_ps(kExpC0));
  const __m256 p23 = _mm256_fmadd_ps(_mm256_set1_ps(kExpC3), r, _mm256_set1_ps(kExpC2));
  const __m256 p45 = _mm256_fmadd_ps(_mm256_set1_ps(kExpC5), r, _mm256_set1_ps(kExpC4));
  const __m256 p = _mm256_fmadd_ps(r2, _mm256_fmadd_ps(r2, p45, p23), p01);
  const __m256 e = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(e), scale));
}

// The forward's SiLU pass in AVX2 intrinsics, where the compiler's vectorisation of silu() above
// costs ~15% more: silu(a) = a / (1 + exp(-a)) with -a clamped to [-86, 86], so exp(-a) needs no
// sign select (it may be large; a / (1 + t) still tends to 0 correctly) and e * 2^n is an integer
// add on the exponent field (n in [-124, 124] keeps the result normal). The constants of
// exp_nonpositive; max relative error ~2e-7 against float64.
CMK_TARGET_AVX2 CMK_INLINE __m256 silu8(__m256 a) {
  const __m256 t = exp_neg8(a);
  return _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), t));
}

#endif  // CMK_HAVE_AVX2_PATH

}  // namespace cmkernels
