"""The Triton launch of attention: the tile table (``TILES``, ``tile_config``) that the
interpreter and ``CMKERNELS_AUTOTUNE=0`` use, the autotuned kernels that CUDA uses by default, and
the six launchers that are the ops' CUDA kernels (``attention_triton``,
``attention_backward_triton``, ``attention_bhtd_triton``, ``attention_bhtd_backward_triton``,
``attention_jvp_triton``, ``attention_bhtd_jvp_triton``; also runnable on CPU tensors under
``TRITON_INTERPRET=1``).

Autotuning keys on (T, d, dtypes), over a few configs pruned to tiles no larger than the sequence;
it runs on the first call of each key: warm up before capturing a CUDA graph.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from cmkernels.ops.attention.checks import (
    KERNEL_DTYPES,
    check_bhtd,
    check_bhtd_backward,
    check_bhtd_jvp,
    check_packed,
    check_packed_backward,
    check_packed_jvp,
)
from cmkernels.ops.common import acc_dtype
from cmkernels.ops.triton_support import (
    HAS_TRITON,
    INTERPRET,
    check_launch,
    device_guard,
    next_pow2,
    triton,
)

if HAS_TRITON:
    from cmkernels.ops.attention import triton_kernels as K

LOG2E = 1.4426950408889634


def _tile(T: int) -> int:
    return max(16, next_pow2(T))


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
TILES = {
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
    # jvp: like fwd (BLOCK_M queries per program, BLOCK_N keys per step), with the forward's
    # accumulator twice (acc, acc_t), Q' beside Q and (BLOCK_M, BLOCK_N) tiles S, P, S', P o S'.
    # Compiled for sm_90 / sm_80 by the same rule (triton 3.8, tools/aot_check.py's compile on
    # the launch of a [2, 3*6*d, 1024] qkv): 16-bit at d = 64, 128 x 64 is spill-free on sm_90
    # only, 128 x 32 on both (170 / 255 registers); at d = 128, 128 x 32 with 2 stages is
    # spill-free on sm_90 (255 registers, 128 KB shared; 128 x 64 exceeds shared memory), every
    # tile spills on sm_80. fp32 spills in every config, 16 x 16 the least (284 B at d = 64,
    # 1.7 KB at d = 128).
    ("jvp", False, False): (128, 32, 8, 3),
    ("jvp", False, True): (128, 32, 8, 2),
    ("jvp", True, False): (16, 16, 8, 2),
    ("jvp", True, True): (16, 16, 8, 2),
}


def tile_config(kernel: str, T: int, d: int, dtype: torch.dtype) -> dict:
    """Launch configuration of one kernel ("fwd", "dkdv", "dq", "jvp") without autotuning: TILES
    capped at the sequence's tile. The launchers look it up by this name at each launch (a test
    swaps it for small tiles)."""
    block_m, block_n, warps, stages = TILES[kernel, dtype == torch.float32, d > 64]
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
    )(K._attn_fwd_kernel)  # fmt: skip
    _attn_bwd_dkdv_tuned = triton.autotune(
        _configs([
            (32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 2), (64, 64, 4, 3),
            (16, 64, 8, 2), (16, 32, 4, 2), (16, 32, 8, 2), (16, 16, 4, 2),
        ]), **_TUNE,
    )(K._attn_bwd_dkdv_kernel)  # fmt: skip
    _attn_bwd_dq_tuned = triton.autotune(
        _configs([
            (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2), (64, 64, 4, 3),
            (32, 16, 4, 2), (32, 16, 8, 2), (16, 16, 4, 2),
        ]), **_TUNE,
    )(K._attn_bwd_dq_kernel)  # fmt: skip
    _attn_jvp_tuned = triton.autotune(
        _configs([
            (128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3),
            (64, 16, 4, 2), (32, 32, 4, 2), (16, 16, 8, 2), (16, 16, 4, 2),
        ]),
        key=["T", "HEAD_DIM", "HAS_TQ", "HAS_TK", "HAS_TV"],
        prune_configs_by={"early_config_prune": _prune},
    )(K._attn_jvp_kernel)  # fmt: skip


def _autotune(x: Tensor) -> bool:
    return x.is_cuda and not INTERPRET and os.environ.get("CMKERNELS_AUTOTUNE", "1") != "0"


def _check_triton(op: str, *tensors: Tensor) -> None:
    check_launch(op, tensors[0], KERNEL_DTYPES, *tensors[1:])


def _packed_strides(x: Tensor, d: int) -> tuple[int, int, int, int]:
    """(batch, head, token, dim) element strides of a [B, n*d, T] view (channel = head*d + dim)."""
    sb, sc, st = x.stride()
    return sb, d * sc, st, sc


def _kernel_flags(x: Tensor, d: int) -> dict:
    block_d = max(16, next_pow2(d))
    return dict(
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAD_D=block_d != d,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # ignored for fp16/bf16
        INTERP_BF16=INTERPRET and x.dtype == torch.bfloat16,
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
        cfg = tile_config("fwd", T, d, q.dtype)
        K._attn_fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](*args, **flags, **cfg)


def _launch_backward(q, k, v, o, do, lse, dq, dk, dv, strides, B, H, T, d) -> None:
    """strides = (sq, sk, sv, so, sdo, sdq, sdk, sdv), each (b, h, t, d)."""
    sq, sk, sv, so, sdo, sdq, sdk, sdv = strides
    flags = _kernel_flags(q, d)
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    block = min(64, _tile(T))
    K._attn_bwd_delta_kernel[(triton.cdiv(T, block) * B * H,)](
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
        cfg = tile_config("dkdv", T, d, q.dtype)
        grid = (triton.cdiv(T, cfg["BLOCK_N"]) * B * H,)
        K._attn_bwd_dkdv_kernel[grid](*dkdv_args, **flags, **cfg)
        cfg = tile_config("dq", T, d, q.dtype)
        grid = (triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)
        K._attn_bwd_dq_kernel[grid](*dq_args, **flags, **cfg)


# ------------------------------------------------------------------------------------------------
# Triton launchers: the CUDA kernels of the ops. Each runs its op's check first (the rules the fake
# kernel and the CPU kernel share), then the launch checks (triton present, CUDA or the
# interpreter, a dtype the kernels take).


def attention_triton(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Packed forward: qkv [B, 3*H*d, T] -> (out [B, H*d, T], lse [B, H, T] fp32)."""
    d = check_packed(qkv, num_heads)
    _check_triton("attention", qkv)
    B, C3, T = qkv.shape
    C, H = C3 // 3, num_heads
    out = qkv.new_empty(B, C, T)
    lse = qkv.new_empty(B, H, T, dtype=acc_dtype(qkv))
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
    d = check_packed_backward(grad_out, qkv, out, lse, num_heads)
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
    lse = torch.empty(B, H, T, device=q.device, dtype=acc_dtype(q))
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
    check_bhtd_backward(grad_out, q, k, v, out, lse)
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
# Forward-mode AD: O, O' and lse in one pass (the derivation in triton_kernels.py).


