"""The kernels of groupnorm_silu in plain PyTorch, served on the CPU when the compiled extension is
missing: ``groupnorm_silu_fallback`` (the reference's output plus the statistics),
``groupnorm_silu_backward_fallback`` (the closed-form backward of epilogue.py) and
``groupnorm_silu_jvp_fallback`` (the forward plus the reference tangent formula), in the
accumulation dtype of x. Same checks, layouts and output dtypes as the C++ kernels."""

from __future__ import annotations

import torch

from cmkernels.ops.common import acc_dtype
from cmkernels.ops.groupnorm_silu.checks import (
    check_backward_inputs,
    check_inputs,
    check_jvp_inputs,
    layout,
)
from cmkernels.ops.groupnorm_silu.epilogue import group_means, param_grads
from cmkernels.ops.groupnorm_silu.reference import groupnorm_silu_ref, groupnorm_silu_tangent_ref


def groupnorm_silu_fallback(x, weight, bias, scale, shift, groups, eps, activation):
    """(y, mean [N, groups], rstd [N, groups])."""
    check_inputs(x, weight, bias, scale, shift, groups)
    fmt = layout(x)
    N = x.shape[0]
    if x.numel() == 0:  # what the kernels return: no NaN statistics of empty groups
        stats = torch.zeros(N, groups, dtype=acc_dtype(x), device=x.device)
        return torch.empty_like(x, memory_format=fmt), stats, torch.full_like(stats, eps**-0.5)
    xf = x.to(acc_dtype(x)).reshape(N, groups, -1)
    var, mu = torch.var_mean(xf, dim=-1, unbiased=False)
    y = groupnorm_silu_ref(
        x, weight, bias, scale, shift, groups=groups, eps=eps, activation=activation
    )
    return y.contiguous(memory_format=fmt), mu, torch.rsqrt(var + eps)


def groupnorm_silu_backward_fallback(
    grad_y, x, weight, bias, scale, shift, mean, rstd, groups, activation
):
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift)."""
    check_backward_inputs(grad_y, x, weight, bias, scale, shift, mean, rstd, groups)
    fmt = layout(x)
    dt = acc_dtype(x)
    N, C = x.shape[:2]
    mean, rstd = mean.to(dt).reshape(N, groups, 1), rstd.to(dt).reshape(N, groups, 1)
    xhat = ((x.to(dt).reshape(N, groups, -1) - mean) * rstd).reshape(N, C, -1)
    w, b = weight.to(dt)[:, None], bias.to(dt)[:, None]
    s1 = 1 + scale.to(dt).reshape(N, C, 1) if scale is not None else torch.ones((), dtype=dt)
    a = (xhat * w + b) * s1
    if shift is not None:
        a = a + shift.to(dt).reshape(N, C, 1)
    g = grad_y.to(dt).reshape(N, C, -1)
    if activation:
        sig = torch.sigmoid(a)
        g = g * sig * (1 + a * (1 - sig))
    T1, T2 = g.sum(-1), (g * xhat).sum(-1)  # (N, C)
    c1, c2 = group_means(T1, T2, weight, scale, groups, xhat.shape[-1])  # (N, groups)
    dx = (s1 * w * g).reshape(N, groups, -1) - c1[..., None]
    dx = rstd * (dx - xhat.reshape(N, groups, -1) * c2[..., None])
    dx = dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=fmt)
    return (dx, *param_grads(T1, T2, weight, bias, scale, shift))


def groupnorm_silu_jvp_fallback(
    x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups, eps, activation
):
    """(y, ty, mean [N, groups], rstd [N, groups]): the forward fallback's outputs and the tangent
    of ``groupnorm_silu_tangent_ref`` from its statistics (None tangents are zero)."""
    check_jvp_inputs(x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups)
    y, mean, rstd = groupnorm_silu_fallback(x, weight, bias, scale, shift, groups, eps, activation)
    if x.numel() == 0:
        return y, torch.empty_like(y), mean, rstd
    ty = groupnorm_silu_tangent_ref(x, weight, bias, scale, shift, mean, rstd, groups, activation,
                                    tx, tweight, tbias, tscale, tshift)  # fmt: skip
    return y, ty, mean, rstd
