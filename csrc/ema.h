// What the CPU and CUDA kernels of ema_update_ share: the argument checks (defined in
// ema_cpu.cpp), so both backends accept the same inputs and raise the same errors as the Python
// checks (check_inputs in cmkernels/ops/ema.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "common.h"

namespace cmkernels {

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
// ValueError / TypeError as in Python.
EmaProblem ema_check(at::TensorList params, at::TensorList emas, at::ArrayRef<double> rates);

}  // namespace cmkernels
