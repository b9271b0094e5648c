"""One EDM Heun step (Karras et al. 2022, Algorithm 2 without churn), its elementwise parts fused.

A Heun step from t to t' (h = t' - t) evaluates the network twice; everything around the two
calls is elementwise, and eager PyTorch spends ~10 kernels on it. Here it is two ops:

  stage 1, after D = D(x, t):      d = (x - D) / t,  x1 = x + h d                 (Euler predictor)
  stage 2, after D1 = D(x1, t'):   x' = x + h (d + (x1 - D1) / t') / 2            (Heun corrector)

t and t' are per-sample [B] tensors (batched schedules). x, d, x1 share a dtype (fp32 / bf16 /
fp16, or fp64), D may be another one (a bf16 network output with an fp32 state); the arithmetic is
fp32 (fp64 for fp64) and the outputs take x's dtype.

Pieces:
- ``heun_step1_ref`` / ``heun_step2_ref``: pure-PyTorch references.
- ``check_inputs``: the argument rules, shared by the fake kernels and the fallbacks; the C++
  kernels (``heun_check`` in csrc/heun_step_cpu.cpp) enforce the same ones with the same error
  types and texts.
- ``heun_step1_fallback`` / ``heun_step2_fallback``: the kernels in PyTorch, used when the
  compiled extension is missing.
- ``torch.ops.cmkernels.heun_step1`` / ``heun_step2``: schemas in csrc/ops.cpp, CPU kernels in
  csrc/heun_step_cpu.cpp, CUDA kernels in csrc/heun_step_cuda.cu; fake kernels and autograd here.
- ``heun_step1`` / ``heun_step2``: the public entry points.

Layout: the outputs take x's layout when it is contiguous, channels_last or channels_last_3d
(the batch dimension outermost in all three); any other strides are copied to contiguous first,
and inputs whose layout differs from the one chosen are copied to it.

Backward (linear in the tensors; s = (x - D) / t recomputed in fp32 / fp64, g_* output grads):
  stage 1:  u = (h g_x1 + g_d) / t;  dx = g_x1 + u,  dD = -u,
            dt_b = -sum_b d (u + g_x1),  dt'_b = sum_b g_x1 d
  stage 2:  a = h / 2, e = (x1 - D1) / t';  dx = g, dd = a g, dx1 = a g / t', dD1 = -a g / t',
            dt_b = -sum_b g (d + e) / 2,  dt'_b = sum_b g ((d + e) / 2 - a e / t')
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import acc_dtype, dtype_str, has_tangent, kept_layout, shape_str
from cmkernels.ops.registry import define_op

SCHEMA1 = "(Tensor x, Tensor denoised, Tensor t, Tensor t_next) -> (Tensor, Tensor)"
SCHEMA2 = "(Tensor x, Tensor d, Tensor x1, Tensor denoised1, Tensor t, Tensor t_next) -> Tensor"

_STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DENOISED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_T_DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# References.


def _per_sample(t: Tensor, x: Tensor, dt: torch.dtype) -> Tensor:
    """t [B] as a [B, 1, ...] tensor that broadcasts against x."""
    return t.to(dt).reshape((-1,) + (1,) * (x.dim() - 1))


def heun_step1_ref(x: Tensor, denoised: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
    """Euler predictor: (x1, d) with d = (x - denoised) / t, x1 = x + (t_next - t) d; fp32 math."""
    dt = acc_dtype(x)
    tt, tn = _per_sample(t, x, dt), _per_sample(t_next, x, dt)
    d = (x.to(dt) - denoised.to(dt)) / tt  # Euler step.
    x1 = x.to(dt) + (tn - tt) * d
    return x1.to(x.dtype), d.to(x.dtype)


def heun_step2_ref(
    x: Tensor, d: Tensor, x1: Tensor, denoised1: Tensor, t: Tensor, t_next: Tensor
) -> Tensor:
    """Heun corrector: x + (t_next - t) (d + (x1 - denoised1) / t_next) / 2; fp32 math."""
    dt = acc_dtype(x)
    tt, tn = _per_sample(t, x, dt), _per_sample(t_next, x, dt)
    d_prime = (x1.to(dt) - denoised1.to(dt)) / tn  # Apply 2nd order correction.
    return (x.to(dt) + (tn - tt) * (0.5 * d.to(dt) + 0.5 * d_prime)).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Checks: the rules of heun_check in C++ (csrc/heun_step_cpu.cpp), in the same order, with the same
# error types and texts. The layout rule is kept_layout (x's own when it is contiguous,
# channels_last or channels_last_3d; else contiguous), as in C++.


def check_inputs(op: str, x: Tensor, states: dict, denoised: Tensor, t: Tensor, t_next: Tensor):
    """x [B, ...]; states (stage 2's d, x1): x's shape, dtype, device; denoised: x's shape and
    device, float32 / float16 / bfloat16 (float64 with float64 x); t, t_next: [B], one dtype,
    float32 or float64, on x's device."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [B, ...], got a 0-d tensor")
    if x.dtype not in _STATE_DTYPES:
        raise TypeError(
            f"{op}: x must be float32, float16, bfloat16 or float64, got {dtype_str(x.dtype)}"
        )
    for name, s in states.items():
        if s.shape != x.shape:
            raise ValueError(
                f"{op}: {name} has shape {shape_str(s)} but x has shape {shape_str(x)}"
            )
        if s.dtype != x.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {dtype_str(s.dtype)} but x has dtype "
                f"{dtype_str(x.dtype)} (they must match)"
            )
        if s.device != x.device:
            raise ValueError(f"{op}: {name} is on {s.device} but x is on {x.device}")
    if denoised.shape != x.shape:
        raise ValueError(
            f"{op}: denoised has shape {shape_str(denoised)} but x has shape {shape_str(x)}"
        )
    if denoised.device != x.device:
        raise ValueError(f"{op}: denoised is on {denoised.device} but x is on {x.device}")
    if x.dtype == torch.float64 and denoised.dtype != torch.float64:
        raise TypeError(
            f"{op}: denoised must be float64 when x is float64, got {dtype_str(denoised.dtype)}"
        )
    if x.dtype != torch.float64 and denoised.dtype not in _DENOISED_DTYPES:
        raise TypeError(
            f"{op}: denoised must be float32, float16 or bfloat16, got {dtype_str(denoised.dtype)}"
        )
    B = x.shape[0]
    for name, s in (("t", t), ("t_next", t_next)):
        if s.dim() != 1 or s.shape[0] != B:
            raise ValueError(
                f"{op}: {name} must have shape [B] = [{B}] (one value per sample), "
                f"got {shape_str(s)}"
            )
        if s.dtype not in _T_DTYPES:
            raise TypeError(f"{op}: {name} must be float32 or float64, got {dtype_str(s.dtype)}")
        if s.device != x.device:
            raise ValueError(f"{op}: {name} is on {s.device} but x is on {x.device}")
    if t.dtype != t_next.dtype:
        raise TypeError(
            f"{op}: t and t_next must have the same dtype, got {dtype_str(t.dtype)} and "
            f"{dtype_str(t_next.dtype)}"
        )


