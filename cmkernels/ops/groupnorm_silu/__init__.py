"""GroupNorm (+ per-sample scale/shift) (+ SiLU), fused: y = silu(GN(x) * (1 + scale) + shift); the
torch.library registration of the two ops and the public entry point.

The UNet's ResBlocks normalise, modulate by the timestep embedding and activate; eager PyTorch does
that in ~6 kernels and ~9x the minimal memory traffic. Here it is one pass (read x, write y) where a
group fits one program, and a two-stage reduction where it does not.

Where things are:
- ``reference.py``: ``groupnorm_silu_ref``, the pure-PyTorch reference (fp32, or fp64 for fp64).
- ``checks.py``: the argument rules and the layout rule, shared by every path below and by the C++
  kernels (csrc/groupnorm_silu_cpu.cpp).
- ``epilogue.py``: the backward's math from the per-(n, c) sums (group means, parameter grads).
- ``triton_kernels.py``: the Triton kernels; ``launch.py``: the launchers
  ``groupnorm_silu_triton`` / ``groupnorm_silu_backward_triton``, the ops' CUDA kernels (also
  runnable on CPU tensors under ``TRITON_INTERPRET=1``, as the tests do).
- ``fallback.py``: ``groupnorm_silu_fallback`` / ``groupnorm_silu_backward_fallback``, the CPU
  kernels in PyTorch used when the compiled extension is missing.
- here: ``torch.ops.cmkernels.groupnorm_silu`` / ``groupnorm_silu_backward`` (schemas in
  csrc/ops.cpp, CPU kernels in csrc/groupnorm_silu_cpu.cpp, CUDA kernels = the Triton launchers),
  fake kernels and autograd; ``_GroupNormSiLUJvp``, the forward-mode AD route (the tangent in
  plain PyTorch, section 11 of the spec); ``groupnorm_silu``, the public entry point returning y.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import FORWARD_AD_EAGER_ONLY, acc_dtype, has_tangent
from cmkernels.ops.groupnorm_silu.checks import check_backward_inputs, check_inputs, layout
from cmkernels.ops.groupnorm_silu.fallback import (
    groupnorm_silu_backward_fallback,
    groupnorm_silu_fallback,
)
from cmkernels.ops.groupnorm_silu.launch import (
    groupnorm_silu_backward_triton,
    groupnorm_silu_triton,
)
from cmkernels.ops.groupnorm_silu.reference import groupnorm_silu_ref
from cmkernels.ops.registry import define_op
from cmkernels.ops.triton_support import HAS_TRITON

SCHEMA = (
    "(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, "
    "int groups, float eps, bool activation) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, "
    "Tensor mean, Tensor rstd, int groups, bool activation) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

__all__ = [
    "groupnorm_silu",
    "groupnorm_silu_ref",
    "groupnorm_silu_jvp",
    "groupnorm_silu_triton",
    "groupnorm_silu_backward_triton",
    "groupnorm_silu_fallback",
    "groupnorm_silu_backward_fallback",
    "check_inputs",
    "check_backward_inputs",
    "SCHEMA",
    "BACKWARD_SCHEMA",
]

_forward_op = define_op(
    "groupnorm_silu",
    SCHEMA,
    groupnorm_silu_fallback,
    kernels={"cuda": groupnorm_silu_triton} if HAS_TRITON else None,
)
_backward_op = define_op(
    "groupnorm_silu_backward",
    BACKWARD_SCHEMA,
    groupnorm_silu_backward_fallback,
    kernels={"cuda": groupnorm_silu_backward_triton} if HAS_TRITON else None,
)


@torch.library.register_fake("cmkernels::groupnorm_silu")
def _forward_fake(x, weight, bias, scale, shift, groups, eps, activation):
    check_inputs(x, weight, bias, scale, shift, groups)
    stats = x.new_empty(x.shape[0], groups, dtype=acc_dtype(x))  # what every kernel returns
    return torch.empty_like(x, memory_format=layout(x)), stats, torch.empty_like(stats)


@torch.library.register_fake("cmkernels::groupnorm_silu_backward")
def _backward_fake(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, activation):
    check_backward_inputs(grad_y, x, weight, bias, scale, shift, mean, rstd, groups)
    empty = weight.new_empty(0)
    return (
        torch.empty_like(x, memory_format=layout(x)),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape),
        scale.new_empty(scale.shape) if scale is not None else empty,
        shift.new_empty(shift.shape) if shift is not None else empty,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, groups, eps, activation = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.groups = groups
    ctx.activation = activation


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    gx, gw, gb, gs, gsh = _backward_op(
        grad_y, x, weight, bias, scale, shift, mean, rstd, ctx.groups, ctx.activation
    )
    return (
        gx,
        gw,
        gb,
        gs if scale is not None else None,
        gsh if shift is not None else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "cmkernels::groupnorm_silu", _backward, setup_context=_setup_context
)


# ------------------------------------------------------------------------------------------------
# Forward-mode AD. torch.library has no forward-AD registration: a registered op called on dual
# tensors (torch.func.jvp or forward_ad) returns a tangent-less output. Such calls go through this
# autograd.Function instead: forward = the registered op, backward = the registered backward op,
# jvp = the spec's formula (section 11) in plain PyTorch, in the accumulation dtype (fp32, fp64 for
# fp64), from the forward's saved mean / rstd. Not a fused kernel yet: it reads x, x' and writes
# y' with several eager kernels.


def groupnorm_silu_jvp(x, weight, bias, scale, shift, mean, rstd, groups, activation,
                       tx, tw, tb, ts, tsh):  # fmt: skip
    """y' of y = groupnorm_silu(x, ...) for tangents tx, tw, tb, ts, tsh (any may be None: zero),
    given the forward's mean / rstd [N, groups]; in x's dtype and output layout.

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

    m, r = mean.to(dt).unsqueeze(-1), rstd.to(dt).unsqueeze(-1)  # (N, groups, 1)
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


