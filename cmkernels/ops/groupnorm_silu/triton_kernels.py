"""The Triton kernels of groupnorm_silu: the one-pass forward (a group fits one program), the
two-stage forward (partial statistics, then the output), the backward's two passes (the
per-(n, c) sums, then dx), and the forward-mode JVP (y and its tangent y') in the forward's two
shapes. Launched by ``launch.py``; imported only where triton is.

One program owns a slice of one (sample, group); its elements are addressed as a
[BLOCK_C, BLOCK_HW] tile: channel-in-group x pixel, with strides so NCHW and NHWC share the code.
The backward's math is in epilogue.py.
"""

from __future__ import annotations

from cmkernels.ops.triton_support import tl, triton


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
    offs = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c + hw[None, :] * stride_hw
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
def _bwd_program(
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    rstd_ptr,
    C,
    G,
    stride_n,
    stride_c,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    # What both backward passes start from: the program's (sample, group) and slice, the group's
    # statistics, its channels, their row offsets, and per channel a = A x + B, s1 = 1 + scale, w.
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    n = pid // G
    g = pid % G
    mean = tl.load(mean_ptr + pid).to(tl.float32)
    rstd = tl.load(rstd_ptr + pid).to(tl.float32)
    cl = tl.arange(0, BLOCK_C)
    c = g * CPG + cl
    cmask = cl < CPG
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.full(w.shape, 1.0, tl.float32)
    if HAS_SCALE:
        s1 = s1 + tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    A = rstd * w * s1
    B = (b - mean * rstd * w) * s1
    if HAS_SHIFT:
        B = B + tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    base = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
    return pid, sid, n, c, cmask, base, mean, rstd, A, B, s1, w


@triton.jit
def _bwd_tile(
    dy_ptr,
    x_ptr,
    base,
    h0,
    HW,
    stride_hw,
    cmask,
    A,
    B,
    BLOCK_HW: tl.constexpr,
    ACTIVATION: tl.constexpr,
):
    # The tile of pixels [h0, h0 + BLOCK_HW): (x, g = dL/da, offsets, mask).
    hw = h0 + tl.arange(0, BLOCK_HW)
    mask = cmask[:, None] & (hw[None, :] < HW)
    offs = base + hw[None, :] * stride_hw
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gr = _silu_bwd(dy, A[:, None] * x + B[:, None], ACTIVATION)
    return x, gr, offs, mask


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
    pid, sid, n, c, cmask, base, mean, rstd, A, B, s1, w = _bwd_program(
        w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, C, G, stride_n, stride_c,
        CPG, BLOCK_C, HAS_SCALE, HAS_SHIFT,
    )  # fmt: skip
    t1 = tl.zeros((BLOCK_C,), tl.float32)
    t2 = tl.zeros((BLOCK_C,), tl.float32)
    start = sid * SLICE
    for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
        x, gr, offs, mask = _bwd_tile(
            dy_ptr, x_ptr, base, h0, HW, stride_hw, cmask, A, B, BLOCK_HW, ACTIVATION
        )
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
    pid, sid, n, c, cmask, base, mean, rstd, A, B, s1, w = _bwd_program(
        w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, C, G, stride_n, stride_c,
        CPG, BLOCK_C, HAS_SCALE, HAS_SHIFT,
    )  # fmt: skip
    c1 = tl.load(c12_ptr + pid * 2)
    c2 = tl.load(c12_ptr + pid * 2 + 1)
    K = rstd * s1 * w
    start = sid * SLICE
    for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
        x, gr, offs, mask = _bwd_tile(
            dy_ptr, x_ptr, base, h0, HW, stride_hw, cmask, A, B, BLOCK_HW, ACTIVATION
        )
        xhat = (x - mean) * rstd
        dx = K[:, None] * gr - rstd * (c1 + xhat * c2)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Forward-mode AD: y and y' in one launch (one program per group) or two (partial statistics,
# then the output). y is computed by the forward's expressions, so it is the forward's y. With
# n = (x - m) r, mu_t = mean(x'), cov = mean((x - m) x') over the group, s1 = 1 + scale and the
# tangents x', w', b', s' (of scale), sh':
#   n' = r (x' - mu_t - n r cov)
#   h' = s1 (n' w + n w' + b') + (n w + b) s' + sh'
#      = D x' + E (x - m) + F,  D = s1 w r,  E = (s1 w' + s' w) r - s1 w r^3 cov,
#                                F = s1 (b' - w r mu_t) + s' b + sh'      (per (n, c))
#   y' = silu'(h) h' (_silu_bwd's factor).
# The tangent flags (HAS_TX, HAS_TW, ...) drop the loads of absent (zero) tangents.


@triton.jit
def _gn_fused_jvp_kernel(
    x_ptr,  # [N, C, HW] through strides (NCHW or NHWC)
    tx_ptr,  # like x (unused when HAS_TX is False)
    y_ptr,  # like x
    ty_ptr,  # like x
    w_ptr,  # [C]
    b_ptr,  # [C]
    scale_ptr,  # [N, C]
    shift_ptr,  # [N, C]
    tw_ptr,  # [C] tangent of w
    tb_ptr,  # [C] tangent of b
    tscale_ptr,  # [N, C] tangent of scale
    tshift_ptr,  # [N, C] tangent of shift
    mean_ptr,  # [N, G] fp32 out
    rstd_ptr,  # [N, G] fp32 out
    C,
    HW,
    G,
    stride_n,
    stride_c,
    stride_hw,
    eps,
    CPG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,  # >= HW: the whole group is one tile
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_TX: tl.constexpr,
    HAS_TW: tl.constexpr,
    HAS_TB: tl.constexpr,
    HAS_TSCALE: tl.constexpr,
    HAS_TSHIFT: tl.constexpr,
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
    offs = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c + hw[None, :] * stride_hw
    # The forward's statistics and y, expression for expression.
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
    af = a  # the affine output before the modulation
    xhat = xc * rstd
    # a' = n' w + n w' + b'
    da = tl.zeros((BLOCK_C, BLOCK_HW), tl.float32)
    if HAS_TX:
        tx = tl.load(tx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mu_t = tl.sum(tl.sum(tx, axis=1), axis=0) / count
        cov = tl.sum(tl.sum(xc * tx, axis=1), axis=0) / count
        dn = rstd * (tx - mu_t - xhat * (rstd * cov))
        da += dn * w[:, None]
    if HAS_TW:
        da += xhat * tl.load(tw_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    if HAS_TB:
        da += tl.load(tb_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    dh = da
    if HAS_SCALE:
        s = tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        a = a * (1.0 + s[:, None])
        dh = da * (1.0 + s[:, None])
        if HAS_TSCALE:
            ts = tl.load(tscale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
            dh += af * ts[:, None]
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        a = a + sh[:, None]
        if HAS_TSHIFT:
            dh += tl.load(tshift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    y = _silu_fwd(a, ACTIVATION)
    ty = _silu_bwd(dh, a, ACTIVATION)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(ty_ptr + offs, ty.to(ty_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_jvp_partial_stats_kernel(
    x_ptr,  # [N, C, HW] through strides
    tx_ptr,  # like x
    part_ptr,  # [N * G, S, 3] fp32 out: (count, mean, m2) of each slice, as the forward's
    tpart_ptr,  # [N * G, S, 2] fp32 out: (sum x', sum (x - slice mean) x') of each slice
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
):
    # _gn_partial_stats_kernel's merge of (count, mean, M2) over the slice's tiles, and with it the
    # co-moment ct = sum (x - mean) x' about the running mean: moving the mean from m to m' adds
    # (m - m') sum x', so ct <- ct + (m - m') st + tct + (tmean - m') tst.
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
    st = 0.0
    ct = 0.0
    start = sid * SLICE
    for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
        hw = h0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw[None, :] < HW)
        offs = base + hw[None, :] * stride_hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tx = tl.load(tx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tcnt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        tmean = tl.sum(tl.sum(x, axis=1), axis=0) / tcnt
        xc = tl.where(mask, x - tmean, 0.0)
        tm2 = tl.sum(tl.sum(xc * xc, axis=1), axis=0)
        tst = tl.sum(tl.sum(tx, axis=1), axis=0)
        tct = tl.sum(tl.sum(xc * tx, axis=1), axis=0)
        tot = cnt + tcnt
        delta = tmean - mean
        new_mean = mean + delta * (tcnt / tot)
        m2 = m2 + tm2 + delta * delta * (cnt * tcnt / tot)
        ct = ct + (mean - new_mean) * st + tct + (tmean - new_mean) * tst
        st = st + tst
        mean = new_mean
        cnt = tot
    out = part_ptr + (pid * S + sid) * 3
    tl.store(out, cnt)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)
    tout = tpart_ptr + (pid * S + sid) * 2
    tl.store(tout, st)
    tl.store(tout + 1, ct)


@triton.jit
def _merge_tangent_partials(part_ptr, tpart_ptr, pid, S, mean, BLOCK_S: tl.constexpr):
    # (mu_t, cov) of group `pid` from its S slices, given the group mean: the co-moment about the
    # group mean is sum_s [ct_s + (mean_s - mean) st_s].
    s = tl.arange(0, BLOCK_S)
    smask = s < S
    base = part_ptr + (pid * S + s) * 3
    cnt = tl.load(base, mask=smask, other=0.0)
    mu = tl.load(base + 1, mask=smask, other=0.0)
    tbase = tpart_ptr + (pid * S + s) * 2
    st = tl.load(tbase, mask=smask, other=0.0)
    ct = tl.load(tbase + 1, mask=smask, other=0.0)
    total = tl.sum(cnt, axis=0)
    d = tl.where(smask, mu - mean, 0.0)
    return tl.sum(st, axis=0) / total, (tl.sum(ct, axis=0) + tl.sum(d * st, axis=0)) / total


@triton.jit
def _gn_apply_jvp_kernel(
    x_ptr,
    tx_ptr,  # like x (unused when HAS_TX is False)
    y_ptr,
    ty_ptr,
    w_ptr,
    b_ptr,
    scale_ptr,
    shift_ptr,
    tw_ptr,
    tb_ptr,
    tscale_ptr,
    tshift_ptr,
    part_ptr,  # [N * G, S, 3] partial statistics of x
    tpart_ptr,  # [N * G, S, 2] partial statistics of x' (unused when HAS_TX is False)
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
    HAS_TX: tl.constexpr,
    HAS_TW: tl.constexpr,
    HAS_TB: tl.constexpr,
    HAS_TSCALE: tl.constexpr,
    HAS_TSHIFT: tl.constexpr,
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
    # h = A x + B per channel: _gn_apply_fwd_kernel's coefficients.
    w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    A = rstd * w
    B = b - mean * A
    s1 = tl.full(w.shape, 1.0, tl.float32)
    if HAS_SCALE:
        s1 = 1.0 + tl.load(scale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        A = A * s1
        B = B * s1
    if HAS_SHIFT:
        B = B + tl.load(shift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    # h' = D x' + E (x - mean) + F per channel.
    mu_t = 0.0
    cov = 0.0
    if HAS_TX:
        mu_t, cov = _merge_tangent_partials(part_ptr, tpart_ptr, pid, S, mean, BLOCK_S)
    D = s1 * w * rstd
    E = -D * (rstd * rstd * cov)
    F = -D * mu_t
    if HAS_TW:
        tw = tl.load(tw_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        E += s1 * tw * rstd
    if HAS_TB:
        F += s1 * tl.load(tb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        if HAS_TSCALE:
            ts = tl.load(tscale_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
            E += ts * w * rstd
            F += ts * b
    if HAS_SHIFT:
        if HAS_TSHIFT:
            F += tl.load(tshift_ptr + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    base = n.to(tl.int64) * stride_n + c[:, None].to(tl.int64) * stride_c
    start = sid * SLICE
    for h0 in range(start, tl.minimum(start + SLICE, HW), BLOCK_HW):
        hw = h0 + tl.arange(0, BLOCK_HW)
        mask = cmask[:, None] & (hw[None, :] < HW)
        offs = base + hw[None, :] * stride_hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = A[:, None] * x + B[:, None]
        dh = E[:, None] * (x - mean) + F[:, None]
        if HAS_TX:
            tx = tl.load(tx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dh += D[:, None] * tx
        tl.store(y_ptr + offs, _silu_fwd(h, ACTIVATION).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(ty_ptr + offs, _silu_bwd(dh, h, ACTIVATION).to(ty_ptr.dtype.element_ty), mask=mask)
