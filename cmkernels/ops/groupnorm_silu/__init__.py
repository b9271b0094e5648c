"""GroupNorm (+ per-sample scale/shift) (+ SiLU), fused: y = silu(GN(x) * (1 + scale) + shift); the
torch.library registration of the two ops and the public entry point.

The UNet's ResBlocks normalise, modulate by the timestep embedding and activate; eager PyTorch does
that in ~6 kernels and ~9x the minimal memory traffic. Here it is one pass (read x, write y) where a
group fits one program, and a two-stage reduction where it does not.

Where things are:
- ``reference.py``: ``groupnorm_silu_ref``, the pure-PyTorch reference (fp32, or fp64 for fp64),
  and ``groupnorm_silu_tangent_ref``, the tangent formula of forward-mode AD.
- ``checks.py``: the argument rules and the layout rule, shared by every path below and by the C++
  kernels (csrc/groupnorm_silu_cpu.cpp).
- ``epilogue.py``: the backward's math from the per-(n, c) sums (group means, parameter grads).
- ``triton_kernels.py``: the Triton kernels; ``launch.py``: the launchers
  ``groupnorm_silu_triton`` / ``groupnorm_silu_backward_triton`` / ``groupnorm_silu_jvp_triton``,
  the ops' CUDA kernels (also runnable on CPU tensors under ``TRITON_INTERPRET=1``, as the tests
  do).
- ``fallback.py``: ``groupnorm_silu_fallback`` / ``groupnorm_silu_backward_fallback`` /
  ``groupnorm_silu_jvp_fallback``, the CPU kernels in PyTorch used when the compiled extension is
  missing.
- here: ``torch.ops.cmkernels.groupnorm_silu`` / ``groupnorm_silu_backward`` /
  ``groupnorm_silu_jvp`` (schemas in csrc/ops.cpp, CPU kernels in csrc/groupnorm_silu_cpu.cpp,
  CUDA kernels = the Triton launchers), fake kernels and autograd; the forward-mode AD routes
  (section 11 of the spec: one fused launch for y and its tangent); ``groupnorm_silu``, the public
  entry point returning y, and ``groupnorm_silu_with_tangent``, the explicit (y, ty) form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import (
    FORWARD_AD_EAGER_ONLY,
    acc_dtype,
    has_tangent,
    records_graph,
    split_duals,
    stacked_levels,
)
from cmkernels.ops.groupnorm_silu.checks import (
    check_backward_inputs,
    check_inputs,
    check_jvp_inputs,
    layout,
)
from cmkernels.ops.groupnorm_silu.fallback import (
    groupnorm_silu_backward_fallback,
    groupnorm_silu_fallback,
    groupnorm_silu_jvp_fallback,
)
from cmkernels.ops.groupnorm_silu.launch import (
    groupnorm_silu_backward_triton,
    groupnorm_silu_jvp_triton,
    groupnorm_silu_triton,
)
from cmkernels.ops.groupnorm_silu.reference import groupnorm_silu_ref, groupnorm_silu_tangent_ref
from cmkernels.ops.registry import define_op, register_batch_folding_vmap
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
JVP_SCHEMA = (
    "(Tensor x, Tensor? tx, Tensor weight, Tensor? tweight, Tensor bias, Tensor? tbias, "
    "Tensor? scale, Tensor? tscale, Tensor? shift, Tensor? tshift, int groups, float eps, "
    "bool activation) -> (Tensor, Tensor, Tensor, Tensor)"
)

__all__ = [
    "groupnorm_silu",
    "groupnorm_silu_with_tangent",
    "groupnorm_silu_ref",
    "groupnorm_silu_tangent_ref",
    "groupnorm_silu_triton",
    "groupnorm_silu_backward_triton",
    "groupnorm_silu_jvp_triton",
    "groupnorm_silu_fallback",
    "groupnorm_silu_backward_fallback",
    "groupnorm_silu_jvp_fallback",
    "check_inputs",
    "check_backward_inputs",
    "check_jvp_inputs",
    "SCHEMA",
    "BACKWARD_SCHEMA",
    "JVP_SCHEMA",
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
_jvp_op = define_op(
    "groupnorm_silu_jvp",
    JVP_SCHEMA,
    groupnorm_silu_jvp_fallback,
    kernels={"cuda": groupnorm_silu_jvp_triton} if HAS_TRITON else None,
)


# vmap: the vmapped dimension folds into N (x, scale, shift and every output lead with it), unless
# the weights differ between instances. The backward sums over N for the weights' gradients, which
# a fold would sum over the instances too: it keeps PyTorch's per-instance fallback.
register_batch_folding_vmap("groupnorm_silu", [0, 3, 4], instance_args=[1, 2])
register_batch_folding_vmap("groupnorm_silu_jvp", [0, 1, 6, 7, 8, 9], instance_args=[2, 3, 4, 5])


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


@torch.library.register_fake("cmkernels::groupnorm_silu_jvp")
def _jvp_fake(x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups, eps,
              activation):  # fmt: skip
    check_jvp_inputs(x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups)
    stats = x.new_empty(x.shape[0], groups, dtype=acc_dtype(x))
    fmt = layout(x)
    return (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(x, memory_format=fmt),
        stats,
        torch.empty_like(stats),
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
# tensors (torch.func.jvp or forward_ad) returns a tangent-less output. The public entry point
# therefore routes such calls itself (``_groupnorm_silu_forward_ad``):
# - the direct route: where ``split_duals`` finds one plain forward-AD level and no reverse-mode
#   recording (torch.func.jvp under torch.no_grad(), dual tensors without requires_grad), one call
#   of the fused op on the primals and tangents, re-wrapped with forward_ad.make_dual;
# - where two or more torch.func grad / jvp levels are stacked (jvp of jvp, grad of a tangent;
#   also without a tangent at the innermost level: jvp of a grad, grad of a grad): the op in
#   differentiable PyTorch (``_groupnorm_silu_composite``). The outer level differentiates the
#   tangent (or the gradient) itself, which neither the fused ops (no derivatives of their own)
#   nor an autograd.Function's jvp (torch.func takes its output as a constant for outer levels)
#   can serve;
# - otherwise the autograd.Function ``_GroupNormSiLUJvp``: forward = the registered op, backward
#   = the registered backward op, jvp = the fused op's ty (its y goes unused); it composes with
#   vmap (the generated rule; the ops run once per sample) and with reverse mode on y (dual
#   tensors that require grad, torch.func.jvp in grad mode). A gradient through ty there reaches
#   the fused op's autograd kernel, which raises.


def _jvp_no_backward(ctx, *grads):
    raise RuntimeError(
        "cmkernels::groupnorm_silu_jvp has no reverse-mode derivative: differentiate "
        "groupnorm_silu (whose tangent under torch.func.jvp / forward_ad comes from this op) "
        "instead of calling groupnorm_silu_with_tangent or the op directly"
    )


def _jvp_setup_context(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "cmkernels::groupnorm_silu_jvp", _jvp_no_backward, setup_context=_jvp_setup_context
)


def _groupnorm_silu_composite(x, weight, bias, scale, shift, groups, eps, activation):
    """The op in differentiable PyTorch (accumulation dtype; var_mean, rsqrt, h * sigmoid(h)),
    whose derivatives of every order exist: the route of nested transforms."""
    dt = acc_dtype(x)
    N, C = x.shape[:2]
    bcast = (N, C) + (1,) * (x.dim() - 2)
    cshape = (1, C) + (1,) * (x.dim() - 2)
    xg = x.to(dt).reshape(N, groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, keepdim=True, unbiased=False)
    h = ((xg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    h = h * weight.to(dt).reshape(cshape) + bias.to(dt).reshape(cshape)
    if scale is not None:
        h = h * (1 + scale.to(dt).reshape(bcast))
    if shift is not None:
        h = h + shift.to(dt).reshape(bcast)
    if activation:
        h = h * torch.sigmoid(h)
    return h.to(x.dtype).contiguous(memory_format=layout(x))


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
        ctx.save_for_forward(x, weight, bias, scale, shift)
        ctx.groups = groups
        ctx.eps = eps
        ctx.activation = activation

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        return _backward(ctx, grad_y, grad_mean, grad_rstd)

    @staticmethod
    def jvp(ctx, tx, tw, tb, ts, tsh, _groups, _eps, _activation):
        x, weight, bias, scale, shift = ctx.saved_tensors
        _, ty, _, _ = _jvp_op(x, tx, weight, tw, bias, tb, scale, ts, shift, tsh,
                              ctx.groups, ctx.eps, ctx.activation)  # fmt: skip
        return ty, None, None


# torch.compile inlines an autograd.Function's forward and drops its jvp when no input requires
# grad (a silent zero tangent again), so both routes run outside the compiled graph: a graph break,
# or, under fullgraph=True, dynamo's error naming this function. (groupnorm_silu_with_tangent is
# the compilable form.)
@torch.compiler.disable(reason=FORWARD_AD_EAGER_ONLY)
def _groupnorm_silu_forward_ad(x, weight, bias, scale, shift, groups, eps, activation):
    split = split_duals(x, weight, bias, scale, shift)
    if split is not None:  # the direct route: one launch for y and ty
        (x, weight, bias, scale, shift), (tx, tw, tb, ts, tsh) = split
        y, ty, _, _ = _jvp_op(
            x, tx, weight, tw, bias, tb, scale, ts, shift, tsh, groups, eps, activation
        )
        return torch.autograd.forward_ad.make_dual(y, ty)
    if stacked_levels(x, weight, bias, scale, shift):
        # (through an autograd.Function, the second-order term would be a silent zero)
        check_inputs(x, weight, bias, scale, shift, groups)
        return _groupnorm_silu_composite(x, weight, bias, scale, shift, groups, eps, activation)
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
    tensors: y and its tangent from the fused op groupnorm_silu_jvp; see the routes above).
    """
    if has_tangent(x, weight, bias, scale, shift):  # forward-mode AD: func.jvp or dual tensors
        return _groupnorm_silu_forward_ad(x, weight, bias, scale, shift, groups, eps, activation)
    if not torch.compiler.is_compiling() and stacked_levels(x, weight, bias, scale, shift):
        # torch.func transforms stacked without a tangent at this level (jvp of a grad, grad of
        # a grad): the registered ops' autograd cannot serve an outer level either.
        check_inputs(x, weight, bias, scale, shift, groups)
        return _groupnorm_silu_composite(x, weight, bias, scale, shift, groups, eps, activation)
    y, _, _ = _forward_op(x, weight, bias, scale, shift, groups, eps, activation)
    return y


