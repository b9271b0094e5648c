"""The Triton kernels of attention (forward, backward delta, dK/dV, dQ, forward-mode JVP) and
their device functions; launched by ``launch.py``, imported only where triton is.

Every tensor is addressed as (batch, head, token, dim) through four element strides, which covers
the packed layout ([B, 3C, T]: strides (3C*T, d*T, 1, T) for contiguous qkv), [B, H, T, d] tensors
and any non-contiguous view of either. Scores are kept in log2 units (s * scale * log2(e)) so the
kernels use exp2; lse is stored in natural-log units.

Program layout: one 1-D grid, pid -> (token block, batch*head) with the token block fastest, so
programs running together read the same head's K/V (L2 reuse) and no grid axis can overflow.
"""

from __future__ import annotations

from cmkernels.ops.triton_support import tl, triton

# INTERP_BF16 is set only under TRITON_INTERPRET for bfloat16 inputs, where the interpreter
# (triton 3.8) multiplies the raw bf16 bit patterns as integers in tl.dot and truncates in
# fp32 -> bf16 casts. The two helpers below then emulate what the GPU does; on the GPU they are
# a plain tl.dot and a plain (round-to-nearest-even) cast.


@triton.jit
def _program(T, H, BLOCK: tl.constexpr):
    # This program's (token block, batch*head, batch, head): the token block fastest.
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(T, BLOCK)
    bh = pid // num_blocks
    return pid % num_blocks, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _tile_ptrs(base, b, h, stride_b, stride_h, rows, stride_t, offs_d, stride_d):
    # Pointers of a (rows, dims) tile of head (b, h) of a (B, H, T, d) tensor seen through strides.
    return (
        base + b * stride_b + h * stride_h + rows[:, None] * stride_t + offs_d[None, :] * stride_d
    )


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    # a @ b with fp32 accumulation. bf16 x bf16 products are exact in fp32, so an fp32 dot of
    # the upcast operands computes what the tensor cores compute.
    if INTERP_BF16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    # fp32 x -> dtype, rounding to nearest even: under INTERP_BF16 round the fp32 bits to bf16
    # precision first, so that the interpreter's truncating cast is exact.
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _load_tile(ptrs, rmask, cmask, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    # A [rows, cols] tile; rows / cols are masked only where needed (unmasked loads vectorise).
    if MASK_R and MASK_C:
        x = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)
    elif MASK_R:
        x = tl.load(ptrs, mask=rmask[:, None], other=0.0)
    elif MASK_C:
        x = tl.load(ptrs, mask=cmask[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_block(
    acc, l_i, m_i,  # running output (BLOCK_M, BLOCK_D), row sum, row max (log2 units)
    q,  # (BLOCK_M, BLOCK_D)
    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    start_n, T, qk_scale,
    offs_n, offs_d, mask_d,
    MASK_N: tl.constexpr, PAD_D: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    n = start_n + offs_n
    mask_n = n < T
    k = _load_tile(
        k_base + n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
        mask_n,
        mask_d,
        MASK_N,
        PAD_D,
    )  # (BLOCK_N, BLOCK_D)
    s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(
        v_base + n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask_n,
        mask_d,
        MASK_N,
        PAD_D,
    )  # (BLOCK_N, BLOCK_D)
    acc = acc * alpha[:, None] + _mma(_cast(p, v.dtype, INTERP_BF16), v, PRECISION, INTERP_BF16)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, T, d) through strides
    O,  # (B, H, T, d) through strides, out
    LSE,  # (B, H, T) contiguous, fp32 out
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H,  # heads
    T,  # tokens
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # d
    BLOCK_D: tl.constexpr,  # max(16, next_pow2(d))
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    PAD_D: tl.constexpr,  # HEAD_DIM != BLOCK_D: mask the head dim
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    INTERP_BF16: tl.constexpr,  # see _mma and _cast
):  # fmt: skip
    # Online softmax over key blocks: for each query row keep m (running max), l (running sum of
    # exp2(s - m)) and acc (running sum of exp2(s - m) v); rescale by exp2(m_old - m_new) when
    # the max grows; out = acc / l, lse = (m + log2 l) ln 2. The T x T matrix never exists.
    pid_m, bh, b, h = _program(T, H, BLOCK_M)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < HEAD_DIM
    q = _load_tile(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask_m,
        mask_d,
        True,
        PAD_D,
    )  # (BLOCK_M, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Full key blocks without the key mask, then the ragged tail.
    t_full = (T // BLOCK_N) * BLOCK_N
    for start_n in range(0, t_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            start_n, T, qk_scale, offs_n, offs_d, mask_d,
            False, PAD_D, PRECISION, INTERP_BF16,
        )  # fmt: skip
    if t_full < T:
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
            t_full, T, qk_scale, offs_n, offs_d, mask_d,
            True, PAD_D, PRECISION, INTERP_BF16,
        )  # fmt: skip
    acc = acc / l_i[:, None]
    o_ptrs = _tile_ptrs(O, b, h, stride_ob, stride_oh, offs_m, stride_ot, offs_d, stride_od)
    o = _cast(acc, O.dtype.element_ty, INTERP_BF16)
    tl.store(o_ptrs, o, mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=mask_m)


# Backward (FA2). With S = scale Q K^T, P = softmax(S) = exp(S - lse), O = P V and dO given:
#   dV = P^T dO
#   dP = dO V^T
#   dS = P * (dP - Delta),  Delta_i = sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j) = dO_i . O_i
#   dQ = scale dS K,        dK = scale dS^T Q
# P is recomputed blockwise from Q, K and the saved lse (no online max needed). Delta comes
# from a small preprocessing kernel (rowsum(dO * O)). dK, dV are accumulated by programs that
# own a key block and loop over all query blocks; dQ by programs that own a query block and
# loop over all key blocks: every output element has one writer, so no atomics.


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO,  # (B, H, T, d) through strides
    DELTA,  # (B, H, T) contiguous, fp32 out
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m, bh, b, h = _program(T, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        _tile_ptrs(O, b, h, stride_ob, stride_oh, offs_m, stride_ot, offs_d, stride_od),
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        _tile_ptrs(DO, b, h, stride_dob, stride_doh, offs_m, stride_dot, offs_d, stride_dod),
        mask=mask, other=0.0,
    ).to(tl.float32)  # fmt: skip
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_block(
    dk, dv,  # (BLOCK_N, BLOCK_D) fp32 accumulators
    k, v,  # (BLOCK_N, BLOCK_D)
    q_base, do_base, lse_base, delta_base,
    stride_qt, stride_qd, stride_dot, stride_dod,
    start_m, T, qk_scale,
    offs_m, offs_d, mask_d,
    MASK_M: tl.constexpr, PAD_D: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    m = start_m + offs_m
    mask_m = m < T
    q = _load_tile(
        q_base + m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask_m,
        mask_d,
        MASK_M,
        PAD_D,
    )  # (BLOCK_M, BLOCK_D)
    do = _load_tile(
        do_base + m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask_m,
        mask_d,
        MASK_M,
        PAD_D,
    )  # (BLOCK_M, BLOCK_D)
    if MASK_M:
        # lse = +inf on padded rows makes their P^T column exactly 0.
        lse2 = tl.load(lse_base + m, mask=mask_m, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + m, mask=mask_m, other=0.0)
    else:
        lse2 = tl.load(lse_base + m) * 1.4426950408889634
        delta = tl.load(delta_base + m)
    st = _mma(k, tl.trans(q), PRECISION, INTERP_BF16) * qk_scale  # S^T (BLOCK_N, BLOCK_M)
    pt = tl.math.exp2(st - lse2[None, :])  # P^T
    dv += _mma(_cast(pt, do.dtype, INTERP_BF16), do, PRECISION, INTERP_BF16)
    dpt = _mma(v, tl.trans(do), PRECISION, INTERP_BF16)  # dP^T (BLOCK_N, BLOCK_M)
    dst = pt * (dpt - delta[None, :])  # dS^T / scale
    dk += _mma(_cast(dst, q.dtype, INTERP_BF16), q, PRECISION, INTERP_BF16)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # (B, H, T, d) through strides
    LSE, DELTA,  # (B, H, T) contiguous fp32
    DK, DV,  # (B, H, T, d) through strides, out
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):  # fmt: skip
    pid_n, bh, b, h = _program(T, H, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < T
    mask_d = offs_d < HEAD_DIM
    k = _load_tile(
        _tile_ptrs(K, b, h, stride_kb, stride_kh, offs_n, stride_kt, offs_d, stride_kd),
        mask_n, mask_d, True, PAD_D,
    )  # fmt: skip
    v = _load_tile(
        _tile_ptrs(V, b, h, stride_vb, stride_vh, offs_n, stride_vt, offs_d, stride_vd),
        mask_n, mask_d, True, PAD_D,
    )  # fmt: skip
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    t_full = (T // BLOCK_M) * BLOCK_M
    for start_m in range(0, t_full, BLOCK_M):
        dk, dv = _bwd_dkdv_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qt, stride_qd, stride_dot, stride_dod, start_m, T, qk_scale,
            offs_m, offs_d, mask_d, False, PAD_D, PRECISION, INTERP_BF16,
        )  # fmt: skip
    if t_full < T:
        dk, dv = _bwd_dkdv_block(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base,
            stride_qt, stride_qd, stride_dot, stride_dod, t_full, T, qk_scale,
            offs_m, offs_d, mask_d, True, PAD_D, PRECISION, INTERP_BF16,
        )  # fmt: skip
    mask = mask_n[:, None] & mask_d[None, :]
    dk_ptrs = _tile_ptrs(DK, b, h, stride_dkb, stride_dkh, offs_n, stride_dkt, offs_d, stride_dkd)
    tl.store(dk_ptrs, _cast(dk * sm_scale, DK.dtype.element_ty, INTERP_BF16), mask=mask)
    dv_ptrs = _tile_ptrs(DV, b, h, stride_dvb, stride_dvh, offs_n, stride_dvt, offs_d, stride_dvd)
    tl.store(dv_ptrs, _cast(dv, DV.dtype.element_ty, INTERP_BF16), mask=mask)


@triton.jit
def _bwd_dq_block(
    dq,  # (BLOCK_M, BLOCK_D) fp32 accumulator
    q, do, lse2, delta,  # (BLOCK_M, BLOCK_D) x 2, (BLOCK_M,) x 2
    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    start_n, T, qk_scale,
    offs_n, offs_d, mask_d,
    MASK_N: tl.constexpr, PAD_D: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    n = start_n + offs_n
    mask_n = n < T
    k = _load_tile(
        k_base + n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
        mask_n,
        mask_d,
        MASK_N,
        PAD_D,
    )  # (BLOCK_N, BLOCK_D)
    v = _load_tile(
        v_base + n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask_n,
        mask_d,
        MASK_N,
        PAD_D,
    )  # (BLOCK_N, BLOCK_D)
    s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(s - lse2[:, None])
    if MASK_N:
        p = tl.where(mask_n[None, :], p, 0.0)
    dp = _mma(do, tl.trans(v), PRECISION, INTERP_BF16)
    ds = p * (dp - delta[:, None])  # dS / scale
    dq += _mma(_cast(ds, k.dtype, INTERP_BF16), k, PRECISION, INTERP_BF16)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # (B, H, T, d) through strides
    LSE, DELTA,  # (B, H, T) contiguous fp32
    DQ,  # (B, H, T, d) through strides, out
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    PAD_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):  # fmt: skip
    pid_m, bh, b, h = _program(T, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < HEAD_DIM
    q = _load_tile(
        _tile_ptrs(Q, b, h, stride_qb, stride_qh, offs_m, stride_qt, offs_d, stride_qd),
        mask_m, mask_d, True, PAD_D,
    )  # fmt: skip
    do = _load_tile(
        _tile_ptrs(DO, b, h, stride_dob, stride_doh, offs_m, stride_dot, offs_d, stride_dod),
        mask_m, mask_d, True, PAD_D,
    )  # fmt: skip
    lse2 = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
    lse2 = lse2 * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    t_full = (T // BLOCK_N) * BLOCK_N
    for start_n in range(0, t_full, BLOCK_N):
        dq = _bwd_dq_block(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, start_n, T, qk_scale, offs_n, offs_d, mask_d,
            False, PAD_D, PRECISION, INTERP_BF16,
        )  # fmt: skip
    if t_full < T:
        dq = _bwd_dq_block(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_kd, stride_vt,
            stride_vd, t_full, T, qk_scale, offs_n, offs_d, mask_d,
            True, PAD_D, PRECISION, INTERP_BF16,
        )  # fmt: skip
    dq_ptrs = _tile_ptrs(DQ, b, h, stride_dqb, stride_dqh, offs_m, stride_dqt, offs_d, stride_dqd)
    tl.store(
        dq_ptrs, _cast(dq * sm_scale, DQ.dtype.element_ty, INTERP_BF16),
        mask=mask_m[:, None] & mask_d[None, :],
    )  # fmt: skip


# Forward-mode AD (JVP), the forward's online softmax carrying the tangent along. With tangents
# Q', K', V' and S = scale Q K^T, P = softmax(S), O = P V:
#   S' = scale (Q' K^T + Q K'^T)
#   P' = P o (S' - rowsum(P o S'))            (the softmax's derivative, row by row)
#   O' = P' V + P V' = P V' + (P o S') V - rowsum(P o S') o O
# Over key blocks with the unnormalised p = exp2(s - m) (m the running max, l = rowsum(p)) keep,
# all rescaled by alpha = exp2(m_old - m_new) like the forward's acc:
#   acc   = sum p V                (P V   = acc / l)
#   acc_t = sum p V' + (p o S') V  (P V' + (P o S') V = acc_t / l)
#   r     = sum_j p o S'           (rowsum(P o S') = r / l)
# and at the end O = acc / l, O' = acc_t / l - (r / l) O. Per key block that is six dots (QK^T,
# Q'K^T, QK'^T, PV, PV', (P o S')V), three times the forward's two; the T x T matrices never
# exist. A zero tangent (HAS_T* False) skips its loads and dots.
# Precision with 16-bit inputs: p and p o S' enter the tensor-core dots rounded to the inputs'
# dtype. For p that is the forward's rounding; p o S' is larger (S' ~ |Q'||K|) and its rounding
# error, which r (from the unrounded values) does not see, was the tangent's largest error (up to
# 2 output ulps in fp16 at T = 7). So it goes in as hi + lo, two 16-bit operands (a seventh dot):
# (P o S') V then carries about fp32 accuracy, and O' the error of P's rounding, as O does.


@triton.jit
def _jvp_block(
    acc, acc_t, l_i, m_i, r_i,  # (BLOCK_M, BLOCK_D) x 2 fp32, (BLOCK_M,) x 3 fp32 (m in log2 units)
    q, tq,  # (BLOCK_M, BLOCK_D); tq unused without HAS_TQ
    k_base, v_base, tk_base, tv_base,  # this head's K, V, K', V'
    stride_kt, stride_kd, stride_vt, stride_vd,
    stride_tkt, stride_tkd, stride_tvt, stride_tvd,
    start_n, T, qk_scale, sm_scale,
    offs_n, offs_d, mask_d,
    MASK_N: tl.constexpr, PAD_D: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, SPLIT_PDS: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):  # fmt: skip
    n = start_n + offs_n
    mask_n = n < T
    k = _load_tile(
        k_base + n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask_n, mask_d, MASK_N, PAD_D
    )  # (BLOCK_N, BLOCK_D)
    s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])  # 0 on padded keys
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(
        v_base + n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask_n, mask_d, MASK_N, PAD_D
    )  # (BLOCK_N, BLOCK_D)
    p_lo = _cast(p, v.dtype, INTERP_BF16)
    acc = acc * alpha[:, None] + _mma(p_lo, v, PRECISION, INTERP_BF16)
    acc_t = acc_t * alpha[:, None]
    if HAS_TV:
        tv = _load_tile(
            tv_base + n[:, None] * stride_tvt + offs_d[None, :] * stride_tvd,
            mask_n, mask_d, MASK_N, PAD_D,
        )  # fmt: skip
        acc_t += _mma(p_lo, tv, PRECISION, INTERP_BF16)
    if HAS_TQ or HAS_TK:
        # S' / scale = Q' K^T + Q K'^T  (BLOCK_M, BLOCK_N)
        if HAS_TQ:
            ds = _mma(tq, tl.trans(k), PRECISION, INTERP_BF16)
            if HAS_TK:
                tk = _load_tile(
                    tk_base + n[:, None] * stride_tkt + offs_d[None, :] * stride_tkd,
                    mask_n, mask_d, MASK_N, PAD_D,
                )  # fmt: skip
                ds += _mma(q, tl.trans(tk), PRECISION, INTERP_BF16)
        else:
            tk = _load_tile(
                tk_base + n[:, None] * stride_tkt + offs_d[None, :] * stride_tkd,
                mask_n, mask_d, MASK_N, PAD_D,
            )  # fmt: skip
            ds = _mma(q, tl.trans(tk), PRECISION, INTERP_BF16)
        pds = p * (ds * sm_scale)  # p o S', 0 on padded keys (p = 0, k = k' = 0 there)
        r_i = r_i * alpha + tl.sum(pds, 1)
        pds_hi = _cast(pds, v.dtype, INTERP_BF16)
        acc_t += _mma(pds_hi, v, PRECISION, INTERP_BF16)
        if SPLIT_PDS:  # the rounding error of pds_hi in a second 16-bit dot
            pds_lo = _cast(pds - pds_hi.to(tl.float32), v.dtype, INTERP_BF16)
            acc_t += _mma(pds_lo, v, PRECISION, INTERP_BF16)
    return acc, acc_t, l_i, m_new, r_i


@triton.jit
def _attn_jvp_kernel(
    Q, K, V,  # (B, H, T, d) through strides
    TQ, TK, TV,  # their tangents (B, H, T, d) through strides; any tensor where HAS_T* is False
    O, TO,  # (B, H, T, d) through strides, out: O and O'
    LSE,  # (B, H, T) contiguous, fp32 out
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_tqb, stride_tqh, stride_tqt, stride_tqd,
    stride_tkb, stride_tkh, stride_tkt, stride_tkd,
    stride_tvb, stride_tvh, stride_tvt, stride_tvd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_tob, stride_toh, stride_tot, stride_tod,
    H,  # heads
    T,  # tokens
    qk_scale,  # softmax scale * log2(e)
    sm_scale,  # softmax scale
    HEAD_DIM: tl.constexpr,  # d
    BLOCK_D: tl.constexpr,  # max(16, next_pow2(d))
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    PAD_D: tl.constexpr,  # HEAD_DIM != BLOCK_D: mask the head dim
    HAS_TQ: tl.constexpr,  # Q' given (else zero)
    HAS_TK: tl.constexpr,  # K' given
    HAS_TV: tl.constexpr,  # V' given
    SPLIT_PDS: tl.constexpr,  # 16-bit inputs: P o S' as a sum of two 16-bit operands (see above)
    PRECISION: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    INTERP_BF16: tl.constexpr,  # see _mma and _cast
):  # fmt: skip
    pid_m, bh, b, h = _program(T, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T
    mask_d = offs_d < HEAD_DIM
    q = _load_tile(
        _tile_ptrs(Q, b, h, stride_qb, stride_qh, offs_m, stride_qt, offs_d, stride_qd),
        mask_m, mask_d, True, PAD_D,
    )  # fmt: skip
    if HAS_TQ:
        tq = _load_tile(
            _tile_ptrs(TQ, b, h, stride_tqb, stride_tqh, offs_m, stride_tqt, offs_d, stride_tqd),
            mask_m, mask_d, True, PAD_D,
        )  # fmt: skip
    else:
        tq = q  # unused
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    tk_base = TK + b * stride_tkb + h * stride_tkh
    tv_base = TV + b * stride_tvb + h * stride_tvh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Full key blocks without the key mask, then the ragged tail.
    t_full = (T // BLOCK_N) * BLOCK_N
    for start_n in range(0, t_full, BLOCK_N):
        acc, acc_t, l_i, m_i, r_i = _jvp_block(
            acc, acc_t, l_i, m_i, r_i, q, tq, k_base, v_base, tk_base, tv_base,
            stride_kt, stride_kd, stride_vt, stride_vd,
            stride_tkt, stride_tkd, stride_tvt, stride_tvd,
            start_n, T, qk_scale, sm_scale, offs_n, offs_d, mask_d,
            False, PAD_D, HAS_TQ, HAS_TK, HAS_TV, SPLIT_PDS, PRECISION, INTERP_BF16,
        )  # fmt: skip
    if t_full < T:
        acc, acc_t, l_i, m_i, r_i = _jvp_block(
            acc, acc_t, l_i, m_i, r_i, q, tq, k_base, v_base, tk_base, tv_base,
            stride_kt, stride_kd, stride_vt, stride_vd,
            stride_tkt, stride_tkd, stride_tvt, stride_tvd,
            t_full, T, qk_scale, sm_scale, offs_n, offs_d, mask_d,
            True, PAD_D, HAS_TQ, HAS_TK, HAS_TV, SPLIT_PDS, PRECISION, INTERP_BF16,
        )  # fmt: skip
    o = acc / l_i[:, None]  # as the forward kernel divides
    to = (acc_t - r_i[:, None] * o) / l_i[:, None]
    mask = mask_m[:, None] & mask_d[None, :]
    o_ptrs = _tile_ptrs(O, b, h, stride_ob, stride_oh, offs_m, stride_ot, offs_d, stride_od)
    tl.store(o_ptrs, _cast(o, O.dtype.element_ty, INTERP_BF16), mask=mask)
    to_ptrs = _tile_ptrs(TO, b, h, stride_tob, stride_toh, offs_m, stride_tot, offs_d, stride_tod)
    tl.store(to_ptrs, _cast(to, TO.dtype.element_ty, INTERP_BF16), mask=mask)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=mask_m)
