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
  fake kernels and autograd; ``groupnorm_silu``, the public entry point returning y.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import acc_dtype
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
    """
    y, _, _ = _forward_op(x, weight, bias, scale, shift, groups, eps, activation)
    return y
