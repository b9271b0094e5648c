// The EDM Heun step's elementwise stages on the CPU, and the argument checks both backends share
// (heun_step.h).
//
// Heun step from t to t' (h = t' - t), per sample b of a batch:
//   stage 1 (after D = D(x, t)):     d = (x - D) / t,  x1 = x + h d              (Euler predictor)
//   stage 2 (after D1 = D(x1, t')):  x' = x + h/2 d + h/(2 t') (x1 - D1)         (Heun corrector)
// The per-sample constants (1/t, h, h/2, h/(2t')) are computed in double from t, t'; the
// elementwise arithmetic runs in fp32 (fp64 for fp64 tensors). One pass reads each input once and
// writes each output once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_math.h"
#include "heun_step.h"

namespace cmkernels {

// ---------------------------------------------------------------------------------------------
// Checks (declared in heun_step.h; the CUDA launchers call them too): the rules of check_inputs in
// cmkernels/ops/heun_step.py, in the same order, with the same error types and texts.

void heun_check(const char* op, const at::Tensor& x, at::TensorList states,
                const at::Tensor& denoised, const at::Tensor& t, const at::Tensor& t_next) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have shape [B, ...], got a 0-d tensor");
  TORCH_CHECK_TYPE(is_activation_dtype(x.scalar_type()), op,
                   ": x must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(x.scalar_type()));
  const char* const state_names[] = {"d", "x1"};
  TORCH_INTERNAL_ASSERT(states.size() <= 2);
  for (size_t i = 0; i < states.size(); ++i) {
    const char* name = state_names[i];
    const at::Tensor& s = states[i];
    TORCH_CHECK_VALUE(s.sizes() == x.sizes(), op, ": ", name, " has shape ", s.sizes(),
                      " but x has shape ", x.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                     dtype_name(s.scalar_type()), " but x has dtype ",
                     dtype_name(x.scalar_type()), " (they must match)");
    TORCH_CHECK_VALUE(s.device() == x.device(), op, ": ", name, " is on ", s.device(),
                      " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(denoised.sizes() == x.sizes(), op, ": denoised has shape ", denoised.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_VALUE(denoised.device() == x.device(), op, ": denoised is on ", denoised.device(),
                    " but x is on ", x.device());
  const auto dt = denoised.scalar_type();
  if (x.scalar_type() == at::kDouble) {
    TORCH_CHECK_TYPE(dt == at::kDouble, op, ": denoised must be float64 when x is float64, got ",
                     dtype_name(dt));
  } else {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                     ": denoised must be float32, float16 or bfloat16, got ", dtype_name(dt));
  }
  const int64_t B = x.size(0);
  for (const auto& [name, s] :
       {std::pair<const char*, const at::Tensor*>{"t", &t}, {"t_next", &t_next}}) {
    TORCH_CHECK_VALUE(s->dim() == 1 && s->size(0) == B, op, ": ", name,
                      " must have shape [B] = [", B, "] (one value per sample), got ", s->sizes());
    TORCH_CHECK_TYPE(s->scalar_type() == at::kFloat || s->scalar_type() == at::kDouble, op, ": ",
                     name, " must be float32 or float64, got ", dtype_name(s->scalar_type()));
    TORCH_CHECK_VALUE(s->device() == x.device(), op, ": ", name, " is on ", s->device(),
                      " but x is on ", x.device());
  }
  TORCH_CHECK_TYPE(t.scalar_type() == t_next.scalar_type(), op,
                   ": t and t_next must have the same dtype, got ", dtype_name(t.scalar_type()),
                   " and ", dtype_name(t_next.scalar_type()));
}

namespace {

// ---------------------------------------------------------------------------------------------
// Row kernels over one sample's contiguous run, with its per-sample constants.

template <typename x_t, typename d_t, typename acc_t>
CMK_INLINE void heun1_run(const x_t* x, const d_t* D, x_t* x1, x_t* d, int64_t n, acc_t inv_t,
                          acc_t h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t dv = (xv - static_cast<acc_t>(D[i])) * inv_t;
    d[i] = static_cast<x_t>(dv);
    x1[i] = static_cast<x_t>(xv + h * dv);
  }
}

template <typename x_t, typename d_t, typename acc_t>
CMK_INLINE void heun2_run(const x_t* x, const x_t* d, const x_t* x1, const d_t* D1, x_t* out,
                          int64_t n, acc_t a, acc_t b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    out[i] = static_cast<x_t>(xv + a * static_cast<acc_t>(d[i]) +
                              b * (static_cast<acc_t>(x1[i]) - static_cast<acc_t>(D1[i])));
  }
}

