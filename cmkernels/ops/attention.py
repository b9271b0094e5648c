"""Multi-head self-attention of the UNet's attention blocks, fused (flash-attention style).

Layouts:
- packed (the official checkpoints): ``qkv`` [B, 3*H*d, T], channel order (three, heads, head_dim):
  q of head h = channels [h*d, (h+1)*d), k = C + the same, v = 2C + the same (C = H*d); the output
  is [B, H*d, T], channel order (heads, head_dim). The kernels address this layout through strides,
  so no permute/reshape copy happens around them.
- split: ``q``, ``k``, ``v`` [B, H, T, d] (any strides) -> [B, H, T, d].

Pieces:
- ``attention_ref`` / ``attention_bhtd_ref``: pure-PyTorch references (fp32; fp64 for fp64 input).
- Triton kernels + ``attention_triton`` / ``attention_backward_triton`` (packed) and
  ``attention_bhtd_triton`` / ``attention_bhtd_backward_triton`` (split) launchers: the ops' CUDA
  kernels (also runnable on CPU tensors under ``TRITON_INTERPRET=1``, as the tests do).
- ``torch.ops.cmkernels.attention`` / ``attention_backward`` / ``attention_bhtd`` /
  ``attention_bhtd_backward``: schemas in csrc/ops.cpp; CPU kernels here (forward:
  SDPA plus a chunked logsumexp; backward: the kernels' blockwise math in PyTorch), CUDA kernels =
  the Triton launchers, fake kernels, autograd. The forward ops return
  (out, lse), lse [B, H, T] the natural-log logsumexp of each softmax row (fp32; fp64 for fp64
  input), which the backward reuses; lse is not differentiable.
- ``attention(qkv, num_heads)`` / ``attention_bhtd(q, k, v)``: the public entry points. On the
  CPU they call F.scaled_dot_product_attention on contiguous q, k, v, forward and backward (its
  CPU flash kernels beat the op's recomputing backward 2-3x); elsewhere the ops.

On CUDA the kernels' block sizes are autotuned per (T, d, dtype) on first use;
``CMKERNELS_AUTOTUNE=0`` selects the fixed per-head-dim heuristic instead.

Head dims 1..128 (16, 32, 64, 128 natively; others are zero-padded inside the kernel to the next
power of two >= 16); any T >= 1; float16, bfloat16, float32 (float64 on the CPU only). The softmax
scale is 1/sqrt(d).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from cmkernels.ops._registry import define_op
from cmkernels.ops._triton import HAS_TRITON, INTERPRET, check_launch, device_guard, tl, triton

SCHEMA = "(Tensor qkv, int num_heads) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads) -> Tensor"
BHTD_SCHEMA = "(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)"
BHTD_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse) "
    "-> (Tensor, Tensor, Tensor)"
)

MAX_HEAD_DIM = 128
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)  # float64: CPU kernels only (gradcheck)


# ------------------------------------------------------------------------------------------------
# References.


def attention_ref(qkv: Tensor, num_heads: int) -> Tensor:
    """Reference attention on the packed official layout, computed in float32 (or float64)."""
    B, C3, T = qkv.shape
    if C3 % (3 * num_heads):
        raise ValueError(f"qkv has {C3} channels, not divisible by 3 * num_heads = {3 * num_heads}")
    d = C3 // (3 * num_heads)
    dt = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v = qkv.to(dt).reshape(B, 3, num_heads, d, T).unbind(1)  # (B, H, d, T) each
    w = torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d)  # (B, H, T, T)
    w = torch.softmax(w, dim=-1)
    out = torch.einsum("bhts,bhds->bhdt", w, v)  # (B, H, d, T)
    return out.reshape(B, num_heads * d, T).to(qkv.dtype)


def attention_bhtd_ref(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference attention on [B, H, T, d] tensors, computed in float32 (or float64)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    w = torch.einsum("bhtd,bhsd->bhts", q.to(dt), k.to(dt)) / math.sqrt(q.shape[-1])
    w = torch.softmax(w, dim=-1)  # (B, H, T, T)
    return torch.einsum("bhts,bhsd->bhtd", w, v.to(dt)).to(q.dtype)


# ------------------------------------------------------------------------------------------------
# Checks (shared by the CPU kernels, the Triton launchers and the fake kernels).


def _check_dtype(op: str, name: str, x: Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16 or float32 (float64 on the CPU), got {x.dtype}"
        )


def _check_head_dim(op: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: head dim {d} is not supported; the kernels take head dims 1..{MAX_HEAD_DIM}"
        )


def check_packed(qkv: Tensor, num_heads: int, op: str = "attention") -> int:
    """Validate a packed qkv [B, 3*H*d, T]; returns the head dim d."""
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must have shape [B, 3*H*d, T], got {tuple(qkv.shape)}")
    if num_heads < 1:
        raise ValueError(f"{op}: num_heads must be positive, got {num_heads}")
    C3 = qkv.shape[1]
    if C3 == 0 or C3 % (3 * num_heads):
        raise ValueError(
            f"{op}: qkv has {C3} channels; expected a positive multiple of "
            f"3 * num_heads = {3 * num_heads} (layout [B, 3*H*d, T])"
        )
    _check_dtype(op, "qkv", qkv)
    d = C3 // (3 * num_heads)
    _check_head_dim(op, d)
    return d


def check_bhtd(q: Tensor, k: Tensor, v: Tensor, op: str = "attention_bhtd") -> None:
    """Validate q, k, v [B, H, T, d]: same shape, dtype and device."""
    if q.dim() != 4:
        raise ValueError(f"{op}: q must have shape [B, H, T, d], got {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(x.shape)} but q has {tuple(q.shape)} "
                "(self-attention: q, k, v share [B, H, T, d])"
            )
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {x.dtype} but q has {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device} but q is on {q.device}")
    _check_dtype(op, "q", q)
    _check_head_dim(op, q.shape[-1])


def _check_like(op: str, name: str, x: Tensor, shape, ref: Tensor, dtype=None) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if x.dtype != (dtype or ref.dtype):
        raise TypeError(f"{op}: {name} has dtype {x.dtype}, expected {dtype or ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but the inputs are on {ref.device}")


def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_packed_backward(grad_out, qkv, out, lse, num_heads, op="attention_backward") -> int:
    d = check_packed(qkv, num_heads, op)
    B, C3, T = qkv.shape
    _check_like(op, "grad_out", grad_out, (B, C3 // 3, T), qkv)
    _check_like(op, "out", out, (B, C3 // 3, T), qkv)
    _check_like(op, "lse", lse, (B, num_heads, T), qkv, _lse_dtype(qkv))
    return d


def _check_bhtd_backward(grad_out, q, k, v, out, lse, op="attention_bhtd_backward") -> None:
    check_bhtd(q, k, v, op)
    _check_like(op, "grad_out", grad_out, q.shape, q)
    _check_like(op, "out", out, q.shape, q)
    _check_like(op, "lse", lse, q.shape[:3], q, _lse_dtype(q))


# ------------------------------------------------------------------------------------------------
# Triton kernels. Every tensor is addressed as (batch, head, token, dim) through four element
# strides, which covers the packed layout ([B, 3C, T]: strides (3C*T, d*T, 1, T) for contiguous
# qkv), [B, H, T, d] tensors and any non-contiguous view of either. Scores are kept in log2 units
# (s * scale * log2(e)) so the kernels use exp2; lse is stored in natural-log units.
#
# Program layout: one 1-D grid, pid -> (token block, batch*head) with the token block fastest, so
# programs running together read the same head's K/V (L2 reuse) and no grid axis can overflow.

if HAS_TRITON:

    # INTERP_BF16 is set only under TRITON_INTERPRET for bfloat16 inputs, where the interpreter
    # (triton 3.8) multiplies the raw bf16 bit patterns as integers in tl.dot and truncates in
    # fp32 -> bf16 casts. The two helpers below then emulate what the GPU does; on the GPU they are
    # a plain tl.dot and a plain (round-to-nearest-even) cast.

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
            k_base + n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask_n, mask_d,
            MASK_N, PAD_D,
        )  # (BLOCK_N, BLOCK_D)
        s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASK_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(
            v_base + n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask_n, mask_d,
            MASK_N, PAD_D,
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
        pid = tl.program_id(0)
        num_m = tl.cdiv(T, BLOCK_M)
        pid_m = pid % num_m
        bh = pid // num_m
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < T
        mask_d = offs_d < HEAD_DIM
        q = _load_tile(
            q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask_m, mask_d,
            True, PAD_D,
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
        o_ptrs = (
            O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot
            + offs_d[None, :] * stride_od
        )  # fmt: skip
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
        pid = tl.program_id(0)
        num_m = tl.cdiv(T, BLOCK_M)
        pid_m = pid % num_m
        bh = pid // num_m
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(
            O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot
            + offs_d[None, :] * stride_od, mask=mask, other=0.0,
        ).to(tl.float32)  # fmt: skip
        do = tl.load(
            DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
            + offs_d[None, :] * stride_dod, mask=mask, other=0.0,
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
            q_base + m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask_m, mask_d,
            MASK_M, PAD_D,
        )  # (BLOCK_M, BLOCK_D)
        do = _load_tile(
            do_base + m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask_m, mask_d,
            MASK_M, PAD_D,
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
        pid = tl.program_id(0)
        num_n = tl.cdiv(T, BLOCK_N)
        pid_n = pid % num_n
        bh = pid // num_n
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < T
        mask_d = offs_d < HEAD_DIM
        k = _load_tile(
            K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt
            + offs_d[None, :] * stride_kd, mask_n, mask_d, True, PAD_D,
        )  # fmt: skip
        v = _load_tile(
            V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt
            + offs_d[None, :] * stride_vd, mask_n, mask_d, True, PAD_D,
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
        dk_ptrs = (
            DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt
            + offs_d[None, :] * stride_dkd
        )  # fmt: skip
        tl.store(dk_ptrs, _cast(dk * sm_scale, DK.dtype.element_ty, INTERP_BF16), mask=mask)
        dv_ptrs = (
            DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt
            + offs_d[None, :] * stride_dvd
        )  # fmt: skip
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
            k_base + n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask_n, mask_d,
            MASK_N, PAD_D,
        )  # (BLOCK_N, BLOCK_D)
        v = _load_tile(
            v_base + n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask_n, mask_d,
            MASK_N, PAD_D,
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
        pid = tl.program_id(0)
        num_m = tl.cdiv(T, BLOCK_M)
        pid_m = pid % num_m
        bh = pid // num_m
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < T
        mask_d = offs_d < HEAD_DIM
        q = _load_tile(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt
            + offs_d[None, :] * stride_qd, mask_m, mask_d, True, PAD_D,
        )  # fmt: skip
        do = _load_tile(
            DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
            + offs_d[None, :] * stride_dod, mask_m, mask_d, True, PAD_D,
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
        dq_ptrs = (
            DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt
            + offs_d[None, :] * stride_dqd
        )  # fmt: skip
        tl.store(
            dq_ptrs, _cast(dq * sm_scale, DQ.dtype.element_ty, INTERP_BF16),
            mask=mask_m[:, None] & mask_d[None, :],
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Launch configuration. A fixed heuristic per head dim and dtype (what the interpreter and
# CMKERNELS_AUTOTUNE=0 use), and on CUDA by default triton.autotune over a few configs keyed on
# (T, d, dtypes), pruned to tiles no larger than the sequence. Autotuning runs on the first call
# of each key: warm up before capturing a CUDA graph.

LOG2E = 1.4426950408889634


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _tile(T: int) -> int:
    return max(16, _next_pow2(T))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (kernel, fp32 input, d > 64). fwd and dq: a
# program owns BLOCK_M queries and steps over BLOCK_N keys; dkdv: owns BLOCK_N keys, steps over
# BLOCK_M queries. Read off the sm_90 table of tools/aot_check.py (triton 3.8, at d = 64 and
# d = 128, the largest of each class: benchmarks/results/aot-sm90-sm80.md) by one rule:
# no register spills on sm_90 and at least 8 warps resident per SM; of those the largest tile, up
# to 128 x 64 for fp16/bf16 (the tensor cores want large tiles; 128 x 128 leaves one block per
# SM); if a tile at least half that size is spill-free on sm_80 too, that one; then more resident
# warps, fewer stages, fewer registers. fp32 inputs use ieee dots on the FMA units, which hold
# whole operand rows in registers: only 8-warp tiles of 16 rows (fwd at d <= 64: 16 x 64) stay
# spill-free, and at d > 64 the backward spills in every config (16 x 16 the least, a few hundred
# bytes per thread).
_HEURISTIC = {
    ("fwd", False, False): (128, 64, 8, 3),
    ("fwd", False, True): (128, 64, 8, 3),
    ("fwd", True, False): (16, 64, 8, 2),
    ("fwd", True, True): (16, 16, 8, 2),
    ("dkdv", False, False): (32, 128, 8, 3),
    ("dkdv", False, True): (32, 128, 8, 3),
    ("dkdv", True, False): (16, 16, 8, 2),
    ("dkdv", True, True): (16, 16, 8, 2),
    ("dq", False, False): (128, 64, 8, 3),
    ("dq", False, True): (128, 32, 8, 3),
    ("dq", True, False): (16, 16, 8, 2),
    ("dq", True, True): (16, 16, 8, 2),
}


def _heuristic(kernel: str, T: int, d: int, dtype: torch.dtype) -> dict:
    """Launch configuration of one kernel ("fwd", "dkdv", "dq") without autotuning."""
    block_m, block_n, warps, stages = _HEURISTIC[kernel, dtype == torch.float32, d > 64]
    tile = _tile(T)
    return dict(
        BLOCK_M=min(block_m, tile), BLOCK_N=min(block_n, tile), num_warps=warps, num_stages=stages
    )


if HAS_TRITON:

    def _configs(shapes) -> list:
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes
        ]

    def _prune(configs, named_args, **kwargs):
        # Tiles no larger than the sequence; fp32 (FMA dots) only small tiles.
        tile = _tile(named_args["T"])
        area = 2048 if named_args["Q"].dtype == torch.float32 else 1 << 30
        kept = [
            c
            for c in configs
            if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= tile
            and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= area
        ]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    _TUNE = dict(key=["T", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune})
    _attn_fwd_tuned = triton.autotune(
        _configs([
            (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
            (64, 32, 4, 4), (32, 32, 4, 2), (32, 16, 8, 2), (16, 16, 4, 2),
        ]), **_TUNE,
    )(_attn_fwd_kernel)  # fmt: skip
    _attn_bwd_dkdv_tuned = triton.autotune(
        _configs([
            (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 2), (64, 64, 4, 3),
            (16, 64, 8, 2), (16, 32, 4, 2), (16, 32, 8, 2), (16, 16, 4, 2),
        ]), **_TUNE,
    )(_attn_bwd_dkdv_kernel)  # fmt: skip
    _attn_bwd_dq_tuned = triton.autotune(
        _configs([
            (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2), (64, 64, 4, 3),
            (32, 16, 4, 2), (32, 16, 8, 2), (16, 16, 4, 2),
        ]), **_TUNE,
    )(_attn_bwd_dq_kernel)  # fmt: skip


_INTERPRET = INTERPRET  # TRITON_INTERPRET=1 was set before triton was imported: CPU tensors then


def _autotune(x: Tensor) -> bool:
    return x.is_cuda and not _INTERPRET and os.environ.get("CMKERNELS_AUTOTUNE", "1") != "0"


def _check_triton(op: str, *tensors: Tensor) -> None:
    check_launch(op, tensors[0], _KERNEL_DTYPES, *tensors[1:])


def _packed_strides(x: Tensor, d: int) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) element strides of a [B, n*d, T] view (channel = head*d + dim)."""
    sb, sc, st = x.stride()
    return sb, d * sc, st, sc