# ------------------------------------------------------------------------------------------------
# Registration: fallbacks (used when the compiled extension is missing), fake kernels, autograd.


def heun_step1_fallback(x, denoised, t, t_next):
    """Stage 1 in PyTorch (the reference, in the kernels' layout)."""
    check_inputs("heun_step1", x, {}, denoised, t, t_next)
    fmt = kept_layout(x)
    return tuple(o.contiguous(memory_format=fmt) for o in heun_step1_ref(x, denoised, t, t_next))


def heun_step2_fallback(x, d, x1, denoised1, t, t_next):
    """Stage 2 in PyTorch (the reference, in the kernels' layout)."""
    check_inputs("heun_step2", x, {"d": d, "x1": x1}, denoised1, t, t_next)
    out = heun_step2_ref(x, d, x1, denoised1, t, t_next)
    return out.contiguous(memory_format=kept_layout(x))


_step1_op = define_op("heun_step1", SCHEMA1, heun_step1_fallback, ("cpu", "cuda"))
_step2_op = define_op("heun_step2", SCHEMA2, heun_step2_fallback, ("cpu", "cuda"))


@torch.library.register_fake("cmkernels::heun_step1")
def _step1_fake(x, denoised, t, t_next):
    check_inputs("heun_step1", x, {}, denoised, t, t_next)
    fmt = kept_layout(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, memory_format=fmt)


@torch.library.register_fake("cmkernels::heun_step2")
def _step2_fake(x, d, x1, denoised1, t, t_next):
    check_inputs("heun_step2", x, {"d": d, "x1": x1}, denoised1, t, t_next)
    return torch.empty_like(x, memory_format=kept_layout(x))


