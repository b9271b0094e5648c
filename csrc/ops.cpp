// Operator schemas of the cmkernels namespace, declared once. Kernels register per backend in
// their own files (TORCH_LIBRARY_IMPL); the Triton kernels register from Python.
#include <torch/library.h>

TORCH_LIBRARY(cmkernels, m) {
  // y = silu(GN(x) * (1 + scale) + shift); returns (y, mean, rstd), mean/rstd [N, groups].
  m.def(
      "groupnorm_silu(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, "
      "int groups, float eps, bool activation) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_scale, grad_shift); the last two are empty
  // tensors when scale / shift are None.
  m.def(
      "groupnorm_silu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? scale, "
      "Tensor? shift, Tensor mean, Tensor rstd, int groups, bool activation) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
