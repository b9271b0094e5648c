// GroupNorm (+ per-sample scale/shift) (+ SiLU) on the CPU: forward, backward and the forward-mode
// JVP (y and its tangent in one call). Some 1,050 lines: one op's three kernels, which share the
// per-channel coefficients, the argument checks and the row kernels (NCHW runs and NHWC rows, each
// with its fp32 baseline / AVX2 entry points).
//
//   xhat = (x - mean_g) * rstd_g                       statistics per (sample, group), fp32 (fp64)
//   a    = (xhat * w_c + b_c) * (1 + scale_nc) + shift_nc
//   y    = silu(a) = a * sigmoid(a)      (y = a when activation is off)
//
// Forward folds everything per (n, c) into y = act(A * x + B), so the output pass is one
// multiply-add and one exp per element. Backward (g = dy * silu'(a), silu'(a) = s (1 + a (1 - s))):
//   T1_nc = sum_hw g,  T2_nc = sum_hw g * xhat
//   dshift_nc = T1,  dscale_nc = w T2 + b T1,  dbias_c = sum_n (1+s) T1,  dweight_c = sum_n (1+s) T2
//   dx = rstd * ((1+s) w g - c1_ng - xhat c2_ng),  c1 = mean_g[(1+s) w T1 / HW], c2 = mean_g[(1+s) w T2 / HW]
// JVP (tangents x', w', b', s', sh'; the derivation is above groupnorm_silu_jvp_cpu below): the
// statistics pass adds sum x' and sum (x - pivot) x' to the forward's sums, and the output pass
// writes y (the forward's, to the bit) and y' = silu'(h) (D x' + E (x - mean) + F) per (n, c).
//
// Layouts: NCHW (any number of spatial dims, flattened) and channels_last NHWC. Other strides are
// copied to NCHW first (kept_layout). Outputs follow the layout that was used. The argument rules
// are those of cmkernels/ops/groupnorm_silu/checks.py, with the same errors; the exp / SiLU and
// the AVX2 selection come from cpu_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "cpu_math.h"

namespace cmkernels {
namespace {

// dL/da given dL/dy; ACT is a template argument so the loops below stay free of control flow.
template <bool ACT, typename acc_t>
CMK_INLINE acc_t act_bwd(acc_t dy, acc_t a) {
  if constexpr (!ACT) {
    return dy;
  } else {
    const acc_t s = sigmoid(a);
    return dy * s * (acc_t(1) + a * (acc_t(1) - s));
  }
}

// ---------------------------------------------------------------------------------------------
// Row kernels on raw pointers. Templates are force-inlined into the fp32 entry points below, so
// the AVX2 variant gets AVX2 code.

// Shifted sums of a contiguous run: returns (sum(x - pivot), sum((x - pivot)^2)) in double, with
// float partial sums over short blocks (vectorised) for speed.
template <typename scalar_t, typename acc_t>
CMK_INLINE void shifted_sums(const scalar_t* x, int64_t n, acc_t pivot, double& s, double& ss) {
  constexpr int64_t kBlock = 256;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    acc_t bs = 0, bss = 0;
#pragma omp simd reduction(+ : bs, bss)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t v = static_cast<acc_t>(x[i]) - pivot;
      bs += v;
      bss += v * v;
    }
    s += bs;
    ss += bss;
  }
}

template <typename scalar_t, typename acc_t>
CMK_INLINE void affine_act_run(const scalar_t* x, scalar_t* y, int64_t n, acc_t A, acc_t B,
                               bool activation) {
  if (activation) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<scalar_t>(silu(A * static_cast<acc_t>(x[i]) + B));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<scalar_t>(A * static_cast<acc_t>(x[i]) + B);
  }
}

// NHWC row: y[c] = act(A[c] x[c] + B[c]) over the C channels of one pixel.
template <typename scalar_t, typename acc_t>
CMK_INLINE void affine_act_row(const scalar_t* x, scalar_t* y, int64_t C, const acc_t* A,
                               const acc_t* B, bool activation) {
  if (activation) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      y[c] = static_cast<scalar_t>(silu(A[c] * static_cast<acc_t>(x[c]) + B[c]));
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) y[c] = static_cast<scalar_t>(A[c] * static_cast<acc_t>(x[c]) + B[c]);
  }
}

// Backward pass 1 over a contiguous run of one channel: T1 += sum g, T2 += sum g * xhat, where
// xhat = P x + Q and a = A x + B.
template <bool ACT, typename scalar_t, typename acc_t>
CMK_INLINE void bwd_sums_run_t(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t A, acc_t B,
                               acc_t P, acc_t Q, acc_t& T1, acc_t& T2) {
  acc_t t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t g = act_bwd<ACT>(static_cast<acc_t>(dy[i]), A * xv + B);
    t1 += g;
    t2 += g * (P * xv + Q);
  }
  T1 += t1;
  T2 += t2;
}

// Backward pass 2 over a run of one channel: dx = K g + L x + M (all per-channel constants).
template <bool ACT, typename scalar_t, typename acc_t>
CMK_INLINE void bwd_dx_run_t(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n,
                             acc_t A, acc_t B, acc_t K, acc_t L, acc_t M) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t g = act_bwd<ACT>(static_cast<acc_t>(dy[i]), A * xv + B);
    dx[i] = static_cast<scalar_t>(K * g + L * xv + M);
  }
}

// NHWC backward rows.
template <bool ACT, typename scalar_t, typename acc_t>
CMK_INLINE void bwd_sums_row_t(const scalar_t* dy, const scalar_t* x, int64_t C, const acc_t* A,
                               const acc_t* B, const acc_t* P, const acc_t* Q, acc_t* T1,
                               acc_t* T2) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t g = act_bwd<ACT>(static_cast<acc_t>(dy[c]), A[c] * xv + B[c]);
    T1[c] += g;
    T2[c] += g * (P[c] * xv + Q[c]);
  }
}

template <bool ACT, typename scalar_t, typename acc_t>
CMK_INLINE void bwd_dx_row_t(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C,
                             const acc_t* A, const acc_t* B, const acc_t* K, const acc_t* L,
                             const acc_t* M) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t g = act_bwd<ACT>(static_cast<acc_t>(dy[c]), A[c] * xv + B[c]);
    dx[c] = static_cast<scalar_t>(K[c] * g + L[c] * xv + M[c]);
  }
}