class _GroupNormSiLUWithTangent(torch.autograd.Function):
    """(y, ty) from one launch of the JVP op, with y differentiable in reverse mode: the JVP op
    also returns the statistics (mean, rstd) that the fused backward needs, so a training step
    that wants y's gradients and ty as a constant (the continuous-time objective's one pass) runs
    one GroupNorm per layer instead of the plain op plus the JVP op. ty is marked
    non-differentiable (requires_grad False, like mean and rstd): autograd treats it as the
    constant it is here. (Raising on a gradient that reaches ty is not an option: torch.compile
    traces the backward with every output's gradient materialised.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, tx, weight, bias, scale, shift, tweight, tbias, tscale, tshift, groups, eps,
                activation):  # fmt: skip
        y, ty, mean, rstd = _jvp_op(
            x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups, eps,
            activation,
        )  # fmt: skip
        return y, ty, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, weight, bias, scale, shift, _, _, _, _, groups, _, activation = inputs
        _, ty, mean, rstd = output
        ctx.mark_non_differentiable(ty, mean, rstd)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups, ctx.activation = groups, activation

    @staticmethod
    def backward(ctx, grad_y, grad_ty, grad_mean, grad_rstd):
        gx, gw, gb, gs, gsh = _backward(ctx, grad_y, None, None)[:5]
        return (gx, None, gw, gb, gs, gsh) + (None,) * 7


def groupnorm_silu_with_tangent(
    x: Tensor,
    tx: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    *,
    tweight: Tensor | None = None,
    tbias: Tensor | None = None,
    tscale: Tensor | None = None,
    tshift: Tensor | None = None,
    groups: int = 32,
    eps: float = 1e-5,
    activation: bool = True,
) -> tuple[Tensor, Tensor]:
    """(y, ty): y = groupnorm_silu(x, weight, bias, scale, shift) and its tangent along tx,
    tweight, tbias, tscale, tshift (None: a zero tangent; a tangent only where its primal is
    given; each like its primal: tx with x's shape and dtype, any layout), in one fused launch.

    The explicit form of forward-mode AD through the op: no dual tensors, so it compiles under
    torch.compile(fullgraph=True) and captures in CUDA graphs. In reverse mode y has the
    gradients of groupnorm_silu (the fused backward, from the statistics of the same launch) and
    ty comes back non-differentiable (requires_grad False): derivatives of the tangent need
    groupnorm_silu under torch.func.jvp.
    """
    args = (x, tx, weight, bias, scale, shift, tweight, tbias, tscale, tshift, groups, eps,
            activation)  # fmt: skip
    if records_graph(x, weight, bias, scale, shift):
        y, ty, _, _ = _GroupNormSiLUWithTangent.apply(*args)
        return y, ty
    y, ty, _, _ = _jvp_op(
        x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups, eps, activation
    )
    return y, ty
