// Argument checks and layout rules of heun_step1 / heun_step2 / ema_update_, shared by the CPU
// kernels (heun_ema_cpu.cpp, where they are defined) and the CUDA kernels (heun_ema_cuda.cu), so
// both backends accept the same inputs and raise the same errors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace cmkernels {

// ---------------------------------------------------------------------------------------------
// Heun step.

// The memory layout every tensor of a Heun stage is used in, and the outputs get: x's own when it
// is contiguous, channels_last (4-d) or channels_last_3d (5-d); otherwise contiguous. In all three
// the batch dimension is outermost, so sample b is the flat run [b * S, (b + 1) * S).
at::MemoryFormat heun_layout(const at::Tensor& x);

// Checks one stage's arguments (TORCH_CHECK with the op's name):
//   x:        [B, ...] float32 / float16 / bfloat16 / float64
//   states:   stage 2's d and x1 (none in stage 1): x's shape and dtype
//   denoised: x's shape; float32 / float16 / bfloat16 (any, whatever x is), float64 when x is
//   t, t_next: [B], float32 or float64 (the same dtype)
// All on x's device.
void heun_check(const char* op, const at::Tensor& x, at::TensorList states,
                const at::Tensor& denoised, const at::Tensor& t, const at::Tensor& t_next);

// ---------------------------------------------------------------------------------------------
// EMA.

constexpr int64_t kMaxEmaRates = 8;  // rates handled by one ema_update_ call

// A checked ema_update_ call: P parameters, K rates, params[i] laid out like its copies (a copy
// of the parameter where its strides differ from theirs), rates as fp32 r and 1 - r.
struct EmaProblem {
  int64_t P = 0, K = 0;
  std::vector<at::Tensor> params;
  std::vector<float> rate, mix;
};

// params: P tensors (float32 / bfloat16 / float16) on one device; emas: K * P float32 tensors,
// rate-major (emas[k * P + i] is copy k of params[i]), each dense, with its parameter's shape and
// all K copies of a parameter with the same strides; rates: K values in [0, 1], K <= kMaxEmaRates.
EmaProblem ema_check(at::TensorList params, at::TensorList emas, at::ArrayRef<double> rates);

// ---------------------------------------------------------------------------------------------
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
    default: TORCH_CHECK(false, op, ": unsupported dtype ", s);
  }
}

// The (x, denoised) dtype pairs heun_check accepts: float64 only together.
template <typename x_t, typename d_t>
constexpr bool heun_dtype_pair_ok = std::is_same_v<x_t, double> == std::is_same_v<d_t, double>;

}  // namespace cmkernels