// Runtime activation flag -> template argument.
template <typename scalar_t, typename acc_t>
CMK_INLINE void bwd_sums_run(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t A, acc_t B,
                             acc_t P, acc_t Q, bool act, acc_t& T1, acc_t& T2) {
  if (act) bwd_sums_run_t<true>(dy, x, n, A, B, P, Q, T1, T2);
  else bwd_sums_run_t<false>(dy, x, n, A, B, P, Q, T1, T2);
}
template <typename scalar_t, typename acc_t>
CMK_INLINE void bwd_dx_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_t A,
                           acc_t B, acc_t K, acc_t L, acc_t M, bool act) {
  if (act) bwd_dx_run_t<true>(dy, x, dx, n, A, B, K, L, M);
  else bwd_dx_run_t<false>(dy, x, dx, n, A, B, K, L, M);
}
template <typename scalar_t, typename acc_t>
CMK_INLINE void bwd_sums_row(const scalar_t* dy, const scalar_t* x, int64_t C, const acc_t* A,
                             const acc_t* B, const acc_t* P, const acc_t* Q, bool act, acc_t* T1,
                             acc_t* T2) {
  if (act) bwd_sums_row_t<true>(dy, x, C, A, B, P, Q, T1, T2);
  else bwd_sums_row_t<false>(dy, x, C, A, B, P, Q, T1, T2);
}
template <typename scalar_t, typename acc_t>
CMK_INLINE void bwd_dx_row(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t C,
                           const acc_t* A, const acc_t* B, const acc_t* K, const acc_t* L,
                           const acc_t* M, bool act) {
  if (act) bwd_dx_row_t<true>(dy, x, dx, C, A, B, K, L, M);
  else bwd_dx_row_t<false>(dy, x, dx, C, A, B, K, L, M);
}

// fp32 entry points, compiled for baseline x86-64 and for AVX2+FMA: non-template overloads of the
// templates above, which an unqualified call with float pointers picks; other dtypes get the
// templates (and the entry points call the templates by their explicit arguments).
CMK_DISPATCHED(shifted_sums, (const float* x, int64_t n, float p, double& s, double& ss),
               (x, n, p, s, ss), (shifted_sums<float, float>(x, n, p, s, ss)))
#if CMK_HAVE_AVX2_PATH
CMK_TARGET_AVX2 static void affine_act_run_f32_avx2(const float* x, float* y, int64_t n, float A,
                                                    float B, bool act) {
  if (!act) return affine_act_run<float, float>(x, y, n, A, B, act);
  const __m256 va = _mm256_set1_ps(A), vb = _mm256_set1_ps(B);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, silu8(_mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), vb)));
  affine_act_run<float, float>(x + i, y + i, n - i, A, B, act);  // the < 8 left
}

CMK_TARGET_AVX2 static void affine_act_row_f32_avx2(const float* x, float* y, int64_t C,
                                                    const float* A, const float* B, bool act) {
  if (!act) return affine_act_row<float, float>(x, y, C, A, B, act);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(A + c), _mm256_loadu_ps(x + c),
                                     _mm256_loadu_ps(B + c));
    _mm256_storeu_ps(y + c, silu8(a));
  }
  affine_act_row<float, float>(x + c, y + c, C - c, A + c, B + c, act);
}

static void affine_act_run(const float* x, float* y, int64_t n, float A, float B, bool act) {
  if (cpu_has_avx2()) affine_act_run_f32_avx2(x, y, n, A, B, act);
  else affine_act_run<float, float>(x, y, n, A, B, act);
}
static void affine_act_row(const float* x, float* y, int64_t C, const float* A, const float* B,
                               bool act) {
  if (cpu_has_avx2()) affine_act_row_f32_avx2(x, y, C, A, B, act);
  else affine_act_row<float, float>(x, y, C, A, B, act);
}
#else
CMK_DISPATCHED(affine_act_run, (const float* x, float* y, int64_t n, float A, float B, bool act),
               (x, y, n, A, B, act), (affine_act_run<float, float>(x, y, n, A, B, act)))
CMK_DISPATCHED(affine_act_row,
               (const float* x, float* y, int64_t C, const float* A, const float* B, bool act),
               (x, y, C, A, B, act), (affine_act_row<float, float>(x, y, C, A, B, act)))
#endif
CMK_DISPATCHED(bwd_sums_run,
               (const float* dy, const float* x, int64_t n, float A, float B, float P, float Q,
                bool act, float& T1, float& T2),
               (dy, x, n, A, B, P, Q, act, T1, T2),
               (bwd_sums_run<float, float>(dy, x, n, A, B, P, Q, act, T1, T2)))
CMK_DISPATCHED(bwd_dx_run,
               (const float* dy, const float* x, float* dx, int64_t n, float A, float B, float K,
                float L, float M, bool act),
               (dy, x, dx, n, A, B, K, L, M, act),
               (bwd_dx_run<float, float>(dy, x, dx, n, A, B, K, L, M, act)))
CMK_DISPATCHED(bwd_sums_row,
               (const float* dy, const float* x, int64_t C, const float* A, const float* B,
                const float* P, const float* Q, bool act, float* T1, float* T2),
               (dy, x, C, A, B, P, Q, act, T1, T2),
               (bwd_sums_row<float, float>(dy, x, C, A, B, P, Q, act, T1, T2)))
CMK_DISPATCHED(bwd_dx_row,
               (const float* dy, const float* x, float* dx, int64_t C, const float* A,
                const float* B, const float* K, const float* L, const float* M, bool act),
               (dy, x, dx, C, A, B, K, L, M, act),
               (bwd_dx_row<float, float>(dy, x, dx, C, A, B, K, L, M, act)))

// ---------------------------------------------------------------------------------------------
// Argument checks: the rules of check_inputs / check_backward_inputs in
// cmkernels/ops/groupnorm_silu/checks.py, in the same order, with the same error types and texts
// (TORCH_CHECK_VALUE raises ValueError in Python, TORCH_CHECK_TYPE TypeError).

struct Problem {
  int64_t N, C, HW, G, cpg;
  bool channels_last;  // x viewed as [N, HW, C] instead of [N, C, HW]
};

// p is on x's device, in x's dtype or float32, and has one of the shapes.
void check_param(const at::Tensor& p, const char* name, const at::Tensor& x,
                 const std::vector<std::vector<int64_t>>& shapes,
                 const char* op = "groupnorm_silu") {
  TORCH_CHECK_VALUE(p.device() == x.device(), op, ": ", name, " is on ", p.device(),
                    " but x is on ", x.device());
  TORCH_CHECK_TYPE(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat,
                   op, ": ", name, " has dtype ", dtype_name(p.scalar_type()),
                   "; expected ", dtype_name(x.scalar_type()), " (the dtype of x) or float32");
  bool ok = false;
  std::ostringstream expected;
  for (size_t i = 0; i < shapes.size(); ++i) {
    ok = ok || p.sizes() == at::IntArrayRef(shapes[i]);
    expected << (i ? " or " : "") << at::IntArrayRef(shapes[i]);
  }
  TORCH_CHECK_VALUE(ok, op, ": ", name, " has shape ", p.sizes(), "; expected ", expected.str());
}

