"""GroupNorm (+ per-sample scale/shift) (+ SiLU), fused: y = silu(GN(x) * (1 + scale) + shift).

The UNet's ResBlocks normalise, modulate by the timestep embedding and activate; eager PyTorch does
that in ~6 kernels and ~9x the minimal memory traffic. Here it is one pass (read x, write y) where a
group fits one program, and a two-stage reduction where it does not.

Pieces:
- ``groupnorm_silu_ref``: the pure-PyTorch reference (fp32, or fp64 for fp64 input).
- Triton kernels + ``groupnorm_silu_triton`` / ``groupnorm_silu_backward_triton`` launchers: the
  op's CUDA kernels (also runnable on CPU tensors under ``TRITON_INTERPRET=1``, as the tests do).
- ``torch.ops.cmkernels.groupnorm_silu`` / ``groupnorm_silu_backward``: schemas in csrc/ops.cpp,
  CPU kernels in csrc/groupnorm_silu_cpu.cpp, CUDA kernels = the Triton launchers, plus fake
  kernels and autograd registered here.
- ``groupnorm_silu``: the public entry point returning y.

Math of the backward (g = dL/da, a the pre-activation, xhat the normalised input, s = 1 + scale):
  T1_nc = sum_hw g,  T2_nc = sum_hw g xhat
  dshift = T1,  dscale = w T2 + b T1,  dbias = sum_n s T1,  dweight = sum_n s T2
  dx = rstd (s w g - c1 - xhat c2),  c1_ng = mean over the group of s w g,  c2_ng = of s w g xhat
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmkernels.ops._registry import define_op
from cmkernels.ops._triton import HAS_TRITON, check_launch, device_guard, tl, triton

SCHEMA = (
    "(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, "
    "int groups, float eps, bool activation) -> (Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, "
    "Tensor mean, Tensor rstd, int groups, bool activation) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64: CPU kernels only


# ------------------------------------------------------------------------------------------------
# Reference.


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


# ------------------------------------------------------------------------------------------------
# Checks and layout (shared by the Triton launchers and the fake kernels; the C++ kernels check
# the same conditions in C++).


def check_inputs(x, weight, bias, scale, shift, groups) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"groupnorm_silu: x must have shape [N, C, *spatial], got {tuple(x.shape)}"
        )
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"groupnorm_silu: x must be float32/float16/bfloat16/float64, got {x.dtype}"
        )
    N, C = x.shape[:2]
    if groups <= 0 or C % groups:
        raise ValueError(
            f"groupnorm_silu: the number of channels ({C}) must be divisible by groups ({groups})"
        )
    for name, p, per_sample in (
        ("weight", weight, False),
        ("bias", bias, False),
        ("scale", scale, True),
        ("shift", shift, True),
    ):
        if p is None:
            continue
        if p.device != x.device:
            raise ValueError(f"groupnorm_silu: {name} is on {p.device} but x is on {x.device}")
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"groupnorm_silu: {name} has dtype {p.dtype}; expected {x.dtype} (the dtype of x) "
                "or float32"
            )
        if per_sample:
            ok = p.dim() >= 2 and tuple(p.shape[:2]) == (N, C) and p.numel() == N * C
            if not ok:
                raise ValueError(
                    f"groupnorm_silu: {name} has shape {tuple(p.shape)}; expected ({N}, {C}) "
                    "(or [N, C, 1, ...])"
                )
        elif tuple(p.shape) != (C,):
            raise ValueError(f"groupnorm_silu: {name} has shape {tuple(p.shape)}; expected ({C},)")


def _layout(x: Tensor) -> tuple[bool, torch.memory_format]:
    """(channels_last, memory format of the outputs): the rule of the C++ kernel."""
    if x.is_contiguous():
        return False, torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True, torch.channels_last
    return False, torch.contiguous_format


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# Triton kernels. One program owns a slice of one (sample, group); its elements are addressed as a
# [BLOCK_C, BLOCK_HW] tile: channel-in-group x pixel, with strides so NCHW and NHWC share the code.

if HAS_TRITON:

    @triton.jit
    def _silu_fwd(a, ACTIVATION: tl.constexpr):
        if ACTIVATION:
            return a * tl.sigmoid(a)
        return a

    @triton.jit
    def _silu_bwd(dy, a, ACTIVATION: tl.constexpr):
        # d/da [a sigmoid(a)] = s (1 + a (1 - s))
        if ACTIVATION:
            s = tl.sigmoid(a)
            return dy * s * (1.0 + a * (1.0 - s))
        return dy

    @triton.jit
    def _gn_fused_fwd_kernel(
        x_ptr,  # [N, C, HW] through strides (NCHW or NHWC)
        y_ptr,  # same layout as x
        w_ptr,  # [C]
        b_ptr,  # [C]
        scale_ptr,  # [N, C] (unused when HAS_SCALE is False)
        shift_ptr,  # [N, C]
        mean_ptr,  # [N, G] fp32 out
        rstd_ptr,  # [N, G] fp32 out
        C,  # channels
        HW,  # pixels per channel
        G,  # groups
        stride_n,  # element strides of x / y
        stride_c,
        stride_hw,
        eps,
        CPG: tl.constexpr,  # channels per group
        BLOCK_C: tl.constexpr,  # next_pow2(CPG)
        BLOCK_HW: tl.constexpr,  # >= HW: the whole group is one tile
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        ACTIVATION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid // G
        g = pid % G
        cl = tl.arange(0, BLOCK_C)
        hw = tl.arange(0, BLOCK_HW)
        c = g * CPG + cl
        cmask = cl < CPG
        mask = cmask[:, None] & (hw[None, :] < HW)
        offs = (
            n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c + hw[None, :] * stride_hw
        )
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count = CPG * HW
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(tl.sum(xc * xc, axis=1), axis=0) / count
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        a = xc * rstd * w[:, None] + b[:, None]
        if HAS_SCALE:
            s = tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
            a = a * (1.0 + s[:, None])
        if HAS_SHIFT:
            sh = tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
            a = a + sh[:, None]
        y = _silu_fwd(a, ACTIVATION)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_partial_stats_kernel(
        x_ptr,  # [N, C, HW] through strides
        part_ptr,  # [N * G, S, 3] fp32 out: (count, mean, m2) of each slice
        HW,
        G,
        S,  # slices per group
        SLICE,  # pixels per slice (a multiple of BLOCK_HW)
        stride_n,
        stride_c,
        stride_hw,
        CPG: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
    ):
        # Chan et al.'s pairwise merge of (count, mean, M2) over the slice's tiles: accurate in fp32
        # even where |mean| >> std, unlike sum / sum-of-squares.
        pid = tl.program_id(0)
        sid = tl.program_id(1)
        n = pid // G
        g = pid % G
        cl = tl.arange(0, BLOCK_C)
        c = g * CPG + cl
        cmask = cl < CPG
        base = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        start = sid * SLICE
        for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
            hw = h0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw[None, :] < HW)
            x = tl.load(x_ptr + base + hw[None, :] * stride_hw, mask=mask, other=0.0).to(tl.float32)
            tcnt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            tmean = tl.sum(tl.sum(x, axis=1), axis=0) / tcnt
            xc = tl.where(mask, x - tmean, 0.0)
            tm2 = tl.sum(tl.sum(xc * xc, axis=1), axis=0)
            tot = cnt + tcnt
            delta = tmean - mean
            mean = mean + delta * (tcnt / tot)
            m2 = m2 + tm2 + delta * delta * (cnt * tcnt / tot)
            cnt = tot
        out = part_ptr + (pid * S + sid) * 3
        tl.store(out, cnt)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def _merge_partials(part_ptr, pid, S, eps, BLOCK_S: tl.constexpr):
        # Merge the S slice statistics of group `pid` into (mean, rstd).
        s = tl.arange(0, BLOCK_S)
        smask = s < S
        base = part_ptr + (pid * S + s) * 3
        cnt = tl.load(base, mask=smask, other=0.0)
        mu = tl.load(base + 1, mask=smask, other=0.0)
        m2 = tl.load(base + 2, mask=smask, other=0.0)
        total = tl.sum(cnt, axis=0)
        mean = tl.sum(cnt * mu, axis=0) / total
        d = tl.where(smask, mu - mean, 0.0)
        var = (tl.sum(m2, axis=0) + tl.sum(cnt * d * d, axis=0)) / total
        return mean, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _gn_apply_fwd_kernel(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        part_ptr,  # [N * G, S, 3] partial statistics
        mean_ptr,  # [N, G] out (written by slice 0)
        rstd_ptr,
        C,
        HW,
        G,
        S,
        SLICE,
        stride_n,
        stride_c,
        stride_hw,
        eps,
        CPG: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        ACTIVATION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        sid = tl.program_id(1)
        n = pid // G
        g = pid % G
        mean, rstd = _merge_partials(part_ptr, pid, S, eps, BLOCK_S)
        if sid == 0:
            tl.store(mean_ptr + pid, mean)
            tl.store(rstd_ptr + pid, rstd)
        cl = tl.arange(0, BLOCK_C)
        c = g * CPG + cl
        cmask = cl < CPG
        # a = A x + B per channel
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        A = rstd * w
        B = b - mean * A
        if HAS_SCALE:
            s1 = 1.0 + tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
            A = A * s1
            B = B * s1
        if HAS_SHIFT:
            B = B + tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        base = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
        start = sid * SLICE
        for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
            hw = h0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw[None, :] < HW)
            offs = base + hw[None, :] * stride_hw
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = _silu_fwd(A[:, None] * x + B[:, None], ACTIVATION)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gn_coefficients(
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        mean,
        rstd,
        n,
        c,
        C,
        cmask,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
    ):
        # Per-channel (A, B, s1, w, b): a = A x + B, s1 = 1 + scale.
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.full(w.shape, 1.0, tl.float32)
        if HAS_SCALE:
            s1 = s1 + tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        A = rstd * w * s1
        B = (b - mean * rstd * w) * s1
        if HAS_SHIFT:
            B = B + tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        return A, B, s1, w

    @triton.jit
    def _gn_bwd_sums_kernel(
        dy_ptr,  # like x
        x_ptr,
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        mean_ptr,  # [N, G]
        rstd_ptr,
        sums_ptr,  # [2, S, N, C] fp32 out: partial T1, T2 per slice
        N,
        C,
        HW,
        G,
        S,
        SLICE,
        stride_n,
        stride_c,
        stride_hw,
        CPG: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        ACTIVATION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        sid = tl.program_id(1)
        n = pid // G
        g = pid % G
        mean = tl.load(mean_ptr + pid).to(tl.float32)
        rstd = tl.load(rstd_ptr + pid).to(tl.float32)
        cl = tl.arange(0, BLOCK_C)
        c = g * CPG + cl
        cmask = cl < CPG
        A, B, s1, w = _gn_coefficients(
            w_ptr, b_ptr, scale_ptr, shift_ptr, mean, rstd, n, c, C, cmask, HAS_SCALE, HAS_SHIFT
        )
        base = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
        t1 = tl.zeros((BLOCK_C,), tl.float32)
        t2 = tl.zeros((BLOCK_C,), tl.float32)
        start = sid * SLICE
        for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
            hw = h0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw[None, :] < HW)
            offs = base + hw[None, :] * stride_hw
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gr = _silu_bwd(dy, A[:, None] * x + B[:, None], ACTIVATION)
            gr = tl.where(mask, gr, 0.0)
            t1 += tl.sum(gr, axis=1)
            t2 += tl.sum(gr * ((x - mean) * rstd), axis=1)
        out = sums_ptr + (sid * N + n) * C + c
        tl.store(out, t1, mask=cmask)
        tl.store(out + S * N * C, t2, mask=cmask)

    @triton.jit
    def _gn_bwd_dx_kernel(
        dy_ptr,
        x_ptr,
        dx_ptr,  # like x
        w_ptr,
        b_ptr,
        scale_ptr,
        shift_ptr,
        mean_ptr,
        rstd_ptr,
        c12_ptr,  # [N, G, 2] fp32: group means c1, c2
        C,
        HW,
        G,
        SLICE,
        stride_n,
        stride_c,
        stride_hw,
        CPG: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        ACTIVATION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        sid = tl.program_id(1)
        n = pid // G
        g = pid % G
        mean = tl.load(mean_ptr + pid).to(tl.float32)
        rstd = tl.load(rstd_ptr + pid).to(tl.float32)
        c1 = tl.load(c12_ptr + pid * 2)
        c2 = tl.load(c12_ptr + pid * 2 + 1)
        cl = tl.arange(0, BLOCK_C)
        c = g * CPG + cl
        cmask = cl < CPG
        A, B, s1, w = _gn_coefficients(
            w_ptr, b_ptr, scale_ptr, shift_ptr, mean, rstd, n, c, C, cmask, HAS_SCALE, HAS_SHIFT
        )
        K = rstd * s1 * w
        base = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
        start = sid * SLICE
        for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
            hw = h0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hw[None, :] < HW)
            offs = base + hw[None, :] * stride_hw
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gr = _silu_bwd(dy, A[:, None] * x + B[:, None], ACTIVATION)
            xhat = (x - mean) * rstd
            dx = K[:, None] * gr - rstd * (c1 + xhat * c2)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Tuning of the launch: a group becomes one program when it fits FUSED_MAX elements and there are
# enough groups to fill the GPU; otherwise its pixels split into slices of TILE elements per step.
FUSED_MAX = 8192
TILE = 2048


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: fewer programs run faster


def _views(x: Tensor):
    """x in kernel layout and its (stride_n, stride_c, stride_hw), plus the output memory format."""
    channels_last, fmt = _layout(x)
    xk = x if (channels_last or x.is_contiguous()) else x.contiguous()
    N, C = xk.shape[:2]
    HW = xk.numel() // max(N * C, 1)
    if channels_last:
        strides = (HW * C, 1, C)
    else:
        strides = (C * HW, HW, 1)
    return xk, strides, fmt, HW


def _split(N: int, G: int, HW: int, block_c: int, device) -> tuple[int, int, int]:
    """(BLOCK_HW, S slices, SLICE pixels) for the two-stage kernels."""
    block_hw = min(_next_pow2(HW), max(16, TILE // block_c))
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
    check_launch("groupnorm_silu", x, _KERNEL_DTYPES, weight, bias, scale, shift)
    with device_guard(x):
        return _forward_triton(x, weight, bias, scale, shift, groups, eps, activation)


def _forward_triton(x, weight, bias, scale, shift, groups, eps, activation):
    xk, (sn, sc, shw), fmt, HW = _views(x)
    N, C = xk.shape[:2]
    G = groups
    cpg = C // G
    y = torch.empty_like(xk, memory_format=fmt)
    mean = torch.empty(N, G, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N, G, device=x.device, dtype=torch.float32)
    if xk.numel() == 0:
        return y, mean.zero_(), rstd.fill_(eps**-0.5)
    w, b = weight.contiguous(), bias.contiguous()
    s, sh = _scale_shift(scale, shift, xk)
    block_c = _next_pow2(cpg)
    flags = dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation)
    fits = block_c * _next_pow2(HW) <= FUSED_MAX
    if fits and N * G >= _num_sms(x.device):
        block_hw = _next_pow2(HW)
        _gn_fused_fwd_kernel[(N * G,)](
            xk, y, w, b, s, sh, mean, rstd, C, HW, G, sn, sc, shw, eps,
            CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=min(16, max(1, block_c * block_hw // 512)), **flags,
        )  # fmt: skip
        return y, mean, rstd
    block_hw, S, slice_ = _split(N, G, HW, block_c, x.device)
    part = torch.empty(N * G, S, 3, device=x.device, dtype=torch.float32)
    warps = min(8, max(1, block_c * block_hw // 256))
    _gn_partial_stats_kernel[(N * G, S)](
        xk, part, HW, G, S, slice_, sn, sc, shw,
        CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps,
    )  # fmt: skip
    _gn_apply_fwd_kernel[(N * G, S)](
        xk, y, w, b, s, sh, part, mean, rstd, C, HW, G, S, slice_, sn, sc, shw, eps,
        CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_S=_next_pow2(S),
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
    check_inputs(x, weight, bias, scale, shift, groups)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError("groupnorm_silu_backward: grad_y must match x in shape and dtype")
    check_launch(
        "groupnorm_silu_backward", x, _KERNEL_DTYPES, grad_y, weight, bias, scale, shift, mean, rstd
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
    block_c = _next_pow2(cpg)
    flags = dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACTIVATION=activation)
    block_hw, S, slice_ = _split(N, G, max(HW, 1), block_c, x.device)
    warps = min(8, max(1, block_c * block_hw // 256))
    sums = torch.zeros(2, S, N, C, device=x.device, dtype=torch.float32)
    if xk.numel() > 0:
        _gn_bwd_sums_kernel[(N * G, S)](
            dy, xk, w, b, s, sh, mean32, rstd32, sums, N, C, HW, G, S, slice_, sn, sc, shw,
            CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps, **flags,
        )  # fmt: skip
    T1, T2 = sums.sum(1).unbind(0)  # (N, C) each
    s1 = 1.0 + scale.reshape(N, C).float() if scale is not None else torch.ones_like(T1)
    k = s1 * w.float()
    c12 = torch.stack(
        [(k * T1).view(N, G, cpg).sum(-1), (k * T2).view(N, G, cpg).sum(-1)], dim=-1
    ) / max(cpg * HW, 1)  # (N, G, 2)
    if xk.numel() > 0:
        _gn_bwd_dx_kernel[(N * G, S)](
            dy, xk, dx, w, b, s, sh, mean32, rstd32, c12.contiguous(), C, HW, G, slice_,
            sn, sc, shw, CPG=cpg, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps, **flags,
        )  # fmt: skip
    grad_weight = (s1 * T2).sum(0).to(weight.dtype)
    grad_bias = (s1 * T1).sum(0).to(bias.dtype)
    empty = weight.new_empty(0)
    grad_scale = (
        (w.float() * T2 + b.float() * T1).to(scale.dtype).reshape(scale.shape)
        if scale is not None
        else empty
    )
    grad_shift = T1.to(shift.dtype).reshape(shift.shape) if shift is not None else empty
    return dx, grad_weight, grad_bias, grad_scale, grad_shift


# ------------------------------------------------------------------------------------------------
# Fallbacks used when the compiled extension is missing (reference forward; autograd backward).


def _forward_fallback(x, weight, bias, scale, shift, groups, eps, activation):
    check_inputs(x, weight, bias, scale, shift, groups)
    _, fmt = _layout(x)
    dt = _stat_dtype(x)
    N = x.shape[0]
    xf = x.to(dt).reshape(N, groups, -1)
    var, mu = torch.var_mean(xf, dim=-1, unbiased=False)
    y = groupnorm_silu_ref(
        x, weight, bias, scale, shift, groups=groups, eps=eps, activation=activation
    )
    return y.contiguous(memory_format=fmt), mu, torch.rsqrt(var + eps)


def _backward_fallback(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, activation):
    # The closed form of the module docstring, in plain PyTorch.
    _, fmt = _layout(x)
    dt = _stat_dtype(x)
    N, C = x.shape[:2]
    xhat = ((x.to(dt).reshape(N, groups, -1) - mean[..., None]) * rstd[..., None]).reshape(N, C, -1)
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
    sw = s1 * w  # (N, C, 1) or (C, 1)
    c1 = (sw * g).reshape(N, groups, -1).mean(-1, keepdim=True)
    c2 = (sw * g * xhat).reshape(N, groups, -1).mean(-1, keepdim=True)
    gx = rstd[..., None] * ((sw * g).reshape(N, groups, -1) - c1 - xhat.reshape(N, groups, -1) * c2)
    gx = gx.reshape(x.shape).to(x.dtype).contiguous(memory_format=fmt)
    s1_nc = s1.reshape(N, C) if scale is not None else torch.ones_like(T1)
    empty = weight.new_empty(0)
    return (
        gx,
        (s1_nc * T2).sum(0).to(weight.dtype),
        (s1_nc * T1).sum(0).to(bias.dtype),
        (w[:, 0] * T2 + b[:, 0] * T1).to(scale.dtype).reshape(scale.shape)
        if scale is not None
        else empty,
        T1.to(shift.dtype).reshape(shift.shape) if shift is not None else empty,
    )


_forward_op = define_op(
    "groupnorm_silu",
    SCHEMA,
    _forward_fallback,
    kernels={"cuda": groupnorm_silu_triton} if HAS_TRITON else None,
)
_backward_op = define_op(
    "groupnorm_silu_backward",
    BACKWARD_SCHEMA,
    _backward_fallback,
    kernels={"cuda": groupnorm_silu_backward_triton} if HAS_TRITON else None,
)


@torch.library.register_fake("cmkernels::groupnorm_silu")
def _forward_fake(x, weight, bias, scale, shift, groups, eps, activation):
    check_inputs(x, weight, bias, scale, shift, groups)
    _, fmt = _layout(x)
    N = x.shape[0]
    stats = x.new_empty(N, groups, dtype=_stat_dtype(x))
    return torch.empty_like(x, memory_format=fmt), stats, torch.empty_like(stats)


@torch.library.register_fake("cmkernels::groupnorm_silu_backward")
def _backward_fake(grad_y, x, weight, bias, scale, shift, mean, rstd, groups, activation):
    check_inputs(x, weight, bias, scale, shift, groups)
    _, fmt = _layout(x)
    empty = weight.new_empty(0)
    return (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(weight),
        torch.empty_like(bias),
        torch.empty_like(scale) if scale is not None else empty,
        torch.empty_like(shift) if shift is not None else empty,
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
    scale:      [N, C] per-sample modulation (the output is multiplied by 1 + scale), or None.
    shift:      [N, C] per-sample shift, or None.
    groups:     number of groups (C must be divisible by it).
    eps:        added to the variance.
    activation: apply SiLU (False gives plain GroupNorm with the modulation).
    """
    y, _, _ = _forward_op(x, weight, bias, scale, shift, groups, eps, activation)
    return y
