// Shared helpers of the cmkernels C++/CUDA sources.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

// Dispatch the hot CPU loops to an AVX2/FMA clone where the processor has one (gcc/clang on x86-64);
// the default clone keeps the extension loadable on any x86-64 (and elsewhere it is a no-op).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__NVCC__)
#define CMK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CMK_CPU_CLONES
#endif

#define CMK_INLINE inline __attribute__((always_inline))

namespace cmkernels {

// True for the floating dtypes the kernels accept for activations.
inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Accumulation dtype: float64 stays float64, everything else computes in float32.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cmkernels
