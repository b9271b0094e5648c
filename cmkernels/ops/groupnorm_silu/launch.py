"""The Triton launch of groupnorm_silu: how a problem is split into programs (one-pass forward
where a group fits one program and there are enough groups to fill the GPU, two-stage otherwise)
and the two launchers that are the ops' CUDA kernels, ``groupnorm_silu_triton`` and
``groupnorm_silu_backward_triton`` (also runnable on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import acc_dtype
from cmkernels.ops.groupnorm_silu.checks import (
    KERNEL_DTYPES,
    check_backward_inputs,
    check_inputs,
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
