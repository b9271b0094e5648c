// The multi-rate EMA update on the CPU, and the argument checks both backends share (ema.h).
//
// K rates: ema_k <- r_k ema_k + (1 - r_k) p for every parameter p, every copy k, in one pass that
// reads p once for all K copies (4 + 8K bytes an fp32 element, against 12K for K lerps).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_math.h"
#include "ema.h"

namespace cmkernels {

// ---------------------------------------------------------------------------------------------
// Checks (declared in ema.h; the CUDA launcher calls them too): the rules of check_inputs in
// cmkernels/ops/ema.py, in the same order, with the same error types and texts.

EmaProblem ema_check(at::TensorList params, at::TensorList emas, at::ArrayRef<double> rates) {
  EmaProblem p;
  p.P = static_cast<int64_t>(params.size());
  p.K = static_cast<int64_t>(rates.size());
  TORCH_CHECK_VALUE(p.K >= 1, "ema_update_: rates must not be empty");
  TORCH_CHECK_VALUE(p.K <= kMaxEmaRates, "ema_update_: at most ", kMaxEmaRates,
                    " rates per call, got ", p.K);
  TORCH_CHECK_VALUE(static_cast<int64_t>(emas.size()) == p.K * p.P, "ema_update_: expected ",
                    p.K, " x ", p.P, " = ", p.K * p.P, " EMA tensors (one copy per rate and "
                    "parameter, rate-major), got ", emas.size());
  for (int64_t k = 0; k < p.K; ++k) {
    const double r = rates[k];
    TORCH_CHECK_VALUE(r >= 0.0 && r <= 1.0, "ema_update_: rates must lie in [0, 1], got rates[",
                      k, "] = ", r);
    p.rate.push_back(static_cast<float>(r));
    p.mix.push_back(static_cast<float>(1.0 - r));
  }
  if (p.P == 0) return p;
  const at::Device device = params[0].device();
  p.params.reserve(p.P);
  for (int64_t i = 0; i < p.P; ++i) {
    const at::Tensor& param = params[i];
    const auto pt = param.scalar_type();
    TORCH_CHECK_TYPE(pt == at::kFloat || pt == at::kBFloat16 || pt == at::kHalf,
                     "ema_update_: params[", i, "] must be float32, bfloat16 or float16, got ",
                     dtype_name(pt));
    TORCH_CHECK_VALUE(param.device() == device, "ema_update_: params[", i, "] is on ",
                      param.device(), " but params[0] is on ", device);
    const at::Tensor& first = emas[i];
    for (int64_t k = 0; k < p.K; ++k) {
      const at::Tensor& e = emas[k * p.P + i];
      TORCH_CHECK_TYPE(e.scalar_type() == at::kFloat, "ema_update_: EMA copies must be float32, "
                       "but copy ", k, " of params[", i, "] is ", dtype_name(e.scalar_type()));
      TORCH_CHECK_VALUE(e.device() == device, "ema_update_: copy ", k, " of params[", i,
                        "] is on ", e.device(), " but the params are on ", device);
      TORCH_CHECK_VALUE(e.sizes() == param.sizes(), "ema_update_: copy ", k, " of params[", i,
                        "] has shape ", e.sizes(), " but the parameter has shape ",
                        param.sizes());
      TORCH_CHECK_VALUE(e.is_non_overlapping_and_dense(), "ema_update_: copy ", k,
                        " of params[", i, "] must be a dense tensor (contiguous or a "
                        "permutation of it), got strides ", e.strides());
      TORCH_CHECK_VALUE(e.strides() == first.strides(), "ema_update_: the copies of params[", i,
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

TORCH_LIBRARY_IMPL(cmkernels, CPU, m) { m.impl("ema_update_", &ema_update_cpu); }

}  // namespace cmkernels