// The accepted shapes of scale / shift: [N, C], and [N, C, 1, ...] with x's number of dims.
std::vector<std::vector<int64_t>> per_sample_shapes(const at::Tensor& x) {
  std::vector<std::vector<int64_t>> shapes = {{x.size(0), x.size(1)}};
  if (x.dim() > 2) {
    shapes.push_back({x.size(0), x.size(1)});
    shapes.back().resize(x.dim(), 1);
  }
  return shapes;
}

// x [N, C, *spatial] float32 / float16 / bfloat16 / float64; groups dividing C; weight, bias [C];
// scale, shift [N, C] or [N, C, 1, ...] with x's number of dims.
Problem check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                     int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "groupnorm_silu: x must have shape [N, C, *spatial], got ",
                    x.sizes());
  TORCH_CHECK_TYPE(is_activation_dtype(x.scalar_type()),
                   "groupnorm_silu: x must be float32, float16, bfloat16 or float64, got ",
                   dtype_name(x.scalar_type()));
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(groups > 0 && C % groups == 0, "groupnorm_silu: the number of channels (", C,
                    ") must be divisible by groups (", groups, ")");
  const auto per_sample = per_sample_shapes(x);
  check_param(weight, "weight", x, {{C}});
  check_param(bias, "bias", x, {{C}});
  if (scale) check_param(*scale, "scale", x, per_sample);
  if (shift) check_param(*shift, "shift", x, per_sample);
  const bool channels_last = kept_layout(x, false) == at::MemoryFormat::ChannelsLast;
  return {N, C, C > 0 ? x.numel() / std::max<int64_t>(N * C, 1) : 0, groups, C / groups,
          channels_last};
}

// The above, and grad_y like x; mean and rstd with N * groups elements on x's device.
Problem check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x,
                              const at::Tensor& weight, const at::Tensor& bias,
                              const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift, const at::Tensor& mean,
                              const at::Tensor& rstd, int64_t groups) {
  const Problem p = check_inputs(x, weight, bias, scale, shift, groups);
  constexpr const char* op = "groupnorm_silu_backward";
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), op, ": grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y has dtype ",
                   dtype_name(grad_y.scalar_type()), " but x has dtype ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(),
                    " but x is on ", x.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean},
                                {"rstd", &rstd}}) {
    TORCH_CHECK_VALUE(t->numel() == p.N * p.G, op, ": ", name, " must have N * groups = ",
                      p.N * p.G, " elements, got ", t->numel());
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
                      " but x is on ", x.device());
  }
  return p;
}

// Per-(n, c) parameters in accumulation precision: w, b [C]; s1 = 1 + scale, sh [N, C].
template <typename acc_t>
struct Params {
  std::vector<acc_t> w, b, s1, sh;
};

