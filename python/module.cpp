// The Python module cmkernels._C. Importing it loads this shared library, whose static initialisers
// register the cmkernels operators (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks). The module
// itself exposes how the extension was built: build_info(), with what only nvcc knows from
// csrc/cuda_info.cu and the CPU kernels' AVX2 selection from csrc/cpu_math.h.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "cpu_math.h"

namespace py = pybind11;

namespace cmkernels {
#if CMKERNELS_WITH_CUDA
// Defined in csrc/cuda_info.cu (compiled by nvcc, which knows the target architectures).
std::string cuda_arch_list();
int cuda_compiled_version();
int cuda_runtime_version();
#endif
}  // namespace cmkernels

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cmkernels compiled kernels (operators live in torch.ops.cmkernels)";
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["cuda_compiled"] = bool(CMKERNELS_WITH_CUDA);
        info["torch_built_against"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                                      std::to_string(TORCH_VERSION_MINOR) + "." +
                                      std::to_string(TORCH_VERSION_PATCH);
#if CMKERNELS_WITH_CUDA
        int v = cmkernels::cuda_compiled_version();
        info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
        info["cuda_archs"] = cmkernels::cuda_arch_list();
        int rt = cmkernels::cuda_runtime_version();
        info["cuda_runtime_version"] =
            rt > 0 ? py::object(py::str(std::to_string(rt / 1000) + "." +
                                        std::to_string((rt % 1000) / 10)))
                   : py::object(py::none());
#else
        info["cuda_version"] = py::none();
        info["cuda_archs"] = "";
        info["cuda_runtime_version"] = py::none();
#endif
        info["cpu_avx2_kernels"] = cmkernels::cpu_has_avx2();  // the CPU kernels' variant here
#if defined(_OPENMP)
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
      },
      "How the extension was built: CUDA compiled or not, CUDA version, architectures, torch, "
      "OpenMP, and whether the CPU kernels run their AVX2 variants here.");
}
