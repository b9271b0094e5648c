// Helpers the CUDA kernels share: vector packs for 16-byte accesses, the alignment test that picks
// the vector path, and the SM count that sizes the grids.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS / cuSPARSE / cuSOLVER / cuDSS
// headers that a bare nvcc toolkit (this project's CI) lacks. c10::cuda::getCurrentCUDAStream is
// the function at::cuda::getCurrentCUDAStream names.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace cmkernels {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
inline bool aligned_to(const void* p, int vec) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec) == 0;
}

inline int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// True where every pointer is aligned to vec elements of its own type.
template <int VEC, typename... T>
bool all_aligned(const T*... ptrs) {
  return (aligned_to<T>(ptrs, VEC) && ...);
}

}  // namespace cmkernels