template <typename acc_t>
Params<acc_t> gather_params(const Problem& p, const at::Tensor& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift) {
  const auto dt = c10::CppTypeToScalarType<acc_t>::value;
  auto vec = [&](const at::Tensor& t) -> std::vector<acc_t> {
    auto c = t.detach().to(dt).contiguous();
    const acc_t* ptr = c.template const_data_ptr<acc_t>();
    return std::vector<acc_t>(ptr, ptr + c.numel());
  };
  Params<acc_t> out{vec(weight), vec(bias), {}, {}};
  out.s1 = scale ? vec(*scale) : std::vector<acc_t>(p.N * p.C, acc_t(0));
  for (auto& v : out.s1) v += acc_t(1);
  out.sh = shift ? vec(*shift) : std::vector<acc_t>(p.N * p.C, acc_t(0));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, typename acc_t>
void forward_impl(const Problem& p, const scalar_t* x, scalar_t* y, acc_t* mean_out,
                  acc_t* rstd_out, const Params<acc_t>& prm, double eps, bool activation) {
  const int64_t M = p.cpg * p.HW;  // elements per group
  if (!p.channels_last) {
    at::parallel_for(0, p.N * p.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / p.G, g = ng % p.G;
        const scalar_t* xg = x + ng * M;
        double s = 0, ss = 0;
        const acc_t pivot = M > 0 ? static_cast<acc_t>(xg[0]) : acc_t(0);
        shifted_sums(xg, M, pivot, s, ss);
        const double m = s / M, var = std::max(ss / M - m * m, 0.0);
        const acc_t mean = static_cast<acc_t>(pivot + m);
        const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
        mean_out[ng] = mean;
        rstd_out[ng] = rstd;
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t c = g * p.cpg + cl, nc = n * p.C + c;
          const acc_t A = rstd * prm.w[c] * prm.s1[nc];
          const acc_t B = (prm.b[c] - mean * rstd * prm.w[c]) * prm.s1[nc] + prm.sh[nc];
          affine_act_run(xg + cl * p.HW, y + ng * M + cl * p.HW, p.HW, A, B, activation);
        }
      }
    });
    return;
  }
  // NHWC: per sample, channel sums over pixels, then group statistics, then one output pass.
  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> cs(p.C), css(p.C);
    std::vector<acc_t> A(p.C), B(p.C), pivot(p.C);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* xn = x + n * p.HW * p.C;
      std::fill(cs.begin(), cs.end(), 0.0);
      std::fill(css.begin(), css.end(), 0.0);
      for (int64_t g = 0; g < p.G; ++g)  // one pivot per group: its first element
        for (int64_t cl = 0; cl < p.cpg; ++cl) pivot[g * p.cpg + cl] = p.HW ? static_cast<acc_t>(xn[g * p.cpg]) : acc_t(0);
      constexpr int64_t kRows = 64;  // float partial sums over short row blocks
      std::vector<acc_t> bs(p.C), bss(p.C);
      for (int64_t h0 = 0; h0 < p.HW; h0 += kRows) {
        std::fill(bs.begin(), bs.end(), acc_t(0));
        std::fill(bss.begin(), bss.end(), acc_t(0));
        const int64_t h1 = std::min(p.HW, h0 + kRows);
        for (int64_t hw = h0; hw < h1; ++hw) {
          const scalar_t* row = xn + hw * p.C;
#pragma omp simd
          for (int64_t c = 0; c < p.C; ++c) {
            const acc_t v = static_cast<acc_t>(row[c]) - pivot[c];
            bs[c] += v;
            bss[c] += v * v;
          }
        }
        for (int64_t c = 0; c < p.C; ++c) {
          cs[c] += bs[c];
          css[c] += bss[c];
        }
      }
      for (int64_t g = 0; g < p.G; ++g) {
        double s = 0, ss = 0;
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          s += cs[g * p.cpg + cl];
          ss += css[g * p.cpg + cl];
        }
        const double m = s / M, var = std::max(ss / M - m * m, 0.0);
        const acc_t mean = static_cast<acc_t>(pivot[g * p.cpg] + m);
        const acc_t rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
        mean_out[n * p.G + g] = mean;
        rstd_out[n * p.G + g] = rstd;
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t c = g * p.cpg + cl, nc = n * p.C + c;
          A[c] = rstd * prm.w[c] * prm.s1[nc];
          B[c] = (prm.b[c] - mean * rstd * prm.w[c]) * prm.s1[nc] + prm.sh[nc];
        }
      }
      for (int64_t hw = 0; hw < p.HW; ++hw)
        affine_act_row(xn + hw * p.C, y + (n * p.HW + hw) * p.C, p.C, A.data(), B.data(), activation);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t groups,
    double eps, bool activation) {
  const Problem p = check_inputs(x_in, weight, bias, scale, shift, groups);
  const at::Tensor x = x_in.contiguous(kept_layout(x_in, false));
  const auto stat_dtype = opmath_dtype(x.scalar_type());
  at::Tensor y = at::empty_like(x, p.channels_last ? at::MemoryFormat::ChannelsLast
                                                   : at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({p.N, p.G}, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({p.N, p.G}, x.options().dtype(stat_dtype));
  if (x.numel() == 0) return {y, mean.zero_(), rstd.fill_(1.0 / std::sqrt(eps))};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupnorm_silu_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto prm = gather_params<acc_t>(p, weight, bias, scale, shift);
    forward_impl<scalar_t, acc_t>(p, x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                  mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
                                  prm, eps, activation);
  });
  return {y, mean, rstd};
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t, typename acc_t>
void backward_impl(const Problem& p, const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                   const acc_t* mean, const acc_t* rstd, const Params<acc_t>& prm, bool activation,
                   acc_t* T1, acc_t* T2 /* [N, C] outputs of pass 1 */) {
  const int64_t M = p.cpg * p.HW;
  // Per-(n, c) coefficients: a = A x + B, xhat = P x + Q.
  auto coeffs = [&](int64_t n, int64_t c, acc_t& A, acc_t& B, acc_t& P, acc_t& Q) {
    const int64_t ng = n * p.G + c / p.cpg, nc = n * p.C + c;
    P = rstd[ng];
    Q = -mean[ng] * rstd[ng];
    A = P * prm.w[c] * prm.s1[nc];
    B = (Q * prm.w[c] + prm.b[c]) * prm.s1[nc] + prm.sh[nc];
  };
  // dx = rstd * (k g - c1 - xhat c2) = K g + L x + M with K = rstd k, L = -rstd^2 c2,
  // M = -rstd c1 + rstd^2 mean c2.
  auto group_consts = [&](int64_t n, int64_t g, acc_t& c1, acc_t& c2) {
    acc_t s1 = 0, s2 = 0;
    for (int64_t cl = 0; cl < p.cpg; ++cl) {
      const int64_t c = g * p.cpg + cl, nc = n * p.C + c;
      const acc_t k = prm.s1[nc] * prm.w[c];
      s1 += k * T1[nc];
      s2 += k * T2[nc];
    }
    c1 = s1 / M;
    c2 = s2 / M;
  };
  if (!p.channels_last) {
    at::parallel_for(0, p.N * p.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / p.G, g = ng % p.G;
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t c = g * p.cpg + cl, off = (n * p.C + c) * p.HW;
          acc_t A, B, P, Q;
          coeffs(n, c, A, B, P, Q);
          T1[n * p.C + c] = 0;
          T2[n * p.C + c] = 0;
          bwd_sums_run(dy + off, x + off, p.HW, A, B, P, Q, activation, T1[n * p.C + c], T2[n * p.C + c]);
        }
        acc_t c1, c2;
        group_consts(n, g, c1, c2);
        const acc_t r = rstd[ng];
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t c = g * p.cpg + cl, off = (n * p.C + c) * p.HW;
          acc_t A, B, P, Q;
          coeffs(n, c, A, B, P, Q);
          const acc_t K = r * prm.s1[n * p.C + c] * prm.w[c];
          const acc_t L = -r * r * c2, Mc = -r * c1 + r * r * mean[ng] * c2;
          bwd_dx_run(dy + off, x + off, dx + off, p.HW, A, B, K, L, Mc, activation);
        }
      }
    });
    return;
  }
  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> A(p.C), B(p.C), P(p.C), Q(p.C), K(p.C), L(p.C), Mv(p.C);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < p.C; ++c) coeffs(n, c, A[c], B[c], P[c], Q[c]);
      acc_t* t1 = T1 + n * p.C;
      acc_t* t2 = T2 + n * p.C;
      std::fill(t1, t1 + p.C, acc_t(0));
      std::fill(t2, t2 + p.C, acc_t(0));
      const int64_t base = n * p.HW * p.C;
      for (int64_t hw = 0; hw < p.HW; ++hw)
        bwd_sums_row(dy + base + hw * p.C, x + base + hw * p.C, p.C, A.data(), B.data(), P.data(),
                     Q.data(), activation, t1, t2);
      for (int64_t g = 0; g < p.G; ++g) {
        acc_t c1, c2;
        group_consts(n, g, c1, c2);
        const acc_t r = rstd[n * p.G + g];
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t c = g * p.cpg + cl;
          K[c] = r * prm.s1[n * p.C + c] * prm.w[c];
          L[c] = -r * r * c2;
          Mv[c] = -r * c1 + r * r * mean[n * p.G + g] * c2;
        }
      }
      for (int64_t hw = 0; hw < p.HW; ++hw)
        bwd_dx_row(dy + base + hw * p.C, x + base + hw * p.C, dx + base + hw * p.C, p.C, A.data(),
                   B.data(), K.data(), L.data(), Mv.data(), activation);
    }
  });
}