// fp32 states (the sampler's usual case), with fp32 / bf16 / fp16 network outputs: compiled for
// baseline x86-64 and AVX2 + FMA, as non-template overloads that an unqualified call with float
// states picks. Other dtypes use the templates directly.
#define CMK_HEUN_F32(d_t)                                                                          \
  CMK_DISPATCHED(heun1_run,                                                                        \
                 (const float* x, const d_t* D, float* x1, float* d, int64_t n, float it, float h), \
                 (x, D, x1, d, n, it, h), (heun1_run<float, d_t, float>(x, D, x1, d, n, it, h)))    \
  CMK_DISPATCHED(heun2_run,                                                                        \
                 (const float* x, const float* d, const float* x1, const d_t* D1, float* out,       \
                  int64_t n, float a, float b),                                                    \
                 (x, d, x1, D1, out, n, a, b),                                                     \
                 (heun2_run<float, d_t, float>(x, d, x1, D1, out, n, a, b)))
CMK_HEUN_F32(float)
CMK_HEUN_F32(at::BFloat16)
CMK_HEUN_F32(at::Half)
#undef CMK_HEUN_F32

// Calls f(b, begin, n) for the runs of samples b that split the flat range [0, B * S) among the
// threads: elements [begin, begin + n) of the flat arrays belong to sample b.
template <typename F>
void for_each_sample_run(int64_t B, int64_t S, const F& f) {
  constexpr int64_t kGrain = 16384;
  at::parallel_for(0, B * S, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin, b = begin / S; i < end; ++b) {
      const int64_t stop = std::min(end, (b + 1) * S);
      f(b, i, stop - i);
      i = stop;
    }
  });
}

std::vector<double> values_of(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.const_data_ptr<double>(), c.const_data_ptr<double>() + c.numel());
}

std::tuple<at::Tensor, at::Tensor> heun_step1_cpu(const at::Tensor& x_in, const at::Tensor& denoised,
                                                  const at::Tensor& t, const at::Tensor& t_next) {
  heun_check("heun_step1", x_in, {}, denoised, t, t_next);
  const auto fmt = kept_layout(x_in);
  const at::Tensor x = x_in.contiguous(fmt), D = denoised.contiguous(fmt);
  at::Tensor x1 = at::empty_like(x, fmt), d = at::empty_like(x, fmt);
  const int64_t B = x.size(0), S = B ? x.numel() / B : 0;
  if (x.numel() == 0) return {x1, d};
  const std::vector<double> tv = values_of(t), tn = values_of(t_next);
  const auto xd = x.scalar_type(), dd = D.scalar_type();
  visit_heun_dtypes(xd, dd, "heun_step1", [&](auto xt, auto dt, auto acc) {
    using x_t = typename decltype(xt)::type;
    using d_t = typename decltype(dt)::type;
    using acc_t = typename decltype(acc)::type;
    const x_t* xp = x.const_data_ptr<x_t>();
    const d_t* Dp = D.const_data_ptr<d_t>();
    x_t* x1p = x1.mutable_data_ptr<x_t>();
    x_t* dp = d.mutable_data_ptr<x_t>();
    for_each_sample_run(B, S, [&](int64_t b, int64_t i, int64_t n) {
      heun1_run(xp + i, Dp + i, x1p + i, dp + i, n, static_cast<acc_t>(1.0 / tv[b]),
                static_cast<acc_t>(tn[b] - tv[b]));
    });
  });
  return {x1, d};
}

at::Tensor heun_step2_cpu(const at::Tensor& x_in, const at::Tensor& d_in, const at::Tensor& x1_in,
                          const at::Tensor& denoised1, const at::Tensor& t,
                          const at::Tensor& t_next) {
  heun_check("heun_step2", x_in, {d_in, x1_in}, denoised1, t, t_next);
  const auto fmt = kept_layout(x_in);
  const at::Tensor x = x_in.contiguous(fmt), d = d_in.contiguous(fmt), x1 = x1_in.contiguous(fmt),
                   D1 = denoised1.contiguous(fmt);
  at::Tensor out = at::empty_like(x, fmt);
  const int64_t B = x.size(0), S = B ? x.numel() / B : 0;
  if (x.numel() == 0) return out;
  const std::vector<double> tv = values_of(t), tn = values_of(t_next);
  const auto xd = x.scalar_type(), dd = D1.scalar_type();
  visit_heun_dtypes(xd, dd, "heun_step2", [&](auto xt, auto dt, auto acc) {
    using x_t = typename decltype(xt)::type;
    using d_t = typename decltype(dt)::type;
    using acc_t = typename decltype(acc)::type;
    const x_t* xp = x.const_data_ptr<x_t>();
    const x_t* dp = d.const_data_ptr<x_t>();
    const x_t* x1p = x1.const_data_ptr<x_t>();
    const d_t* D1p = D1.const_data_ptr<d_t>();
    x_t* op = out.mutable_data_ptr<x_t>();
    for_each_sample_run(B, S, [&](int64_t b, int64_t i, int64_t n) {
      const double h = tn[b] - tv[b];
      heun2_run(xp + i, dp + i, x1p + i, D1p + i, op + i, n, static_cast<acc_t>(0.5 * h),
                static_cast<acc_t>(0.5 * h / tn[b]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cmkernels, CPU, m) {
  m.impl("heun_step1", &heun_step1_cpu);
  m.impl("heun_step2", &heun_step2_cpu);
}

}  // namespace cmkernels
