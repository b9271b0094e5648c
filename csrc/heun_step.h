// What the CPU and CUDA kernels of heun_step1 / heun_step2 share: the argument checks (defined in
// heun_step_cpu.cpp) and the dtype dispatch, so both backends accept the same inputs and raise the
// same errors as the Python checks (check_inputs in cmkernels/ops/heun_step.py).
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "common.h"

namespace cmkernels {

// Checks one stage's arguments (ValueError / TypeError with the op's name):
//   x:        [B, ...] float32 / float16 / bfloat16 / float64
//   states:   stage 2's d and x1 (none in stage 1): x's shape and dtype
//   denoised: x's shape; float32 / float16 / bfloat16 (any, whatever x is), float64 when x is
//   t, t_next: [B], float32 or float64 (the same dtype)
// All on x's device. Every tensor of a stage is then used in kept_layout(x), the outputs' layout,
// where sample b is the flat run [b * S, (b + 1) * S).
void heun_check(const char* op, const at::Tensor& x, at::TensorList states,
                const at::Tensor& denoised, const at::Tensor& t, const at::Tensor& t_next);

// Calls f(TypeTag<x_t>, TypeTag<d_t>, TypeTag<acc_t>) for the dtypes of x and denoised (the pairs
// heun_check accepts: float64 only together; acc_t float64 for float64, else float32).
template <typename F>
void visit_heun_dtypes(at::ScalarType x, at::ScalarType d, const char* op, F&& f) {
  visit_float_dtype(x, op, [&](auto xt) {
    using x_t = typename std::decay_t<decltype(xt)>::type;  // decay: gcc sees a reference below
    visit_float_dtype(d, op, [&](auto dt) {
      using d_t = typename std::decay_t<decltype(dt)>::type;
      if constexpr (std::is_same_v<x_t, double> == std::is_same_v<d_t, double>) {
        using acc_t = std::conditional_t<std::is_same_v<x_t, double>, double, float>;
        f(TypeTag<x_t>{}, TypeTag<d_t>{}, TypeTag<acc_t>{});
      }
    });
  });
}

}  // namespace cmkernels
