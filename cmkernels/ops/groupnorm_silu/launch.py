"""The Triton launch of groupnorm_silu: how a problem is split into programs (one-pass forward
where a group fits one program and there are enough groups to fill the GPU, two-stage otherwise)
and the three launchers that are the ops' CUDA kernels, ``groupnorm_silu_triton``,
``groupnorm_silu_backward_triton`` and ``groupnorm_silu_jvp_triton`` (also runnable on CPU
tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import acc_dtype
from cmkernels.ops.groupnorm_silu.checks import (
    KERNEL_DTYPES,
    check_backward_inputs,
    check_inputs,
    check_jvp_inputs,
    layout,
)
from cmkernels.ops.groupnorm_silu.epilogue import group_means, param_grads
from cmkernels.ops.triton_support import (
    HAS_TRITON,
    check_launch,
    device_guard,
    next_pow2,
    triton,
)

if HAS_TRITON:
    from cmkernels.ops.groupnorm_silu import triton_kernels as K

# Tuning of the launch: a group becomes one program when it fits FUSED_MAX elements and there are
# enough groups to fill the GPU; otherwise its pixels split into slices of TILE elements per step.
FUSED_MAX = 8192
TILE = 2048


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewer programs run faster


def _views(x: Tensor):
    """x in kernel layout and its (stride_n, stride_c, stride_hw), plus the output memory format."""
    fmt = layout(x)
    channels_last = fmt == torch.channels_last
    xk = x.contiguous(memory_format=fmt)
    N, C = xk.shape[:2]
    HW = xk.numel() // max(N * C, 1)
    if channels_last:
        strides = (HW * C, 1, C)
    else:
        strides = (C * HW, HW, 1)
    return xk, strides, fmt, HW


def _split(N: int, G: int, HW: int, block_c: int, device) -> tuple[int, int, int]:
    """(BLOCK_HW, S slices, SLICE pixels) for the two-stage kernels."""
    block_hw = min(next_pow2(HW), max(16, TILE // block_c))
    tiles = triton.cdiv(HW, block_hw)
    want = max(1, triton.cdiv(4 * _num_sms(device), N * G))
    S = min(tiles, want, 64)
    slice_ = triton.cdiv(tiles, S) * block_hw
    S = triton.cdiv(HW, slice_)
    return block_hw, S, slice_


def _scale_shift(scale, shift, x):
    """Contiguous [N, C] views (or x as a dummy pointer when absent)."""
    N, C = x.shape[:2]
    s = scale.reshape(N, C).contiguous() if scale is not None else x
    sh = shift.reshape(N, C).contiguous() if shift is not None else x
    return s, sh


def groupnorm_silu_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    groups: int,
    eps: float,
    activation: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton forward: returns (y, mean [N, G] fp32, rstd [N, G] fp32)."""
    check_inputs(x, weight, bias, scale, shift, groups)
    check_launch("groupnorm_silu", x, KERNEL_DTYPES, weight, bias, scale, shift)
    with device_guard(x):
        return _forward_triton(x, weight, bias, scale, shift, groups, eps, activation)