// The parameter gradients from the per-(n, c) sums T1 = sum_hw g, T2 = sum_hw g xhat ([N, C],
// accumulation dtype), the formulas of param_grads in cmkernels/ops/groupnorm_silu/epilogue.py:
//   dweight = sum_n (1 + scale) T2,  dbias = sum_n (1 + scale) T1,  dscale = w T2 + b T1,
//   dshift = T1; empty tensors for an absent scale / shift.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> param_grads(
    const at::Tensor& T1, const at::Tensor& T2, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  const auto acc = T1.scalar_type();
  const at::Tensor w = weight.to(acc), b = bias.to(acc);
  const at::Tensor s1 = scale ? scale->reshape(T1.sizes()).to(acc) + 1 : at::Tensor();
  at::Tensor grad_weight = (scale ? s1 * T2 : T2).sum(0).to(weight.scalar_type());
  at::Tensor grad_bias = (scale ? s1 * T1 : T1).sum(0).to(bias.scalar_type());
  at::Tensor grad_scale = scale ? (w * T2 + b * T1).to(scale->scalar_type()).reshape(scale->sizes())
                                : at::empty({0}, weight.options());
  at::Tensor grad_shift = shift ? T1.to(shift->scalar_type()).reshape(shift->sizes())
                                : at::empty({0}, weight.options());
  return {grad_weight, grad_bias, grad_scale, grad_shift};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t groups, bool activation) {
  const Problem p =
      check_backward_inputs(grad_y, x_in, weight, bias, scale, shift, mean, rstd, groups);
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor dy = grad_y.contiguous(fmt);
  const auto acc = opmath_dtype(x.scalar_type());
  at::Tensor mean_c = mean.to(acc).contiguous(), rstd_c = rstd.to(acc).contiguous();
  at::Tensor dx = at::empty_like(x, fmt);
  at::Tensor T1 = at::zeros({p.N, p.C}, x.options().dtype(acc));
  at::Tensor T2 = at::zeros({p.N, p.C}, x.options().dtype(acc));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupnorm_silu_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      auto prm = gather_params<acc_t>(p, weight, bias, scale, shift);
      backward_impl<scalar_t, acc_t>(p, dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                     dx.mutable_data_ptr<scalar_t>(), mean_c.const_data_ptr<acc_t>(),
                                     rstd_c.const_data_ptr<acc_t>(), prm, activation,
                                     T1.mutable_data_ptr<acc_t>(), T2.mutable_data_ptr<acc_t>());
    });
  }
  const auto [grad_weight, grad_bias, grad_scale, grad_shift] =
      param_grads(T1, T2, weight, bias, scale, shift);
  return {dx, grad_weight, grad_bias, grad_scale, grad_shift};
}

// ---------------------------------------------------------------------------------------------
// Forward-mode AD: y and its tangent y' in one call (groupnorm_silu_jvp).
//
// For a group with mean m, rstd r, n = (x - m) r, and tangents x', w', b', s' (of scale), sh':
//   mean(x') = mu_t,  cov = mean((x - m) x')                  (over the group)
//   n' = r (x' - mu_t - n r cov)
//   h  = (n w + b) s1 + sh = A x + B                           (s1 = 1 + scale; the forward's)
//   h' = s1 (w n' + w' n + b') + s' (w n + b) + sh' = D x' + E (x - m) + F,  per (n, c):
//     D = s1 w r,  E = (s1 w' + s' w) r - s1 w r^3 cov,  F = s1 (b' - w r mu_t) + s' b + sh'
//   y  = silu(h),  y' = silu'(h) h',  silu'(h) = s (1 + h (1 - s)), s = sigmoid(h).
// The statistics come from shifted sums (pivot p, the group's first element):
//   sum(x - p), sum((x - p)^2), sum x', sum (x - p) x'  ->  cov = sum((x - p) x') / M - (m - p) mu_t.

// (silu(a), silu'(a)): silu(a) rounded exactly as cpu_math.h's silu() rounds it (the same t, the
// same division), so y is the forward's to the bit.
CMK_INLINE float silu_jvp(float a, float& ds) {
  const int32_t abits = std::bit_cast<int32_t>(a) & 0x7fffffff;
  const float m = std::bit_cast<float>(abits < 0x42ae0000 ? abits : 0x42ae0000);  // min(|a|, 87)
  const float t = exp_nonpositive(-m);
  const float d = 1.0f + t;
  const float inv = 1.0f / d;
  const bool pos = a >= 0.0f;
  const float s = (pos ? 1.0f : t) * inv;    // sigmoid(a)
  const float oms = (pos ? t : 1.0f) * inv;  // 1 - sigmoid(a), without the cancellation
  ds = s * (1.0f + a * oms);
  return (pos ? a : a * t) / d;
}
CMK_INLINE double silu_jvp(double a, double& ds) {
  const double s = sigmoid(a);
  ds = s * (1.0 + a * (1.0 - s));
  return a * s;  // silu(double)
}

// y = act(h); returns y' = act'(h) h'.
template <bool ACT, typename acc_t>
CMK_INLINE acc_t act_jvp(acc_t h, acc_t ht, acc_t& y) {
  if constexpr (!ACT) {
    y = h;
    return ht;
  } else {
    acc_t ds;
    y = silu_jvp(h, ds);
    return ds * ht;
  }
}

// Four shifted sums of a contiguous run of x and x' (double across blocks, acc_t within short
// blocks, as shifted_sums does for the first two).
template <typename scalar_t, typename acc_t>
CMK_INLINE void jvp_sums(const scalar_t* x, const scalar_t* tx, int64_t n, acc_t pivot, double& s,
                         double& ss, double& st, double& sxt) {
  constexpr int64_t kBlock = 256;
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = std::min(n, i0 + kBlock);
    acc_t bs = 0, bss = 0, bt = 0, bxt = 0;
#pragma omp simd reduction(+ : bs, bss, bt, bxt)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t v = static_cast<acc_t>(x[i]) - pivot;
      const acc_t t = static_cast<acc_t>(tx[i]);
      bs += v;
      bss += v * v;
      bt += t;
      bxt += v * t;
    }
    s += bs;
    ss += bss;
    st += bt;
    sxt += bxt;
  }
}

// Per-(n, c) coefficients of the output pass: h = A x + B, h' = D x' + E (x - m) + F.
template <typename acc_t>
struct JvpCoeffs {
  acc_t A, B, D, E, F, m;
};

// NCHW output pass over a contiguous run of one channel (tx may be null: no x' term).
template <bool ACT, bool TX, typename scalar_t, typename acc_t>
CMK_INLINE void jvp_run_t(const scalar_t* x, const scalar_t* tx, scalar_t* y, scalar_t* ty,
                          int64_t n, JvpCoeffs<acc_t> k) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t h = k.A * xv + k.B;
    acc_t ht = k.E * (xv - k.m) + k.F;
    if constexpr (TX) ht += k.D * static_cast<acc_t>(tx[i]);
    acc_t yv;
    const acc_t tv = act_jvp<ACT>(h, ht, yv);
    y[i] = static_cast<scalar_t>(yv);
    ty[i] = static_cast<scalar_t>(tv);
  }
}

