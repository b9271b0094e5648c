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
  // Forward-mode AD in one pass: y and its tangent ty for tangents tx, tweight, tbias, tscale,
  // tshift (each optional: None is a zero tangent); returns (y, ty, mean, rstd).
  m.def(
      "groupnorm_silu_jvp(Tensor x, Tensor? tx, Tensor weight, Tensor? tweight, Tensor bias, "
      "Tensor? tbias, Tensor? scale, Tensor? tscale, Tensor? shift, Tensor? tshift, int groups, "
      "float eps, bool activation) -> (Tensor, Tensor, Tensor, Tensor)");
  // Multi-head self-attention on the packed layout: qkv [B, 3*H*d, T], channel order (three, heads,
  // head_dim) -> (out [B, H*d, T], lse [B, H, T] fp32: logsumexp of each softmax row).
  // Kernels: CPU and CUDA (Triton) both register from Python (cmkernels/ops/attention/).
  m.def("attention(Tensor qkv, int num_heads) -> (Tensor, Tensor)");
  // Returns grad_qkv [B, 3*H*d, T].
  m.def(
      "attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads) "
      "-> Tensor");
  // The same on q, k, v [B, H, T, d] -> (out [B, H, T, d], lse [B, H, T]).
  m.def("attention_bhtd(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v), each [B, H, T, d].
  m.def(
      "attention_bhtd_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse) -> (Tensor, Tensor, Tensor)");
  // Forward-mode AD of the two: (out, tangent of out, lse) for the inputs' tangents, in one
  // flash pass (no T x T matrix in memory); tqkv [B, 3*H*d, T]; tq, tk, tv optional (None: zero).
  m.def("attention_jvp(Tensor qkv, Tensor tqkv, int num_heads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_bhtd_jvp(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv) "
      "-> (Tensor, Tensor, Tensor)");
  // One EDM Heun step's elementwise stages; t, t_next [B] per sample. Stage 1 returns (x1, d):
  // d = (x - denoised) / t, x1 = x + (t_next - t) d. Stage 2 returns
  // x_next = x + (t_next - t) (d + (x1 - denoised1) / t_next) / 2.
  m.def("heun_step1(Tensor x, Tensor denoised, Tensor t, Tensor t_next) -> (Tensor, Tensor)");
  m.def(
      "heun_step2(Tensor x, Tensor d, Tensor x1, Tensor denoised1, Tensor t, Tensor t_next) "
      "-> Tensor");
  // In-place EMA at K rates: emas[k * P + i] <- rates[k] emas[k * P + i] + (1 - rates[k]) params[i].
  m.def("ema_update_(Tensor[] params, Tensor(a!)[] emas, float[] rates) -> ()");
}