def _forward_triton(x, weight, bias, scale, shift, groups, eps, activation):
    xk, (sn, sc, shw), fmt, HW = _views(x)
    N, C = xk.shape[:2]
    G = groups
    cpg = C // G
    y = torch.empty_like(xk, memory_format=fmt)
    mean = torch.empty(N, G, device=x.device, dtype=acc_dtype(x))  # float32: no float64 here
    rstd = torch.empty_like(mean)
    if xk.numel() == 0:
        return y, mean.zero_(), rstd.fill_(eps**-0.5)
    w, b = weight.contiguous(), bias.contiguous()
    s, sh = _scale_shift(scale, shift, xk)
    block_c = next_pow2(cpg)
    flags = dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation)
    fits = block_c * next_pow2(HW) <= FUSED_MAX
    if fits and N * G >= _num_sms(x.device):
        block_hw = next_pow2(HW)
        K._gn_fused_fwd_kernel[(N * G,)](
            xk, y, w, b, s, sh, mean, rstd, C, HW, G, sn, sc, shw, eps,
            CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=min(16, max(1, block_c * block_hw // 512)), **flags,
        )  # fmt: skip
        return y, mean, rstd
    block_hw, S, slice_ = _split(N, G, HW, block_c, x.device)
    part = torch.empty(N * G, S, 3, device=x.device, dtype=torch.float32)
    warps = min(8, max(1, block_c * block_hw // 256))
    K._gn_partial_stats_kernel[(N * G, S)](
        xk, part, HW, G, S, slice_, sn, sc, shw,
        CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
    )  # fmt: skip
    K._gn_apply_fwd_kernel[(N * G, S)](
        xk, y, w, b, s, sh, part, mean, rstd, C, HW, G, S, slice_, sn, sc, shw, eps,
        CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_S=next_pow2(S),
        num_warps=warps, **flags,
    )  # fmt: skip
    return y, mean, rstd


def groupnorm_silu_backward_triton(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    groups: int,
    activation: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward: (grad_x, grad_weight, grad_bias, grad_scale, grad_shift)."""
    check_backward_inputs(grad_y, x, weight, bias, scale, shift, mean, rstd, groups)
    check_launch(
        "groupnorm_silu_backward", x, KERNEL_DTYPES, grad_y, weight, bias, scale, shift, mean, rstd
    )
    with device_guard(x):
        return _backward_triton(
            grad_y, x, weight, bias, scale, shift, mean, rstd, groups, activation
        )


def _backward_triton(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, activation):
    xk, (sn, sc, shw), fmt, HW = _views(x)
    dy = grad_y.contiguous(memory_format=fmt)
    N, C = xk.shape[:2]
    G = groups
    cpg = C // G
    dx = torch.empty_like(xk, memory_format=fmt)
    w, b = weight.contiguous(), bias.contiguous()
    s, sh = _scale_shift(scale, shift, xk)
    mean32 = mean.float().contiguous()
    rstd32 = rstd.float().contiguous()
    block_c = next_pow2(cpg)
    flags = dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation)
    block_hw, S, slice_ = _split(N, G, max(HW, 1), block_c, x.device)
    warps = min(8, max(1, block_c * block_hw // 256))
    sums = torch.zeros(2, S, N, C, device=x.device, dtype=torch.float32)
    if xk.numel() > 0:
        K._gn_bwd_sums_kernel[(N * G, S)](
            dy, xk, w, b, s, sh, mean32, rstd32, sums, N, C, HW, G, S, slice_, sn, sc, shw,
            CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps, **flags,
        )  # fmt: skip
    T1, T2 = sums.sum(1).unbind(0)  # (N, C) each
    c12 = torch.stack(group_means(T1, T2, weight, scale, G, HW), dim=-1)  # (N, G, 2)
    if xk.numel() > 0:
        K._gn_bwd_dx_kernel[(N * G, S)](
            dy, xk, dx, w, b, s, sh, mean32, rstd32, c12.contiguous(), C, HW, G, slice_,
            sn, sc, shw, CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps, **flags,
        )  # fmt: skip
    return (dx, *param_grads(T1, T2, weight, bias, scale, shift))


def groupnorm_silu_jvp_triton(
    x: Tensor,
    tx: Tensor | None,
    weight: Tensor,
    tweight: Tensor | None,
    bias: Tensor,
    tbias: Tensor | None,
    scale: Tensor | None,
    tscale: Tensor | None,
    shift: Tensor | None,
    tshift: Tensor | None,
    groups: int,
    eps: float,
    activation: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton forward-mode AD: (y, ty, mean [N, G] fp32, rstd [N, G] fp32); y and the statistics
    as ``groupnorm_silu_triton`` computes them (the same split into programs), ty the tangent for
    the given tangents (None: zero)."""
    check_jvp_inputs(x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups)
    check_launch(
        "groupnorm_silu_jvp", x, KERNEL_DTYPES,
        tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift,
    )  # fmt: skip
    with device_guard(x):
        return _jvp_triton(
            x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups, eps,
            activation,
        )  # fmt: skip


def _jvp_triton(x, tx, weight, tweight, bias, tbias, scale, tscale, shift, tshift, groups, eps,
                activation):  # fmt: skip
    xk, (sn, sc, shw), fmt, HW = _views(x)
    N, C = xk.shape[:2]
    G = groups
    cpg = C // G
    y = torch.empty_like(xk, memory_format=fmt)
    ty = torch.empty_like(xk, memory_format=fmt)
    mean = torch.empty(N, G, device=x.device, dtype=acc_dtype(x))
    rstd = torch.empty_like(mean)
    if xk.numel() == 0:
        return y, ty, mean.zero_(), rstd.fill_(eps**-0.5)
    txk = tx.contiguous(memory_format=fmt) if tx is not None else xk  # in x's layout (or a dummy)
    w, b = weight.contiguous(), bias.contiguous()
    s, sh = _scale_shift(scale, shift, xk)
    ts, tsh = _scale_shift(tscale, tshift, xk)
    tw = tweight.contiguous() if tweight is not None else w
    tb = tbias.contiguous() if tbias is not None else b
    block_c = next_pow2(cpg)
    flags = dict(
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_TX=tx is not None, HAS_TW=tweight is not None, HAS_TB=tbias is not None,
        HAS_TSCALE=tscale is not None, HAS_TSHIFT=tshift is not None, ACTIVATION=activation,
    )  # fmt: skip
    # The forward's choice between one program per group and the two-stage reduction, so that y
    # and the statistics are the forward's.
    fits = block_c * next_pow2(HW) <= FUSED_MAX
    if fits and N * G >= _num_sms(x.device):
        block_hw = next_pow2(HW)
        K._gn_fused_jvp_kernel[(N * G,)](
            xk, txk, y, ty, w, b, s, sh, tw, tb, ts, tsh, mean, rstd, C, HW, G, sn, sc, shw, eps,
            CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=min(16, max(1, block_c * block_hw // 512)), **flags,
        )  # fmt: skip
        return y, ty, mean, rstd
    block_hw, S, slice_ = _split(N, G, HW, block_c, x.device)
    part = torch.empty(N * G, S, 3, device=x.device, dtype=torch.float32)
    warps = min(8, max(1, block_c * block_hw // 256))
    if tx is not None:
        tpart = torch.empty(N * G, S, 2, device=x.device, dtype=torch.float32)
        K._gn_jvp_partial_stats_kernel[(N * G, S)](
            xk, txk, part, tpart, HW, G, S, slice_, sn, sc, shw,
            CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )  # fmt: skip
    else:  # no x' statistics: the forward's kernel
        tpart = part
        K._gn_partial_stats_kernel[(N * G, S)](
            xk, part, HW, G, S, slice_, sn, sc, shw,
            CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
        )  # fmt: skip
    K._gn_apply_jvp_kernel[(N * G, S)](
        xk, txk, y, ty, w, b, s, sh, tw, tb, ts, tsh, part, tpart, mean, rstd,
        C, HW, G, S, slice_, sn, sc, shw, eps,
        CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_S=next_pow2(S),
        num_warps=warps, **flags,
    )  # fmt: skip
    return y, ty, mean, rstd