def _kernel_flags(x: Tensor, d: int) -> dict:
    block_d = max(16, _next_pow2(d))
    return dict(
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAD_D=block_d != d,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # ignored for fp16/bf16
        INTERP_BF16=_INTERPRET and x.dtype == torch.bfloat16,
    )


def _launch_forward(q, k, v, o, lse, strides, B: int, H: int, T: int, d: int) -> None:
    """q, k, v, o: tensors addressed through strides = (sq, sk, sv, so), each (b, h, t, d)."""
    args = (q, k, v, o, lse, *strides[0], *strides[1], *strides[2], *strides[3], H, T)
    args += (d**-0.5 * LOG2E,)
    flags = _kernel_flags(q, d)
    if _autotune(q):
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)
        _attn_fwd_tuned[grid](*args, **flags)
    else:
        cfg = _heuristic("fwd", T, d, q.dtype)
        _attn_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](*args, **flags, **cfg)


def _launch_backward(q, k, v, o, do, lse, dq, dk, dv, strides, B, H, T, d) -> None:
    """strides = (sq, sk, sv, so, sdo, sdq, sdk, sdv), each (b, h, t, d)."""
    sq, sk, sv, so, sdo, sdq, sdk, sdv = strides
    flags = _kernel_flags(q, d)
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    block = min(64, _tile(T))
    _attn_bwd_delta_kernel[(triton.cdiv(T, block) * B * H,)](
        o, do, delta, *so, *sdo, H, T,
        HEAD_DIM=d, BLOCK_D=flags["BLOCK_D"], BLOCK_M=block, num_warps=4,
    )  # fmt: skip
    scale = d**-0.5
    common = (*sq, *sk, *sv, *sdo)
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, *common, *sdk, *sdv, H, T, scale * LOG2E, scale)
    dq_args = (q, k, v, do, lse, delta, dq, *common, *sdq, H, T, scale * LOG2E, scale)
    if _autotune(q):
        _attn_bwd_dkdv_tuned[lambda m: (triton.cdiv(T, m["BLOCK_N"]) * B * H,)](*dkdv_args, **flags)
        _attn_bwd_dq_tuned[lambda m: (triton.cdiv(T, m["BLOCK_M"]) * B * H,)](*dq_args, **flags)
    else:
        cfg = _heuristic("dkdv", T, d, q.dtype)
        grid = (triton.cdiv(T, cfg["BLOCK_N"]) * B * H,)
        _attn_bwd_dkdv_kernel[grid](*dkdv_args, **flags, **cfg)
        cfg = _heuristic("dq", T, d, q.dtype)
        grid = (triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)
        _attn_bwd_dq_kernel[grid](*dq_args, **flags, **cfg)


