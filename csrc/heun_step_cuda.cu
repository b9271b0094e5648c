// CUDA kernels of heun_step1 / heun_step2, the EDM Heun step's elementwise stages. The math and
// the argument rules are those of heun_step_cpu.cpp; the checks themselves are shared
// (heun_step.h).
//
// A 2-d grid, y = sample (its constants 1/t, h, ... computed once, in double), x = a grid-stride
// loop over that sample's run with 16-byte loads where every pointer is aligned and the sample
// length is a multiple of the vector width; scalar loads otherwise.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "cuda_utils.cuh"
#include "heun_step.h"

namespace cmkernels {
namespace {

__device__ __forceinline__ double load_t(const void* t, bool t_double, int64_t b) {
  return t_double ? static_cast<const double*>(t)[b] : double(static_cast<const float*>(t)[b]);
}

// Stage 1: d = (x - D) / t, x1 = x + h d.
template <int VEC, typename x_t, typename d_t, typename acc_t>
__global__ void heun_step1_kernel(const x_t* __restrict__ x,   // [B, S] flat
                                  const d_t* __restrict__ D,   // [B, S] network output
                                  x_t* __restrict__ x1,        // [B, S] out: Euler predictor
                                  x_t* __restrict__ d,         // [B, S] out: slope at t
                                  const void* t,               // [B] fp32 / fp64
                                  const void* t_next,          // [B]
                                  bool t_double,               // t, t_next are fp64
                                  int64_t B,                   // samples
                                  int64_t S) {                 // elements per sample
  const int64_t nvec = S / VEC, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const double tb = load_t(t, t_double, b), tn = load_t(t_next, t_double, b);
    const acc_t inv_t = acc_t(1.0 / tb), h = acc_t(tn - tb);
    const int64_t base = b * S;
    for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < nvec; v += stride) {
      const int64_t i = base + v * VEC;
      const auto xv = *reinterpret_cast<const Pack<x_t, VEC>*>(x + i);
      const auto Dv = *reinterpret_cast<const Pack<d_t, VEC>*>(D + i);
      Pack<x_t, VEC> o1, od;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t xa = acc_t(xv.v[j]);
        const acc_t dv = (xa - acc_t(Dv.v[j])) * inv_t;
        od.v[j] = x_t(dv);
        o1.v[j] = x_t(xa + h * dv);
      }
      *reinterpret_cast<Pack<x_t, VEC>*>(x1 + i) = o1;
      *reinterpret_cast<Pack<x_t, VEC>*>(d + i) = od;
    }
  }
}

// Stage 2: x' = x + a d + b (x1 - D1), a = h / 2, b = h / (2 t').
template <int VEC, typename x_t, typename d_t, typename acc_t>
__global__ void heun_step2_kernel(const x_t* __restrict__ x,    // [B, S] state at t
                                  const x_t* __restrict__ d,    // [B, S] slope at t (stage 1)
                                  const x_t* __restrict__ x1,   // [B, S] Euler predictor
                                  const d_t* __restrict__ D1,   // [B, S] network output at x1
                                  x_t* __restrict__ out,        // [B, S] out: state at t'
                                  const void* t,                // [B]
                                  const void* t_next,           // [B]
                                  bool t_double,
                                  int64_t B,
                                  int64_t S) {
  const int64_t nvec = S / VEC, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const double tb = load_t(t, t_double, b), tn = load_t(t_next, t_double, b);
    const acc_t ca = acc_t(0.5 * (tn - tb)), cb = acc_t(0.5 * (tn - tb) / tn);
    const int64_t base = b * S;
    for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < nvec; v += stride) {
      const int64_t i = base + v * VEC;
      const auto xv = *reinterpret_cast<const Pack<x_t, VEC>*>(x + i);
      const auto dv = *reinterpret_cast<const Pack<x_t, VEC>*>(d + i);
      const auto x1v = *reinterpret_cast<const Pack<x_t, VEC>*>(x1 + i);
      const auto Dv = *reinterpret_cast<const Pack<d_t, VEC>*>(D1 + i);
      Pack<x_t, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        o.v[j] = x_t(acc_t(xv.v[j]) + ca * acc_t(dv.v[j]) + cb * (acc_t(x1v.v[j]) - acc_t(Dv.v[j])));
      *reinterpret_cast<Pack<x_t, VEC>*>(out + i) = o;
    }
  }
}

constexpr int kHeunThreads = 256;

// (grid, VEC use) for B samples of S elements: enough blocks to fill the GPU, the rest by strides.
dim3 heun_grid(int64_t B, int64_t S, int vec) {
  const int64_t gy = std::min<int64_t>(B, 65535);
  const int64_t want = std::max<int64_t>(1, (int64_t(sm_count()) * 2048 / kHeunThreads) / gy);
  const int64_t need = (S / vec + kHeunThreads - 1) / kHeunThreads;
  return dim3(unsigned(std::max<int64_t>(1, std::min(want, need))), unsigned(gy));
}

