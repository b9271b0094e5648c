// Build facts only nvcc knows: the compiled architectures and the CUDA toolkit version.
#include <cuda_runtime_api.h>

#include <string>

namespace cmkernels {

std::string cuda_arch_list() {
#if defined(__CUDA_ARCH_LIST__)
  // nvcc defines __CUDA_ARCH_LIST__ as e.g. 800,900 (one entry per -gencode target).
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  std::string out;
  for (int a : archs) {
    if (!out.empty()) out += ";";
    out += std::to_string(a / 100) + "." + std::to_string((a % 100) / 10);
  }
  return out;
#else
  return "unknown";
#endif
}

int cuda_compiled_version() { return CUDART_VERSION; }

// The driver-facing runtime version, or 0 where no CUDA driver is present (CPU-only machines).
int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace cmkernels