// NHWC output pass over the C channels of one pixel; per-channel coefficient arrays.
template <bool ACT, bool TX, typename scalar_t, typename acc_t>
CMK_INLINE void jvp_row_t(const scalar_t* x, const scalar_t* tx, scalar_t* y, scalar_t* ty,
                          int64_t C, const acc_t* A, const acc_t* B, const acc_t* D,
                          const acc_t* E, const acc_t* F, const acc_t* m) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t h = A[c] * xv + B[c];
    acc_t ht = E[c] * (xv - m[c]) + F[c];
    if constexpr (TX) ht += D[c] * static_cast<acc_t>(tx[c]);
    acc_t yv;
    const acc_t tv = act_jvp<ACT>(h, ht, yv);
    y[c] = static_cast<scalar_t>(yv);
    ty[c] = static_cast<scalar_t>(tv);
  }
}

// Runtime flags -> template arguments.
template <typename scalar_t, typename acc_t>
CMK_INLINE void jvp_run(const scalar_t* x, const scalar_t* tx, scalar_t* y, scalar_t* ty,
                        int64_t n, JvpCoeffs<acc_t> k, bool act) {
  if (act) {
    if (tx) jvp_run_t<true, true>(x, tx, y, ty, n, k);
    else jvp_run_t<true, false>(x, tx, y, ty, n, k);
  } else {
    if (tx) jvp_run_t<false, true>(x, tx, y, ty, n, k);
    else jvp_run_t<false, false>(x, tx, y, ty, n, k);
  }
}
template <typename scalar_t, typename acc_t>
CMK_INLINE void jvp_row(const scalar_t* x, const scalar_t* tx, scalar_t* y, scalar_t* ty,
                        int64_t C, const acc_t* A, const acc_t* B, const acc_t* D, const acc_t* E,
                        const acc_t* F, const acc_t* m, bool act) {
  if (act) {
    if (tx) jvp_row_t<true, true>(x, tx, y, ty, C, A, B, D, E, F, m);
    else jvp_row_t<true, false>(x, tx, y, ty, C, A, B, D, E, F, m);
  } else {
    if (tx) jvp_row_t<false, true>(x, tx, y, ty, C, A, B, D, E, F, m);
    else jvp_row_t<false, false>(x, tx, y, ty, C, A, B, D, E, F, m);
  }
}

// fp32 entry points (baseline / AVX2), as for the forward; with the activation on, the AVX2 code
// computes y with silu8's exact steps, so it matches the forward's AVX2 output to the bit.
CMK_DISPATCHED(jvp_sums,
               (const float* x, const float* tx, int64_t n, float p, double& s, double& ss,
                double& st, double& sxt),
               (x, tx, n, p, s, ss, st, sxt), (jvp_sums<float, float>(x, tx, n, p, s, ss, st, sxt)))
#if CMK_HAVE_AVX2_PATH
// (silu(a), silu'(a)) for 8 floats. t = exp(-a) by silu8's own exp_neg8 (cpu_math.h; a test
// compares y with the forward's bit for bit), then y = a / (1 + t) as silu8 returns
// it, s = 1 / (1 + t) and silu'(a) = s (1 + a (1 - s)) = s (1 + t y) (1 - s = t s, a s = y).
CMK_TARGET_AVX2 CMK_INLINE __m256 silu_jvp8(__m256 a, __m256& ds) {
  const __m256 t = exp_neg8(a);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 d = _mm256_add_ps(one, t);
  const __m256 y = _mm256_div_ps(a, d);
  const __m256 s = _mm256_div_ps(one, d);
  ds = _mm256_mul_ps(s, _mm256_fmadd_ps(t, y, one));
  return y;
}

CMK_TARGET_AVX2 static void jvp_run_f32_avx2(const float* x, const float* tx, float* y, float* ty,
                                             int64_t n, JvpCoeffs<float> k, bool act) {
  if (!act) return jvp_run<float, float>(x, tx, y, ty, n, k, act);
  const __m256 va = _mm256_set1_ps(k.A), vb = _mm256_set1_ps(k.B), vd = _mm256_set1_ps(k.D);
  const __m256 ve = _mm256_set1_ps(k.E), vf = _mm256_set1_ps(k.F), vm = _mm256_set1_ps(k.m);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    const __m256 h = _mm256_fmadd_ps(va, xv, vb);
    __m256 ht = _mm256_fmadd_ps(ve, _mm256_sub_ps(xv, vm), vf);
    if (tx) ht = _mm256_fmadd_ps(vd, _mm256_loadu_ps(tx + i), ht);
    __m256 ds;
    _mm256_storeu_ps(y + i, silu_jvp8(h, ds));
    _mm256_storeu_ps(ty + i, _mm256_mul_ps(ds, ht));
  }
  jvp_run<float, float>(x + i, tx ? tx + i : nullptr, y + i, ty + i, n - i, k, act);
}

CMK_TARGET_AVX2 static void jvp_row_f32_avx2(const float* x, const float* tx, float* y, float* ty,
                                             int64_t C, const float* A, const float* B,
                                             const float* D, const float* E, const float* F,
                                             const float* m, bool act) {
  if (!act) return jvp_row<float, float>(x, tx, y, ty, C, A, B, D, E, F, m, act);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 xv = _mm256_loadu_ps(x + c);
    const __m256 h = _mm256_fmadd_ps(_mm256_loadu_ps(A + c), xv, _mm256_loadu_ps(B + c));
    __m256 ht = _mm256_fmadd_ps(_mm256_loadu_ps(E + c), _mm256_sub_ps(xv, _mm256_loadu_ps(m + c)),
                                _mm256_loadu_ps(F + c));
    if (tx) ht = _mm256_fmadd_ps(_mm256_loadu_ps(D + c), _mm256_loadu_ps(tx + c), ht);
    __m256 ds;
    _mm256_storeu_ps(y + c, silu_jvp8(h, ds));
    _mm256_storeu_ps(ty + c, _mm256_mul_ps(ds, ht));
  }
  jvp_row<float, float>(x + c, tx ? tx + c : nullptr, y + c, ty + c, C - c, A + c, B + c, D + c,
                        E + c, F + c, m + c, act);
}

