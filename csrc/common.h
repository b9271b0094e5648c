// Shared helpers of the cmkernels C++/CUDA sources.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>

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

#define CMK_INLINE inline __attribute__((always_inline))

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

// True for the floating dtypes the kernels accept for activations.
inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Accumulation dtype: float64 stays float64, everything else computes in float32.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cmkernels
