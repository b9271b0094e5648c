"""The backward's epilogue of groupnorm_silu from the per-(n, c) sums, written once for the Triton
backward and the no-extension fallback (the C++ kernel has its own copy, ``param_grads`` in
csrc/groupnorm_silu_cpu.cpp, with the same formulas).

With g = dL/da (a the pre-activation), xhat the normalised input, s = 1 + scale, w, b the affine
parameters and the sums over the pixels of channel c of sample n
  T1_nc = sum_hw g,  T2_nc = sum_hw g xhat,
the parameter gradients are
  dweight_c = sum_n s T2,  dbias_c = sum_n s T1,  dscale_nc = w T2 + b T1,  dshift_nc = T1,
and dx = rstd (s w g - c1 - xhat c2) with the group means c1_ng = mean_group(s w g) =
sum_{c in g} s w T1 / (channels per group * HW), c2_ng the same with T2.
"""

from __future__ import annotations

from torch import Tensor


def _s1(scale: Tensor | None, T: Tensor) -> Tensor | None:
    """1 + scale as [N, C] in T's dtype (None without scale)."""
    return None if scale is None else 1 + scale.reshape(T.shape).to(T.dtype)


def group_means(
    T1: Tensor, T2: Tensor, weight: Tensor, scale: Tensor | None, groups: int, hw: int
) -> tuple[Tensor, Tensor]:
    """(c1, c2), each [N, groups] in T1's dtype, from the sums T1, T2 [N, C]."""
    N, C = T1.shape
    s1 = _s1(scale, T1)
    k = weight.to(T1.dtype) if s1 is None else s1 * weight.to(T1.dtype)  # (N, C) or (C,)
    count = max((C // groups) * hw, 1)
    c1 = (k * T1).reshape(N, groups, -1).sum(-1) / count
    c2 = (k * T2).reshape(N, groups, -1).sum(-1) / count
    return c1, c2


def param_grads(
    T1: Tensor,
    T2: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_weight, grad_bias, grad_scale, grad_shift) from the sums T1, T2 [N, C], each in its
    parameter's dtype and shape; grad_scale / grad_shift are empty tensors without scale / shift
    (the schema returns a Tensor in every case)."""
    s1 = _s1(scale, T1)
    grad_weight = (T2 if s1 is None else s1 * T2).sum(0).to(weight.dtype)
    grad_bias = (T1 if s1 is None else s1 * T1).sum(0).to(bias.dtype)
    empty = weight.new_empty(0)
    grad_scale = empty
    if scale is not None:
        dscale = weight.to(T1.dtype) * T2 + bias.to(T1.dtype) * T1
        grad_scale = dscale.to(scale.dtype).reshape(scale.shape)
    grad_shift = empty if shift is None else T1.to(shift.dtype).reshape(shift.shape)
    return grad_weight, grad_bias, grad_scale, grad_shift