static void jvp_run(const float* x, const float* tx, float* y, float* ty, int64_t n,
                    JvpCoeffs<float> k, bool act) {
  if (cpu_has_avx2()) jvp_run_f32_avx2(x, tx, y, ty, n, k, act);
  else jvp_run<float, float>(x, tx, y, ty, n, k, act);
}
static void jvp_row(const float* x, const float* tx, float* y, float* ty, int64_t C,
                    const float* A, const float* B, const float* D, const float* E,
                    const float* F, const float* m, bool act) {
  if (cpu_has_avx2()) jvp_row_f32_avx2(x, tx, y, ty, C, A, B, D, E, F, m, act);
  else jvp_row<float, float>(x, tx, y, ty, C, A, B, D, E, F, m, act);
}
#else
CMK_DISPATCHED(jvp_run,
               (const float* x, const float* tx, float* y, float* ty, int64_t n,
                JvpCoeffs<float> k, bool act),
               (x, tx, y, ty, n, k, act), (jvp_run<float, float>(x, tx, y, ty, n, k, act)))
CMK_DISPATCHED(jvp_row,
               (const float* x, const float* tx, float* y, float* ty, int64_t C, const float* A,
                const float* B, const float* D, const float* E, const float* F, const float* m,
                bool act),
               (x, tx, y, ty, C, A, B, D, E, F, m, act),
               (jvp_row<float, float>(x, tx, y, ty, C, A, B, D, E, F, m, act)))
#endif

// The rules of check_jvp_inputs in cmkernels/ops/groupnorm_silu/checks.py: the forward's on the
// primals; tx with x's shape, dtype and device; each parameter tangent given only with its primal
// and following its primal's rule.
Problem check_jvp_inputs(const at::Tensor& x, const std::optional<at::Tensor>& tx,
                         const at::Tensor& weight, const std::optional<at::Tensor>& tweight,
                         const at::Tensor& bias, const std::optional<at::Tensor>& tbias,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& tscale,
                         const std::optional<at::Tensor>& shift,
                         const std::optional<at::Tensor>& tshift, int64_t groups) {
  const Problem p = check_inputs(x, weight, bias, scale, shift, groups);
  constexpr const char* op = "groupnorm_silu_jvp";
  if (tx) {
    TORCH_CHECK_VALUE(tx->sizes() == x.sizes(), op, ": tx has shape ", tx->sizes(),
                      " but x has shape ", x.sizes());
    TORCH_CHECK_TYPE(tx->scalar_type() == x.scalar_type(), op, ": tx has dtype ",
                     dtype_name(tx->scalar_type()), " but x has dtype ",
                     dtype_name(x.scalar_type()));
    TORCH_CHECK_VALUE(tx->device() == x.device(), op, ": tx is on ", tx->device(),
                      " but x is on ", x.device());
  }
  const auto per_sample = per_sample_shapes(x);
  const std::vector<std::vector<int64_t>> per_channel = {{x.size(1)}};
  struct Entry {
    const char* name;
    const std::optional<at::Tensor>* tangent;
    bool has_primal;
    const std::vector<std::vector<int64_t>>* shapes;
  };
  for (const Entry& e : {Entry{"weight", &tweight, true, &per_channel},
                         Entry{"bias", &tbias, true, &per_channel},
                         Entry{"scale", &tscale, scale.has_value(), &per_sample},
                         Entry{"shift", &tshift, shift.has_value(), &per_sample}}) {
    if (!e.tangent->has_value()) continue;
    TORCH_CHECK_VALUE(e.has_primal, op, ": t", e.name, " is given but ", e.name, " is None");
    check_param(**e.tangent, (std::string("t") + e.name).c_str(), x, *e.shapes, op);
  }
  return p;
}

// The tangents of the parameters in accumulation precision, zeros where absent: w', b' [C];
// s' (of scale), sh' [N, C].
template <typename acc_t>
struct ParamTangents {
  std::vector<acc_t> w, b, s, sh;
};

template <typename acc_t>
ParamTangents<acc_t> gather_tangents(const Problem& p, const std::optional<at::Tensor>& tweight,
                                     const std::optional<at::Tensor>& tbias,
                                     const std::optional<at::Tensor>& tscale,
                                     const std::optional<at::Tensor>& tshift) {
  const auto dt = c10::CppTypeToScalarType<acc_t>::value;
  auto vec = [&](const std::optional<at::Tensor>& t, int64_t n) -> std::vector<acc_t> {
    if (!t) return std::vector<acc_t>(n, acc_t(0));
    auto c = t->detach().to(dt).contiguous();
    const acc_t* ptr = c.template const_data_ptr<acc_t>();
    return std::vector<acc_t>(ptr, ptr + c.numel());
  };
  return {vec(tweight, p.C), vec(tbias, p.C), vec(tscale, p.N * p.C), vec(tshift, p.N * p.C)};
}

