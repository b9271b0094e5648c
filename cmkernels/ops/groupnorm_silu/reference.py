"""The pure-PyTorch references of groupnorm_silu: ``groupnorm_silu_ref``, silu(GN(x) * (1 + scale) +
shift) in float32 (float64 for float64 input), and ``groupnorm_silu_tangent_ref``, its tangent for
forward-mode AD by the spec's formula (section 11) from the forward's statistics. The tests and the
benchmarks compare the kernels against them; the no-extension fallback (fallback.py) computes its
outputs with them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmkernels.ops.common import acc_dtype
from cmkernels.ops.groupnorm_silu.checks import layout


def groupnorm_silu_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    *,
    groups: int = 32,
    eps: float = 1e-5,
    activation: bool = True,
) -> Tensor:
    """silu(GN(x) * (1 + scale) + shift) in float32 (float64 for float64 input); returns x.dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    N, C = x.shape[:2]
    h = F.group_norm(x.to(dt), groups, weight.to(dt), bias.to(dt), eps)
    bcast = (N, C) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.to(dt).reshape(bcast))
    if shift is not None:
        h = h + shift.to(dt).reshape(bcast)
    if activation:
        h = F.silu(h)
    return h.to(x.dtype)


def groupnorm_silu_tangent_ref(x, weight, bias, scale, shift, mean, rstd, groups, activation,
                               tx, tw, tb, ts, tsh):  # fmt: skip
    """y' of y = groupnorm_silu(x, ...) for tangents tx, tw, tb, ts, tsh (any may be None: zero),
    given the forward's mean / rstd [N, groups]; computed in the accumulation dtype (float32,
    float64 for float64), returned in x's dtype and output layout. Plain differentiable PyTorch:
    it composes with every transform (vmap, grad, jvp of it).

    n = (x - m) r;  n' = r (x' - mean(x') - n mean(n x'))   (means over the group)
    h = (n w + b)(1 + scale) + shift
    h' = (n' w + n w' + b')(1 + scale) + (n w + b) scale' + shift'
    y = silu(h);  y' = s(h) (1 + h (1 - s(h))) h'   (s the sigmoid)
    """
    dt = acc_dtype(x)
    N, C = x.shape[:2]
    bcast = (N, C) + (1,) * (x.dim() - 2)
    cshape = (1, C) + (1,) * (x.dim() - 2)

    def grouped(t):  # [N, C, *] -> (N, groups, C/groups * spatial) in dt
        return t.to(dt).reshape(N, groups, -1)

    m, r = mean.to(dt).reshape(N, groups, 1), rstd.to(dt).reshape(N, groups, 1)
    n = (grouped(x) - m) * r
    if tx is not None:
        txg = grouped(tx)
        dn = r * (txg - txg.mean(-1, keepdim=True) - n * (n * txg).mean(-1, keepdim=True))
        dn = dn.reshape(x.shape)
    n = n.reshape(x.shape)
    w, b = weight.to(dt).reshape(cshape), bias.to(dt).reshape(cshape)
    a = n * w + b  # the affine GroupNorm output
    da = dn * w if tx is not None else torch.zeros_like(a)
    if tw is not None:
        da = da + n * tw.to(dt).reshape(cshape)
    if tb is not None:
        da = da + tb.to(dt).reshape(cshape)
    h, dh = a, da
    if scale is not None:
        h = a * (1 + scale.to(dt).reshape(bcast))
        dh = da * (1 + scale.to(dt).reshape(bcast))
        if ts is not None:
            dh = dh + a * ts.to(dt).reshape(bcast)
    if shift is not None:
        h = h + shift.to(dt).reshape(bcast)
        if tsh is not None:
            dh = dh + tsh.to(dt).reshape(bcast)
    if activation:
        sig = torch.sigmoid(h)
        dh = dh * sig * (1 + h * (1 - sig))
    return dh.to(x.dtype).contiguous(memory_format=layout(x))
