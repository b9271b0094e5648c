// Helpers every cmkernels C++/CUDA source shares: the accepted dtypes and the accumulation dtype,
// the layout rule of the outputs, dtype dispatch, and how argument errors print dtypes (as Python
// does: float32, not Float), so that an error reads the same from the C++ kernels as from the
// Python checks (cmkernels/ops/common.py). Shapes and strides print as [2, 8, 4, 4] through
// IntArrayRef in both.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#define CMK_INLINE inline __attribute__((always_inline))

namespace cmkernels {

// True for the floating dtypes the kernels accept for activations.
inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Accumulation dtype: float64 stays float64, everything else computes in float32. Also the dtype
// of the statistics an op returns.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A dtype's name as torch prints it in Python, without the "torch." prefix.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

// The memory format of an op's outputs (the rule of kept_layout in cmkernels/ops/common.py):
// contiguous where x is; else x's own where it is channels_last (4-d) or, if allowed,
// channels_last_3d (5-d); else contiguous (x is copied to it). In all of them the batch dimension
// is outermost.
inline at::MemoryFormat kept_layout(const at::Tensor& x, bool channels_last_3d = true) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (channels_last_3d && x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// Compile-time dtype dispatch: calls f(TypeTag<T>{}) for the C++ type of a floating dtype.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void visit_float_dtype(at::ScalarType s, const char* op, F&& f) {
  switch (s) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kHalf: f(TypeTag<at::Half>{}); break;
    case at::kBFloat16: f(TypeTag<at::BFloat16>{}); break;
    case at::kDouble: f(TypeTag<double>{}); break;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", dtype_name(s));
  }
}

}  // namespace cmkernels
