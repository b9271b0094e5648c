"""The argument checks of groupnorm_silu, groupnorm_silu_backward and groupnorm_silu_jvp, one
function per op, and the layout rule: the public function (through the op), the fake kernels, the
Triton launchers and the no-extension fallbacks call these; the C++ kernels
(csrc/groupnorm_silu_cpu.cpp) enforce the same rules in the same order with the same error types
and texts, and a test feeds the same bad inputs to every path.

Rules:
- x: [N, C, *spatial], float32 / float16 / bfloat16 / float64 (float64 not on CUDA: the Triton
  kernels take none);
- groups > 0 and dividing C;
- weight, bias: [C]; scale, shift: [N, C] or [N, C, 1, ...] with x's number of dims (the shape
  that broadcasts against x), or None; each on x's device, in x's dtype or float32;
- backward: grad_y with x's shape, dtype and device; mean and rstd with N * groups elements on x's
  device.
- jvp: the primals' rules above; tx with x's shape, dtype and device (any layout); each parameter
  tangent (tweight, tbias, tscale, tshift) follows its primal's rule (device, dtype, shape) and may
  only be given where its primal is (a tangent of an absent scale is an error, not ignored).
The statistics (mean, rstd [N, groups]) are in the accumulation dtype of x (float32; float64 for
float64) on every path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import FLOATS, dtype_str, kept_layout, shape_str

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels take


def layout(x: Tensor) -> torch.memory_format:
    """The memory format of the outputs: x's where it is contiguous or 4-d channels_last, else
    contiguous (x is copied to it)."""
    return kept_layout(x, (torch.channels_last,))


def check_inputs(x, weight, bias, scale, shift, groups) -> None:
    if x.dim() < 2:
        raise ValueError(f"groupnorm_silu: x must have shape [N, C, *spatial], got {shape_str(x)}")
    if x.dtype not in FLOATS:
        raise TypeError(
            "groupnorm_silu: x must be float32, float16, bfloat16 or float64, "
            f"got {dtype_str(x.dtype)}"
        )
    if x.dtype == torch.float64 and x.device.type == "cuda":
        raise TypeError(
            "groupnorm_silu: x must be float32, float16 or bfloat16 on CUDA "
            "(float64 is served by the CPU kernels only)"
        )
    N, C = x.shape[:2]
    if groups <= 0 or C % groups:
        raise ValueError(
            f"groupnorm_silu: the number of channels ({C}) must be divisible by groups ({groups})"
        )
    per_sample = _per_sample_shapes(x)
    for name, p, shapes in (
        ("weight", weight, [[C]]),
        ("bias", bias, [[C]]),
        ("scale", scale, per_sample),
        ("shift", shift, per_sample),
    ):
        if p is not None:
            _check_param("groupnorm_silu", name, p, x, shapes)


def _per_sample_shapes(x: Tensor) -> list[list[int]]:
    """The accepted shapes of scale / shift: [N, C], and [N, C, 1, ...] with x's number of dims."""
    N, C = x.shape[:2]
    shapes = [[N, C]]
    if x.dim() > 2:
        shapes.append([N, C] + [1] * (x.dim() - 2))
    return shapes


def _check_param(op: str, name: str, p: Tensor, x: Tensor, shapes: list[list[int]]) -> None:
    """p is on x's device, in x's dtype or float32, and has one of shapes."""
    if p.device != x.device:
        raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}")
    if p.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"{op}: {name} has dtype {dtype_str(p.dtype)}; expected "
            f"{dtype_str(x.dtype)} (the dtype of x) or float32"
        )
    if list(p.shape) not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{op}: {name} has shape {shape_str(p)}; expected {expected}")


def check_backward_inputs(grad_y, x, weight, bias, scale, shift, mean, rstd, groups) -> None:
    check_inputs(x, weight, bias, scale, shift, groups)
    op = "groupnorm_silu_backward"
    if grad_y.shape != x.shape:
        raise ValueError(
            f"{op}: grad_y has shape {shape_str(grad_y)} but x has shape {shape_str(x)}"
        )
    if grad_y.dtype != x.dtype:
        raise TypeError(
            f"{op}: grad_y has dtype {dtype_str(grad_y.dtype)} but x has dtype {dtype_str(x.dtype)}"
        )
    if grad_y.device != x.device:
        raise ValueError(f"{op}: grad_y is on {grad_y.device} but x is on {x.device}")
    want = x.shape[0] * groups
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.numel() != want:
            raise ValueError(
                f"{op}: {name} must have N * groups = {want} elements, got {t.numel()}"
            )
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def check_jvp_inputs(
    x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups
) -> None:
    """The rules of groupnorm_silu_jvp: the forward's on the primals, then each tangent in the
    schema's order (tx, tweight, tbias, tscale, tshift); None is a zero tangent."""
    check_inputs(x, weight, bias, scale, shift, groups)
    op = "groupnorm_silu_jvp"
    if tx is not None:
        if tx.shape != x.shape:
            raise ValueError(f"{op}: tx has shape {shape_str(tx)} but x has shape {shape_str(x)}")
        if tx.dtype != x.dtype:
            raise TypeError(
                f"{op}: tx has dtype {dtype_str(tx.dtype)} but x has dtype {dtype_str(x.dtype)}"
            )
        if tx.device != x.device:
            raise ValueError(f"{op}: tx is on {tx.device} but x is on {x.device}")
    C = x.shape[1]
    per_sample = _per_sample_shapes(x)
    for name, t, primal, shapes in (
        ("weight", tweight, weight, [[C]]),
        ("bias", tbias, bias, [[C]]),
        ("scale", tscale, scale, per_sample),
        ("shift", tshift, shift, per_sample),
    ):
        if t is None:
            continue
        if primal is None:
            raise ValueError(f"{op}: t{name} is given but {name} is None")
        _check_param(op, "t" + name, t, x, shapes)