def _sum_per_sample(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _step1_backward(ctx, g_x1, g_d):
    x, denoised, t, t_next = ctx.saved_tensors
    dt = acc_dtype(x)
    tt, tn = _per_sample(t, x, dt), _per_sample(t_next, x, dt)
    g1 = g_x1.to(dt) if g_x1 is not None else torch.zeros((), dtype=dt, device=x.device)
    gd = g_d.to(dt) if g_d is not None else torch.zeros((), dtype=dt, device=x.device)
    u = ((tn - tt) * g1 + gd) / tt  # dL/d(x - D) through both outputs
    grad_x = (g1 + u).expand(x.shape).to(x.dtype)
    grad_denoised = (-u).expand(x.shape).to(denoised.dtype)
    grad_t = grad_t_next = None
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        d = (x.to(dt) - denoised.to(dt)) / tt
        grad_t = (-_sum_per_sample((d * (u + g1)).expand(x.shape))).to(t.dtype)
        grad_t_next = _sum_per_sample((d * g1).expand(x.shape)).to(t_next.dtype)
    return grad_x, grad_denoised, grad_t, grad_t_next


def _step2_backward(ctx, g):
    x, d, x1, denoised1, t, t_next = ctx.saved_tensors
    dt = acc_dtype(x)
    tt, tn = _per_sample(t, x, dt), _per_sample(t_next, x, dt)
    g = g.to(dt)
    a = 0.5 * (tn - tt)
    g_x1 = a * g / tn
    grad_t = grad_t_next = None
    if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
        e = (x1.to(dt) - denoised1.to(dt)) / tn
        s = 0.5 * (d.to(dt) + e)
        grad_t = (-_sum_per_sample(g * s)).to(t.dtype)
        grad_t_next = _sum_per_sample(g * (s - a * e / tn)).to(t_next.dtype)
    return (
        g.to(x.dtype),
        (a * g).to(d.dtype),
        g_x1.to(x1.dtype),
        (-g_x1).to(denoised1.dtype),
        grad_t,
        grad_t_next,
    )


torch.library.register_autograd(
    "cmkernels::heun_step1", _step1_backward, setup_context=_setup_context
)
torch.library.register_autograd(
    "cmkernels::heun_step2", _step2_backward, setup_context=_setup_context
)


# ------------------------------------------------------------------------------------------------
# Public entry points.


def heun_step1(x: Tensor, denoised: Tensor, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor]:
    """Stage 1 of a Heun step from t to t_next: returns (x1, d).

    x:        [B, ...] state at t (fp32 / bf16 / fp16, or fp64).
    denoised: [B, ...] D(x, t), the network's output (fp32 / bf16 / fp16 whatever x is; fp64 for
              fp64 x).
    t:        [B] current noise level per sample (fp32 or fp64).
    t_next:   [B] next noise level per sample (same dtype as t).
    Returns x1 = x + (t_next - t) d (the Euler predictor) and d = (x - denoised) / t, in x's dtype.

    Under forward-mode AD (torch.func.jvp, dual tensors) the step is the elementwise reference,
    which carries the tangents exactly (the registered op would drop them).
    """
    if has_tangent(x, denoised, t, t_next):
        check_inputs("heun_step1", x, {}, denoised, t, t_next)
        return heun_step1_ref(x, denoised, t, t_next)
    return _step1_op(x, denoised, t, t_next)


def heun_step2(
    x: Tensor, d: Tensor, x1: Tensor, denoised1: Tensor, t: Tensor, t_next: Tensor
) -> Tensor:
    """Stage 2 of a Heun step: x + (t_next - t) (d + (x1 - denoised1) / t_next) / 2.

    x, d, x1:  [B, ...] the state at t and stage 1's outputs (one dtype).
    denoised1: [B, ...] D(x1, t_next).
    t, t_next: [B] as in heun_step1 (t_next > 0: the last step of a schedule is Euler only).
    Under forward-mode AD, the elementwise reference (as heun_step1).
    """
    if has_tangent(x, d, x1, denoised1, t, t_next):
        check_inputs("heun_step2", x, {"d": d, "x1": x1}, denoised1, t, t_next)
        return heun_step2_ref(x, d, x1, denoised1, t, t_next)
    return _step2_op(x, d, x1, denoised1, t, t_next)