// Launches launch(std::integral_constant<int, V>, grid) with V = VEC where vec (every pointer
// aligned, S a multiple of VEC), else V = 1 (scalar loads), on a grid for B samples of S elements.
template <int VEC, typename Launch>
void launch_heun(bool vec, int64_t B, int64_t S, Launch&& launch) {
  if (vec) {
    launch(std::integral_constant<int, VEC>{}, heun_grid(B, S, VEC));
  } else {
    launch(std::integral_constant<int, 1>{}, heun_grid(B, S, 1));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> heun_step1_cuda(const at::Tensor& x_in, const at::Tensor& denoised,
                                                   const at::Tensor& t_in, const at::Tensor& tn_in) {
  heun_check("heun_step1", x_in, {}, denoised, t_in, tn_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = kept_layout(x_in);
  const at::Tensor x = x_in.contiguous(fmt), D = denoised.contiguous(fmt);
  const at::Tensor t = t_in.contiguous(), tn = tn_in.contiguous();
  at::Tensor x1 = at::empty_like(x, fmt), d = at::empty_like(x, fmt);
  const int64_t B = x.size(0), S = B ? x.numel() / B : 0;
  if (x.numel() == 0) return {x1, d};
  const bool t_double = t.scalar_type() == at::kDouble;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto xd = x.scalar_type(), dd = D.scalar_type();
  visit_heun_dtypes(xd, dd, "heun_step1", [&](auto xt, auto dt, auto acc) {
    using x_t = typename decltype(xt)::type;
    using d_t = typename decltype(dt)::type;
    using acc_t = typename decltype(acc)::type;
    constexpr int VEC = 16 / sizeof(x_t);
    const x_t* xp = x.const_data_ptr<x_t>();
    const d_t* Dp = D.const_data_ptr<d_t>();
    x_t* x1p = x1.mutable_data_ptr<x_t>();
    x_t* dp = d.mutable_data_ptr<x_t>();
    const bool vec = S % VEC == 0 && all_aligned<VEC>(xp, Dp, x1p, dp);
    launch_heun<VEC>(vec, B, S, [&](auto v, dim3 grid) {
      heun_step1_kernel<decltype(v)::value, x_t, d_t, acc_t><<<grid, kHeunThreads, 0, stream>>>(
          xp, Dp, x1p, dp, t.const_data_ptr(), tn.const_data_ptr(), t_double, B, S);
    });
  });
  return {x1, d};
}

at::Tensor heun_step2_cuda(const at::Tensor& x_in, const at::Tensor& d_in, const at::Tensor& x1_in,
                           const at::Tensor& denoised1, const at::Tensor& t_in,
                           const at::Tensor& tn_in) {
  heun_check("heun_step2", x_in, {d_in, x1_in}, denoised1, t_in, tn_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = kept_layout(x_in);
  const at::Tensor x = x_in.contiguous(fmt), d = d_in.contiguous(fmt), x1 = x1_in.contiguous(fmt),
                   D1 = denoised1.contiguous(fmt);
  const at::Tensor t = t_in.contiguous(), tn = tn_in.contiguous();
  at::Tensor out = at::empty_like(x, fmt);
  const int64_t B = x.size(0), S = B ? x.numel() / B : 0;
  if (x.numel() == 0) return out;
  const bool t_double = t.scalar_type() == at::kDouble;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto xd = x.scalar_type(), dd = D1.scalar_type();
  visit_heun_dtypes(xd, dd, "heun_step2", [&](auto xt, auto dt, auto acc) {
    using x_t = typename decltype(xt)::type;
    using d_t = typename decltype(dt)::type;
    using acc_t = typename decltype(acc)::type;
    constexpr int VEC = 16 / sizeof(x_t);
    const x_t* xp = x.const_data_ptr<x_t>();
    const x_t* dp = d.const_data_ptr<x_t>();
    const x_t* x1p = x1.const_data_ptr<x_t>();
    const d_t* D1p = D1.const_data_ptr<d_t>();
    x_t* op = out.mutable_data_ptr<x_t>();
    const bool vec = S % VEC == 0 && all_aligned<VEC>(xp, dp, x1p, D1p, op);
    launch_heun<VEC>(vec, B, S, [&](auto v, dim3 grid) {
      heun_step2_kernel<decltype(v)::value, x_t, d_t, acc_t><<<grid, kHeunThreads, 0, stream>>>(
          xp, dp, x1p, D1p, op, t.const_data_ptr(), tn.const_data_ptr(), t_double, B, S);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cmkernels, CUDA, m) {
  m.impl("heun_step1", &heun_step1_cuda);
  m.impl("heun_step2", &heun_step2_cuda);
}

}  // namespace cmkernels