class _GroupNormSiLUJvp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, scale, shift, groups, eps, activation):
        return _forward_op(x, weight, bias, scale, shift, groups, eps, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, shift, groups, eps, activation = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.save_for_forward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups = groups
        ctx.activation = activation

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        return _backward(ctx, grad_y, grad_mean, grad_rstd)

    @staticmethod
    def jvp(ctx, tx, tw, tb, ts, tsh, _groups, _eps, _activation):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        ty = groupnorm_silu_jvp(x, weight, bias, scale, shift, mean, rstd, ctx.groups,
                                ctx.activation, tx, tw, tb, ts, tsh)  # fmt: skip
        return ty, None, None


# torch.compile inlines an autograd.Function's forward and drops its jvp when no input requires
# grad (a silent zero tangent again), so the route runs outside the compiled graph: a graph break,
# or, under fullgraph=True, dynamo's error naming this function.
@torch.compiler.disable(reason=FORWARD_AD_EAGER_ONLY)
def _groupnorm_silu_forward_ad(x, weight, bias, scale, shift, groups, eps, activation):
    y, _, _ = _GroupNormSiLUJvp.apply(x, weight, bias, scale, shift, groups, eps, activation)
    return y


# ------------------------------------------------------------------------------------------------
# Public entry point.


def groupnorm_silu(
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
    """Fused silu(GN(x) * (1 + scale) + shift).

    x:          [N, C, *spatial], float32/float16/bfloat16/float64; NCHW or channels_last.
    weight:     [C] GroupNorm affine weight (dtype of x or float32).
    bias:       [C] GroupNorm affine bias.
    scale:      [N, C] per-sample modulation (the output is multiplied by 1 + scale), or None;
                [N, C, 1, ...] with x's number of dims (the shape that broadcasts) is accepted too.
    shift:      [N, C] per-sample shift (or [N, C, 1, ...]), or None.
    groups:     number of groups (C must be divisible by it).
    eps:        added to the variance.
    activation: apply SiLU (False gives plain GroupNorm with the modulation).

    Differentiable in reverse mode (the fused backward) and in forward mode (torch.func.jvp, dual
    tensors: the tangent in plain PyTorch for now, see ``groupnorm_silu_jvp``).
    """
    if has_tangent(x, weight, bias, scale, shift):  # forward-mode AD: func.jvp or dual tensors
        return _groupnorm_silu_forward_ad(x, weight, bias, scale, shift, groups, eps, activation)
    y, _, _ = _forward_op(x, weight, bias, scale, shift, groups, eps, activation)
    return y
