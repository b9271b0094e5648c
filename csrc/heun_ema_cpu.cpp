// The EDM Heun step's elementwise stages and the multi-rate EMA update on the CPU, plus the
// argument checks both backends share (heun_ema.h).
//
// Heun step from t to t' (h = t' - t), per sample b of a batch:
//   stage 1 (after D = D(x, t)):     d = (x - D) / t,  x1 = x + h d              (Euler predictor)
//   stage 2 (after D1 = D(x1, t')):  x' = x + h/2 d + h/(2 t') (x1 - D1)         (Heun corrector)
// The per-sample constants (1/t, h, h/2, h/(2t')) are computed in double from t, t'; the
// elementwise arithmetic runs in fp32 (fp64 for fp64 tensors). One pass reads each input once and
// writes each output once.
//
// EMA, K rates: ema_k <- r_k ema_k + (1 - r_k) p for every parameter p, every copy k, in one pass
// that reads p once for all K copies (4 + 8K bytes an fp32 element, against 12K for K lerps).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "heun_ema.h"

namespace cmkernels {

// ---------------------------------------------------------------------------------------------
// Shared checks (declared in heun_ema.h; the CUDA launchers call them too).

at::MemoryFormat heun_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

void heun_check(const char* op, const at::Tensor& x, at::TensorList states,
                const at::Tensor& denoised, const at::Tensor& t, const at::Tensor& t_next) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [B, ...], got a 0-d tensor");
  TORCH_CHECK(is_activation_dtype(x.scalar_type()), op,
              ": x must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  const char* const state_names[] = {"d", "x1"};
  TORCH_INTERNAL_ASSERT(states.size() <= 2);
  for (size_t i = 0; i < states.size(); ++i) {
    const char* name = state_names[i];
    TORCH_CHECK(states[i].sizes() == x.sizes(), op, ": ", name, " has shape ", states[i].sizes(),
                " but x has shape ", x.sizes());
    TORCH_CHECK(states[i].scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                states[i].scalar_type(), " but x has dtype ", x.scalar_type(), " (they must match)");
    TORCH_CHECK(states[i].device() == x.device(), op, ": ", name, " is on ", states[i].device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK(denoised.sizes() == x.sizes(), op, ": denoised has shape ", denoised.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(denoised.device() == x.device(), op, ": denoised is on ", denoised.device(),
              " but x is on ", x.device());
  const auto dt = denoised.scalar_type();
  if (x.scalar_type() == at::kDouble) {
    TORCH_CHECK(dt == at::kDouble, op, ": denoised must be float64 when x is float64, got ", dt);
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                ": denoised must be float32, float16 or bfloat16, got ", dt);
  }
  const int64_t B = x.size(0);
  for (const auto& [name, s] : {std::pair<const char*, const at::Tensor*>{"t", &t}, {"t_next", &t_next}}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == B, op, ": ", name,
                " must have shape [B] = [", B, "] (one value per sample), got ", s->sizes());
    TORCH_CHECK(s->scalar_type() == at::kFloat || s->scalar_type() == at::kDouble, op, ": ", name,
                " must be float32 or float64, got ", s->scalar_type());
    TORCH_CHECK(s->device() == x.device(), op, ": ", name, " is on ", s->device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK(t.scalar_type() == t_next.scalar_type(), op, ": t and t_next must have the same "
              "dtype, got ", t.scalar_type(), " and ", t_next.scalar_type());
}

EmaProblem ema_check(at::TensorList params, at::TensorList emas, at::ArrayRef<double> rates) {
  EmaProblem p;
  p.P = static_cast<int64_t>(params.size());
  p.K = static_cast<int64_t>(rates.size());
  TORCH_CHECK(p.K >= 1, "ema_update_: rates must not be empty");
  TORCH_CHECK(p.K <= kMaxEmaRates, "ema_update_: at most ", kMaxEmaRates, " rates per call, got ",
              p.K);
  TORCH_CHECK(static_cast<int64_t>(emas.size()) == p.K * p.P, "ema_update_: expected ", p.K,
              " x ", p.P, " = ", p.K * p.P, " EMA tensors (one copy per rate and parameter, "
              "rate-major), got ", emas.size());
  for (int64_t k = 0; k < p.K; ++k) {
    const double r = rates[k];
    TORCH_CHECK(r >= 0.0 && r <= 1.0, "ema_update_: rates must lie in [0, 1], got rates[", k,
                "] = ", r);
    p.rate.push_back(static_cast<float>(r));
    p.mix.push_back(static_cast<float>(1.0 - r));
  }
  if (p.P == 0) return p;
  const at::Device device = params[0].device();
  p.params.reserve(p.P);
  for (int64_t i = 0; i < p.P; ++i) {
    const at::Tensor& param = params[i];
    const auto pt = param.scalar_type();
    TORCH_CHECK(pt == at::kFloat || pt == at::kBFloat16 || pt == at::kHalf, "ema_update_: params[",
                i, "] must be float32, bfloat16 or float16, got ", pt);
    TORCH_CHECK(param.device() == device, "ema_update_: params[", i, "] is on ", param.device(),
                " but params[0] is on ", device);
    const at::Tensor& first = emas[i];
    for (int64_t k = 0; k < p.K; ++k) {
      const at::Tensor& e = emas[k * p.P + i];
      TORCH_CHECK(e.scalar_type() == at::kFloat, "ema_update_: EMA copies must be float32, but "
                  "copy ", k, " of params[", i, "] is ", e.scalar_type());
      TORCH_CHECK(e.device() == device, "ema_update_: copy ", k, " of params[", i, "] is on ",
                  e.device(), " but the params are on ", device);
      TORCH_CHECK(e.sizes() == param.sizes(), "ema_update_: copy ", k, " of params[", i,
                  "] has shape ", e.sizes(), " but the parameter has shape ", param.sizes());
      TORCH_CHECK(e.is_non_overlapping_and_dense(), "ema_update_: copy ", k, " of params[", i,
                  "] must be a dense tensor (contiguous or a permutation of it), got strides ",
                  e.strides());
      TORCH_CHECK(e.strides() == first.strides(), "ema_update_: the copies of params[", i,
                  "] must share one memory layout, got strides ", first.strides(), " and ",
                  e.strides());
    }
    // The kernels walk parameter and copies as flat arrays: the parameter needs their layout.
    p.params.push_back(param.strides() == first.strides()
                           ? param
                           : at::empty_like(first, param.options()).copy_(param));
  }
  return p;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Heun step: row kernels over one sample's contiguous run, with its per-sample constants.

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
// baseline x86-64 and AVX2 + FMA. Other dtypes use the templates directly.
#define CMK_HEUN_F32(suffix, d_t)                                                                  \
  CMK_DISPATCHED(heun1_f32_##suffix,                                                               \
                 (const float* x, const d_t* D, float* x1, float* d, int64_t n, float it, float h), \
                 (x, D, x1, d, n, it, h), (heun1_run<float, d_t, float>(x, D, x1, d, n, it, h)))    \
  CMK_DISPATCHED(heun2_f32_##suffix,                                                               \
                 (const float* x, const float* d, const float* x1, const d_t* D1, float* out,       \
                  int64_t n, float a, float b),                                                    \
                 (x, d, x1, D1, out, n, a, b),                                                     \
                 (heun2_run<float, d_t, float>(x, d, x1, D1, out, n, a, b)))
CMK_HEUN_F32(f32, float)
CMK_HEUN_F32(bf16, at::BFloat16)
CMK_HEUN_F32(f16, at::Half)
#undef CMK_HEUN_F32

template <typename x_t, typename d_t, typename acc_t>
struct HeunRows {
  static void stage1(const x_t* x, const d_t* D, x_t* x1, x_t* d, int64_t n, acc_t it, acc_t h) {
    heun1_run(x, D, x1, d, n, it, h);
  }
  static void stage2(const x_t* x, const x_t* d, const x_t* x1, const d_t* D1, x_t* out, int64_t n,
                     acc_t a, acc_t b) {
    heun2_run(x, d, x1, D1, out, n, a, b);
  }
};

#define CMK_HEUN_ROWS(suffix, d_t)                                                                \
  template <>                                                                                     \
  struct HeunRows<float, d_t, float> {                                                            \
    static void stage1(const float* x, const d_t* D, float* x1, float* d, int64_t n, float it,    \
                       float h) {                                                                 \
      heun1_f32_##suffix(x, D, x1, d, n, it, h);                                                  \
    }                                                                                             \
    static void stage2(const float* x, const float* d, const float* x1, const d_t* D1, float* out, \
                       int64_t n, float a, float b) {                                             \
      heun2_f32_##suffix(x, d, x1, D1, out, n, a, b);                                             \
    }                                                                                             \
  };
CMK_HEUN_ROWS(f32, float)
CMK_HEUN_ROWS(bf16, at::BFloat16)
CMK_HEUN_ROWS(f16, at::Half)
#undef CMK_HEUN_ROWS

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
  const auto fmt = heun_layout(x_in);
  const at::Tensor x = x_in.contiguous(fmt), D = denoised.contiguous(fmt);
  at::Tensor x1 = at::empty_like(x, fmt), d = at::empty_like(x, fmt);
  const int64_t B = x.size(0), S = B ? x.numel() / B : 0;
  if (x.numel() == 0) return {x1, d};
  const std::vector<double> tv = values_of(t), tn = values_of(t_next);
  visit_float_dtype(x.scalar_type(), "heun_step1", [&](auto xt) {
    using x_t = typename decltype(xt)::type;
    visit_float_dtype(D.scalar_type(), "heun_step1", [&](auto dt) {
      using d_t = typename decltype(dt)::type;
      if constexpr (heun_dtype_pair_ok<x_t, d_t>) {
        using acc_t = std::conditional_t<std::is_same_v<x_t, double>, double, float>;
        const x_t* xp = x.const_data_ptr<x_t>();
        const d_t* Dp = D.const_data_ptr<d_t>();
        x_t* x1p = x1.mutable_data_ptr<x_t>();
        x_t* dp = d.mutable_data_ptr<x_t>();
        for_each_sample_run(B, S, [&](int64_t b, int64_t i, int64_t n) {
          HeunRows<x_t, d_t, acc_t>::stage1(xp + i, Dp + i, x1p + i, dp + i, n,
                                            static_cast<acc_t>(1.0 / tv[b]),
                                            static_cast<acc_t>(tn[b] - tv[b]));
        });
      }
    });
  });
  return {x1, d};
}

at::Tensor heun_step2_cpu(const at::Tensor& x_in, const at::Tensor& d_in, const at::Tensor& x1_in,
                          const at::Tensor& denoised1, const at::Tensor& t,
                          const at::Tensor& t_next) {
  heun_check("heun_step2", x_in, {d_in, x1_in}, denoised1, t, t_next);
  const auto fmt = heun_layout(x_in);
  const at::Tensor x = x_in.contiguous(fmt), d = d_in.contiguous(fmt), x1 = x1_in.contiguous(fmt),
                   D1 = denoised1.contiguous(fmt);
  at::Tensor out = at::empty_like(x, fmt);
  const int64_t B = x.size(0), S = B ? x.numel() / B : 0;
  if (x.numel() == 0) return out;
  const std::vector<double> tv = values_of(t), tn = values_of(t_next);
  visit_float_dtype(x.scalar_type(), "heun_step2", [&](auto xt) {
    using x_t = typename decltype(xt)::type;
    visit_float_dtype(D1.scalar_type(), "heun_step2", [&](auto dt) {
      using d_t = typename decltype(dt)::type;
      if constexpr (heun_dtype_pair_ok<x_t, d_t>) {
        using acc_t = std::conditional_t<std::is_same_v<x_t, double>, double, float>;
        const x_t* xp = x.const_data_ptr<x_t>();
        const x_t* dp = d.const_data_ptr<x_t>();
        const x_t* x1p = x1.const_data_ptr<x_t>();
        const d_t* D1p = D1.const_data_ptr<d_t>();
        x_t* op = out.mutable_data_ptr<x_t>();
        for_each_sample_run(B, S, [&](int64_t b, int64_t i, int64_t n) {
          const double h = tn[b] - tv[b];
          HeunRows<x_t, d_t, acc_t>::stage2(xp + i, dp + i, x1p + i, D1p + i, op + i, n,
                                            static_cast<acc_t>(0.5 * h),
                                            static_cast<acc_t>(0.5 * h / tn[b]));
        });
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// EMA: G (<= 4) copies of one run in one loop, p read once; runs of more copies go in groups of
// 4 over L1-sized blocks, so p is read from memory once whatever K is.

template <int G, typename p_t>
CMK_INLINE void ema_group(const p_t* p, float* const* e, const float* r, const float* c,
                          int64_t n) {
  float* e0 = e[0];
  float* e1 = G > 1 ? e[1] : nullptr;
  float* e2 = G > 2 ? e[2] : nullptr;
  float* e3 = G > 3 ? e[3] : nullptr;
  const float r0 = r[0], c0 = c[0];
  const float r1 = G > 1 ? r[1] : 0.f, c1 = G > 1 ? c[1] : 0.f;
  const float r2 = G > 2 ? r[2] : 0.f, c2 = G > 2 ? c[2] : 0.f;
  const float r3 = G > 3 ? r[3] : 0.f, c3 = G > 3 ? c[3] : 0.f;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float pv = static_cast<float>(p[i]);
    e0[i] = r0 * e0[i] + c0 * pv;
    if constexpr (G > 1) e1[i] = r1 * e1[i] + c1 * pv;
    if constexpr (G > 2) e2[i] = r2 * e2[i] + c2 * pv;
    if constexpr (G > 3) e3[i] = r3 * e3[i] + c3 * pv;
  }
}

// e[k] points at copy k's run; r, c: the K rates and 1 - rates.
template <typename p_t>
CMK_INLINE void ema_run(const p_t* p, float* const* e, const float* r, const float* c, int64_t K,
                        int64_t n) {
  constexpr int64_t kBlock = 2048;
  const int64_t block = K <= 4 ? n : kBlock;
  float* ek[kMaxEmaRates];
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t m = std::min(block, n - i0);
    for (int64_t k = 0; k < K; ++k) ek[k] = e[k] + i0;
    for (int64_t k0 = 0; k0 < K; k0 += 4) {
      switch (std::min<int64_t>(4, K - k0)) {
        case 1: ema_group<1>(p + i0, ek + k0, r + k0, c + k0, m); break;
        case 2: ema_group<2>(p + i0, ek + k0, r + k0, c + k0, m); break;
        case 3: ema_group<3>(p + i0, ek + k0, r + k0, c + k0, m); break;
        default: ema_group<4>(p + i0, ek + k0, r + k0, c + k0, m); break;
      }
    }
  }
}

#define CMK_EMA_RUN(suffix, p_t)                                                                 \
  CMK_DISPATCHED(ema_run_##suffix,                                                              \
                 (const p_t* p, float* const* e, const float* r, const float* c, int64_t K,     \
                  int64_t n),                                                                   \
                 (p, e, r, c, K, n), (ema_run<p_t>(p, e, r, c, K, n)))
CMK_EMA_RUN(f32, float)
CMK_EMA_RUN(bf16, at::BFloat16)
CMK_EMA_RUN(f16, at::Half)
#undef CMK_EMA_RUN

void ema_update_cpu(at::TensorList params, at::TensorList emas, at::ArrayRef<double> rates) {
  const EmaProblem p = ema_check(params, emas, rates);
  if (p.P == 0) return;
  // The parameters' elements in one flat index space: tensor i owns [offset[i], offset[i + 1]).
  // Threads split that space evenly, so many small tensors and a few big ones balance alike.
  std::vector<int64_t> offset(p.P + 1, 0);
  for (int64_t i = 0; i < p.P; ++i) offset[i + 1] = offset[i] + p.params[i].numel();
  constexpr int64_t kGrain = 32768;
  at::parallel_for(0, offset[p.P], kGrain, [&](int64_t begin, int64_t end) {
    float* e[kMaxEmaRates];
    int64_t i = std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin() - 1;
    for (int64_t pos = begin; pos < end; ++i) {
      const int64_t lo = pos - offset[i], hi = std::min(end, offset[i + 1]) - offset[i];
      pos = offset[i] + hi;
      if (hi <= lo) continue;  // empty tensors
      for (int64_t k = 0; k < p.K; ++k) e[k] = emas[k * p.P + i].mutable_data_ptr<float>() + lo;
      const at::Tensor& param = p.params[i];
      switch (param.scalar_type()) {
        case at::kFloat:
          ema_run_f32(param.const_data_ptr<float>() + lo, e, p.rate.data(), p.mix.data(), p.K, hi - lo);
          break;
        case at::kBFloat16:
          ema_run_bf16(param.const_data_ptr<at::BFloat16>() + lo, e, p.rate.data(), p.mix.data(), p.K,
                       hi - lo);
          break;
        default:
          ema_run_f16(param.const_data_ptr<at::Half>() + lo, e, p.rate.data(), p.mix.data(), p.K,
                      hi - lo);
          break;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(cmkernels, CPU, m) {
  m.impl("heun_step1", &heun_step1_cpu);
  m.impl("heun_step2", &heun_step2_cpu);
  m.impl("ema_update_", &ema_update_cpu);
}

}  // namespace cmkernels