# ------------------------------------------------------------------------------------------------
# Triton launchers: the CUDA kernels of the ops.


def attention_triton(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Packed forward: qkv [B, 3*H*d, T] -> (out [B, H*d, T], lse [B, H, T] fp32)."""
    d = check_packed(qkv, num_heads)
    _check_triton("attention", qkv)
    B, C3, T = qkv.shape
    C, H = C3 // 3, num_heads
    out = qkv.new_empty(B, C, T)
    lse = qkv.new_empty(B, H, T, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
    strides = tuple(_packed_strides(x, d) for x in (q, k, v, out))
    with device_guard(qkv):
        _launch_forward(q, k, v, out, lse, strides, B, H, T, d)
    return out, lse


def attention_backward_triton(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int
) -> Tensor:
    """Packed backward: grad_qkv [B, 3*H*d, T] (dq, dk, dv written straight into their channels)."""
    d = _check_packed_backward(grad_out, qkv, out, lse, num_heads)
    _check_triton("attention_backward", qkv, grad_out, out, lse)
    B, C3, T = qkv.shape
    C, H = C3 // 3, num_heads
    grad_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    if grad_qkv.numel() == 0:
        return grad_qkv
    q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
    dq, dk, dv = grad_qkv[:, :C], grad_qkv[:, C : 2 * C], grad_qkv[:, 2 * C :]
    views = (q, k, v, out, grad_out, dq, dk, dv)
    strides = tuple(_packed_strides(x, d) for x in views)
    with device_guard(qkv):
        _launch_backward(q, k, v, out, grad_out, lse.contiguous(), dq, dk, dv, strides, B, H, T, d)
    return grad_qkv


def attention_bhtd_triton(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Split forward: q, k, v [B, H, T, d] (any strides) -> (out [B, H, T, d], lse [B, H, T])."""
    check_bhtd(q, k, v)
    _check_triton("attention_bhtd", q, k, v)
    B, H, T, d = q.shape
    out = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    strides = tuple(x.stride() for x in (q, k, v, out))
    with device_guard(q):
        _launch_forward(q, k, v, out, lse, strides, B, H, T, d)
    return out, lse


def attention_bhtd_backward_triton(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Split backward: (dq, dk, dv), each [B, H, T, d] contiguous."""
    _check_bhtd_backward(grad_out, q, k, v, out, lse)
    _check_triton("attention_bhtd_backward", q, k, v, out, grad_out, lse)
    B, H, T, d = q.shape
    dq, dk, dv = (torch.empty(B, H, T, d, device=q.device, dtype=q.dtype) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    views = (q, k, v, out, grad_out, dq, dk, dv)
    strides = tuple(x.stride() for x in views)
    with device_guard(q):
        _launch_backward(q, k, v, out, grad_out, lse.contiguous(), dq, dk, dv, strides, B, H, T, d)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------
# CPU kernels: F.scaled_dot_product_attention (its fused CPU kernel) for the output; the logsumexp,
# which SDPA does not return, and the backward by the kernels' blockwise math, in query chunks of
# bounded memory, in fp32 (fp64 for fp64 input). The backward does not call autograd inside the
# op: a kernel runs below the autograd dispatch key, where that is not reliable.


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """View (B, H, T, d) of x [B, H*d, T]."""
    return x.unflatten(1, (num_heads, -1)).transpose(-1, -2)


def _split_packed(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views q, k, v (B, H, T, d) of a packed qkv [B, 3*H*d, T]."""
    return _heads(qkv, 3 * num_heads).chunk(3, dim=1)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> [B, H*d, T], contiguous."""
    B, H, T, d = x.shape
    return x.transpose(-1, -2).reshape(B, H * d, T).contiguous()


def _chunk_rows(B: int, H: int, T: int) -> int:
    return max(1, (1 << 22) // max(1, B * H * T))  # (B, H, rows, T) score chunks <= 4M elements


def _sdpa_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out (B, H, T, d), lse (B, H, T)): SDPA plus a chunked logsumexp."""
    B, H, T, d = q.shape
    dt = _lse_dtype(q)
    if q.numel() == 0:  # no rows (B or T = 0): nothing to compute, no chunks to concatenate
        return q.new_empty(q.shape), q.new_empty(B, H, T, dtype=dt)
    kt = k.to(dt).transpose(-1, -2)  # (B, H, d, T)
    rows = _chunk_rows(B, H, T)
    lse = [
        torch.logsumexp(torch.matmul(q[:, :, i : i + rows].to(dt), kt) * d**-0.5, dim=-1)
        for i in range(0, T, rows)
    ]
    return _cpu_sdpa(q, k, v), torch.cat(lse, dim=-1)


def _math_backward(q, k, v, out, grad_out, lse) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each (B, H, T, d): the derivation above the Triton backward kernels."""
    B, H, T, d = q.shape
    dt = _lse_dtype(q)
    scale = d**-0.5
    q, k, v, o, do = (x.to(dt) for x in (q, k, v, out, grad_out))
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)  # (B, H, d, T)
    delta = (do * o).sum(-1, keepdim=True)  # (B, H, T, 1)
    lse = lse.to(dt).unsqueeze(-1)  # (B, H, T, 1)
    dq = torch.empty(B, H, T, d, dtype=dt, device=q.device)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    rows = _chunk_rows(B, H, T)
    for i in range(0, T, rows):
        r = slice(i, i + rows)
        p = torch.exp(torch.matmul(q[:, :, r], kt) * scale - lse[:, :, r])  # (B, H, rows, T)
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, r])
        ds = p * (torch.matmul(do[:, :, r], vt) - delta[:, :, r])  # dS / scale
        dq[:, :, r] = torch.matmul(ds, k) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q[:, :, r])
    return dq.to(grad_out.dtype), (dk * scale).to(grad_out.dtype), dv.to(grad_out.dtype)


def _attention_cpu(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    check_packed(qkv, num_heads)
    out, lse = _sdpa_forward(*_split_packed(qkv, num_heads))
    return _merge_heads(out), lse


def _attention_backward_cpu(grad_out, qkv, out, lse, num_heads) -> Tensor:
    _check_packed_backward(grad_out, qkv, out, lse, num_heads)
    o, do = _heads(out, num_heads), _heads(grad_out, num_heads)
    grads = _math_backward(*_split_packed(qkv, num_heads), o, do, lse)
    B, C3, T = qkv.shape
    grad = grad_out.new_empty(B, C3, T)
    for g, slot in zip(grads, _split_packed(grad, num_heads), strict=True):
        slot.copy_(g)  # (B, H, T, d) into the packed layout, one copy each
    return grad


def _attention_bhtd_cpu(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    check_bhtd(q, k, v)
    out, lse = _sdpa_forward(q, k, v)
    return out.contiguous(), lse


def _attention_bhtd_backward_cpu(grad_out, q, k, v, out, lse):
    _check_bhtd_backward(grad_out, q, k, v, out, lse)
    return _math_backward(q, k, v, out, grad_out, lse)


# ------------------------------------------------------------------------------------------------
# Registration. The extension declares the schemas but holds no attention kernels: the CPU
# kernels (and, with triton, the CUDA ones) are registered here whether or not it is built.


def _kernels(cpu, cuda) -> dict:
    return {"cpu": cpu, "cuda": cuda} if HAS_TRITON else {"cpu": cpu}


_forward_op = define_op("attention", SCHEMA, kernels=_kernels(_attention_cpu, attention_triton))
_backward_op = define_op(
    "attention_backward",
    BACKWARD_SCHEMA,
    kernels=_kernels(_attention_backward_cpu, attention_backward_triton),
)
_bhtd_op = define_op(
    "attention_bhtd", BHTD_SCHEMA, kernels=_kernels(_attention_bhtd_cpu, attention_bhtd_triton)
)
_bhtd_backward_op = define_op(
    "attention_bhtd_backward",
    BHTD_BACKWARD_SCHEMA,
    kernels=_kernels(_attention_bhtd_backward_cpu, attention_bhtd_backward_triton),
)


@torch.library.register_fake("cmkernels::attention")
def _attention_fake(qkv, num_heads):
    check_packed(qkv, num_heads)
    B, C3, T = qkv.shape
    return qkv.new_empty(B, C3 // 3, T), qkv.new_empty(B, num_heads, T, dtype=_lse_dtype(qkv))


@torch.library.register_fake("cmkernels::attention_backward")
def _attention_backward_fake(grad_out, qkv, out, lse, num_heads):
    _check_packed_backward(grad_out, qkv, out, lse, num_heads)
    return qkv.new_empty(qkv.shape)


@torch.library.register_fake("cmkernels::attention_bhtd")
def _attention_bhtd_fake(q, k, v):
    check_bhtd(q, k, v)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.register_fake("cmkernels::attention_bhtd_backward")
def _attention_bhtd_backward_fake(grad_out, q, k, v, out, lse):
    _check_bhtd_backward(grad_out, q, k, v, out, lse)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads = num_heads


def _backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _backward_op(grad_out, qkv, out, lse, ctx.num_heads), None


def _bhtd_setup_context(ctx, inputs, output):
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*inputs, out, lse)


def _bhtd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return _bhtd_backward_op(grad_out, q, k, v, out, lse)


torch.library.register_autograd("cmkernels::attention", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "cmkernels::attention_bhtd", _bhtd_backward, setup_context=_bhtd_setup_context
)


# ------------------------------------------------------------------------------------------------
# Public API.


def _cpu_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # On the CPU, SDPA is 1.2-1.9x faster on contiguous (B, H, T, d) inputs than on the packed
    # layout's views (last dimension strided), copies included.
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Fused multi-head self-attention on the packed official layout.

    qkv:       [B, 3*H*d, T], channel order (three, heads, head_dim); float16, bfloat16, float32
               (float64 on the CPU); any strides. Head dim d = channels / (3 * num_heads), 1..128.
    num_heads: H.
    Returns [B, H*d, T] (channel order heads, head_dim), dtype of qkv; softmax scale 1/sqrt(d).
    """
    if qkv.device.type == "cpu":  # SDPA, differentiable through its own CPU kernels
        check_packed(qkv, num_heads)
        return _merge_heads(_cpu_sdpa(*_split_packed(qkv, num_heads)))
    out, _ = _forward_op(qkv, num_heads)
    return out


def attention_bhtd(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Fused multi-head self-attention on q, k, v [B, H, T, d] (any strides, same shape and dtype;
    d in 1..128). Returns [B, H, T, d]; softmax scale 1/sqrt(d)."""
    if q.device.type == "cpu":
        check_bhtd(q, k, v)
        return _cpu_sdpa(q, k, v)
    out, _ = _bhtd_op(q, k, v)
    return out