def _launch_jvp(q, k, v, tq, tk, tv, o, to, lse, strides, B, H, T, d) -> None:
    """strides = (sq, sk, sv, stq, stk, stv, so, sto), each (b, h, t, d); a tangent that is None
    is zero (its work is skipped; q stands in for its pointer and strides)."""
    sq, sk, sv, stq, stk, stv, so, sto = strides
    flags = _kernel_flags(q, d)
    flags.update(HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None)
    flags.update(SPLIT_PDS=q.dtype != torch.float32)
    tangents = [(q, sq) if t is None else (t, st) for t, st in ((tq, stq), (tk, stk), (tv, stv))]
    args = (q, k, v, *(t for t, _ in tangents), o, to, lse, *sq, *sk, *sv)
    args += (*tangents[0][1], *tangents[1][1], *tangents[2][1], *so, *sto, H, T)
    args += (d**-0.5 * LOG2E, d**-0.5)
    if _autotune(q):
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,)
        _attn_jvp_tuned[grid](*args, **flags)
    else:
        cfg = tile_config("jvp", T, d, q.dtype)
        K._attn_jvp_kernel[(triton.cdiv(T, cfg["BLOCK_M"]) * B * H,)](*args, **flags, **cfg)


def attention_jvp_triton(
    qkv: Tensor, tqkv: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed forward-mode AD: qkv and its tangent tqkv [B, 3*H*d, T] (any strides, each its own)
    -> (out [B, H*d, T], tout [B, H*d, T], lse [B, H, T] fp32)."""
    d = check_packed_jvp(qkv, tqkv, num_heads)
    _check_triton("attention_jvp", qkv, tqkv)
    B, C3, T = qkv.shape
    C, H = C3 // 3, num_heads
    out = qkv.new_empty(B, C, T)
    tout = qkv.new_empty(B, C, T)
    lse = qkv.new_empty(B, H, T, dtype=acc_dtype(qkv))
    if out.numel() == 0:
        return out, tout, lse
    q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
    tq, tk, tv = tqkv[:, :C], tqkv[:, C : 2 * C], tqkv[:, 2 * C :]
    views = (q, k, v, tq, tk, tv, out, tout)
    strides = tuple(_packed_strides(x, d) for x in views)
    with device_guard(qkv):
        _launch_jvp(q, k, v, tq, tk, tv, out, tout, lse, strides, B, H, T, d)
    return out, tout, lse


def attention_bhtd_jvp_triton(
    q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Split forward-mode AD: q, k, v [B, H, T, d] and tangents (each None (zero) or like q; any
    strides) -> (out, tout [B, H, T, d] contiguous, lse [B, H, T] fp32)."""
    check_bhtd_jvp(q, k, v, tq, tk, tv)
    _check_triton("attention_bhtd_jvp", q, k, v, tq, tk, tv)
    B, H, T, d = q.shape
    out = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)
    tout = torch.empty(B, H, T, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=acc_dtype(q))
    if out.numel() == 0:
        return out, tout, lse
    views = (q, k, v, tq, tk, tv, out, tout)
    strides = tuple(None if x is None else x.stride() for x in views)
    with device_guard(q):
        _launch_jvp(q, k, v, tq, tk, tv, out, tout, lse, strides, B, H, T, d)
    return out, tout, lse