template <typename scalar_t, typename acc_t>
void jvp_impl(const Problem& p, const scalar_t* x, const scalar_t* tx /* may be null */,
              scalar_t* y, scalar_t* ty, acc_t* mean_out, acc_t* rstd_out,
              const Params<acc_t>& prm, const ParamTangents<acc_t>& tan, double eps,
              bool activation) {
  const int64_t M = p.cpg * p.HW;  // elements per group
  // The group's statistics from its four shifted sums (s, ss as the forward computes them).
  auto group_stats = [&](double s, double ss, double st, double sxt, acc_t pivot, acc_t& mean,
                         acc_t& rstd, acc_t& mu_t, acc_t& r3cov) {
    const double m = s / M, var = std::max(ss / M - m * m, 0.0);
    mean = static_cast<acc_t>(pivot + m);
    rstd = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
    const double mt = st / M, cov = sxt / M - m * mt;
    const double r = static_cast<double>(rstd);
    mu_t = static_cast<acc_t>(mt);
    r3cov = static_cast<acc_t>(r * r * r * cov);
  };
  auto coeffs = [&](int64_t n, int64_t c, acc_t mean, acc_t rstd, acc_t mu_t, acc_t r3cov) {
    const int64_t nc = n * p.C + c;
    const acc_t w = prm.w[c], s1 = prm.s1[nc];
    JvpCoeffs<acc_t> k;
    k.A = rstd * prm.w[c] * prm.s1[nc];  // A, B: the forward's expressions
    k.B = (prm.b[c] - mean * rstd * prm.w[c]) * prm.s1[nc] + prm.sh[nc];
    k.D = s1 * w * rstd;
    k.E = (s1 * tan.w[c] + tan.s[nc] * w) * rstd - s1 * w * r3cov;
    k.F = s1 * (tan.b[c] - w * rstd * mu_t) + tan.s[nc] * prm.b[c] + tan.sh[nc];
    k.m = mean;
    return k;
  };
  if (!p.channels_last) {
    at::parallel_for(0, p.N * p.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / p.G, g = ng % p.G;
        const scalar_t* xg = x + ng * M;
        const scalar_t* txg = tx ? tx + ng * M : nullptr;
        double s = 0, ss = 0, st = 0, sxt = 0;
        const acc_t pivot = M > 0 ? static_cast<acc_t>(xg[0]) : acc_t(0);
        if (txg) jvp_sums(xg, txg, M, pivot, s, ss, st, sxt);
        else shifted_sums(xg, M, pivot, s, ss);
        acc_t mean, rstd, mu_t, r3cov;
        group_stats(s, ss, st, sxt, pivot, mean, rstd, mu_t, r3cov);
        mean_out[ng] = mean;
        rstd_out[ng] = rstd;
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t off = ng * M + cl * p.HW;
          jvp_run(x + off, txg ? tx + off : nullptr, y + off, ty + off, p.HW,
                  coeffs(n, g * p.cpg + cl, mean, rstd, mu_t, r3cov), activation);
        }
      }
    });
    return;
  }
  // NHWC: per sample, channel sums over pixels, then group statistics, then one output pass.
  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> cs(p.C), css(p.C), cst(p.C), csxt(p.C);
    std::vector<acc_t> A(p.C), B(p.C), D(p.C), E(p.C), F(p.C), Mc(p.C), pivot(p.C);
    std::vector<acc_t> bs(p.C), bss(p.C), bt(p.C), bxt(p.C);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* xn = x + n * p.HW * p.C;
      const scalar_t* txn = tx ? tx + n * p.HW * p.C : nullptr;
      for (auto* v : {&cs, &css, &cst, &csxt}) std::fill(v->begin(), v->end(), 0.0);
      for (int64_t g = 0; g < p.G; ++g)  // one pivot per group: its first element
        for (int64_t cl = 0; cl < p.cpg; ++cl)
          pivot[g * p.cpg + cl] = p.HW ? static_cast<acc_t>(xn[g * p.cpg]) : acc_t(0);
      constexpr int64_t kRows = 64;  // acc_t partial sums over short row blocks
      for (int64_t h0 = 0; h0 < p.HW; h0 += kRows) {
        for (auto* v : {&bs, &bss, &bt, &bxt}) std::fill(v->begin(), v->end(), acc_t(0));
        const int64_t h1 = std::min(p.HW, h0 + kRows);
        for (int64_t hw = h0; hw < h1; ++hw) {
          const scalar_t* row = xn + hw * p.C;
          if (txn) {
            const scalar_t* trow = txn + hw * p.C;
#pragma omp simd
            for (int64_t c = 0; c < p.C; ++c) {
              const acc_t v = static_cast<acc_t>(row[c]) - pivot[c];
              const acc_t t = static_cast<acc_t>(trow[c]);
              bs[c] += v;
              bss[c] += v * v;
              bt[c] += t;
              bxt[c] += v * t;
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < p.C; ++c) {
              const acc_t v = static_cast<acc_t>(row[c]) - pivot[c];
              bs[c] += v;
              bss[c] += v * v;
            }
          }
        }
        for (int64_t c = 0; c < p.C; ++c) {
          cs[c] += bs[c];
          css[c] += bss[c];
          cst[c] += bt[c];
          csxt[c] += bxt[c];
        }
      }
      for (int64_t g = 0; g < p.G; ++g) {
        double s = 0, ss = 0, st = 0, sxt = 0;
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t c = g * p.cpg + cl;
          s += cs[c];
          ss += css[c];
          st += cst[c];
          sxt += csxt[c];
        }
        acc_t mean, rstd, mu_t, r3cov;
        group_stats(s, ss, st, sxt, pivot[g * p.cpg], mean, rstd, mu_t, r3cov);
        mean_out[n * p.G + g] = mean;
        rstd_out[n * p.G + g] = rstd;
        for (int64_t cl = 0; cl < p.cpg; ++cl) {
          const int64_t c = g * p.cpg + cl;
          const JvpCoeffs<acc_t> k = coeffs(n, c, mean, rstd, mu_t, r3cov);
          A[c] = k.A;
          B[c] = k.B;
          D[c] = k.D;
          E[c] = k.E;
          F[c] = k.F;
          Mc[c] = k.m;
        }
      }
      for (int64_t hw = 0; hw < p.HW; ++hw) {
        const int64_t off = (n * p.HW + hw) * p.C;
        jvp_row(x + off, txn ? tx + off : nullptr, y + off, ty + off, p.C, A.data(), B.data(),
                D.data(), E.data(), F.data(), Mc.data(), activation);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> groupnorm_silu_jvp_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& tx_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& tweight, const at::Tensor& bias,
    const std::optional<at::Tensor>& tbias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& tscale, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& tshift, int64_t groups, double eps, bool activation) {
  const Problem p = check_jvp_inputs(x_in, tx_in, weight, tweight, bias, tbias, scale, tscale,
                                     shift, tshift, groups);
  const auto fmt = p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor tx = tx_in ? tx_in->contiguous(fmt) : at::Tensor();  // in x's layout
  const auto stat_dtype = opmath_dtype(x.scalar_type());
  at::Tensor y = at::empty_like(x, fmt);
  at::Tensor ty = at::empty_like(x, fmt);
  at::Tensor mean = at::empty({p.N, p.G}, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({p.N, p.G}, x.options().dtype(stat_dtype));
  if (x.numel() == 0) return {y, ty, mean.zero_(), rstd.fill_(1.0 / std::sqrt(eps))};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "groupnorm_silu_jvp_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto prm = gather_params<acc_t>(p, weight, bias, scale, shift);
    const auto tan = gather_tangents<acc_t>(p, tweight, tbias, tscale, tshift);
    jvp_impl<scalar_t, acc_t>(p, x.const_data_ptr<scalar_t>(),
                              tx.defined() ? tx.const_data_ptr<scalar_t>() : nullptr,
                              y.mutable_data_ptr<scalar_t>(), ty.mutable_data_ptr<scalar_t>(),
                              mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), prm,
                              tan, eps, activation);
  });
  return {y, ty, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(cmkernels, CPU, m) {
  m.impl("groupnorm_silu", &groupnorm_silu_cpu);
  m.impl("groupnorm_silu_backward", &groupnorm_silu_backward_cpu);
  m.impl("groupnorm_silu_jvp", &groupnorm_silu_jvp_cpu);
}

}  // namespace cmkernels
