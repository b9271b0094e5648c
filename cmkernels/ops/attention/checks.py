"""The argument checks of the attention ops, one function per op: the public functions, the fake
kernels, the CPU kernels and the Triton launchers all call these, so every path accepts the same
inputs and raises the same error (type and text) for a bad one.

Rules:
- packed qkv: [B, 3*H*d, T], num_heads >= 1, the channels a positive multiple of 3 * num_heads;
  split q, k, v: [B, H, T, d], one shape, dtype and device;
- dtype float16, bfloat16 or float32, and float64 on the CPU (the Triton kernels that serve CUDA
  tensors take no float64);
- head dim d in 1..MAX_HEAD_DIM;
- backward: grad_out and out shaped like the output, in the inputs' dtype and on their device; lse
  [B, H, T] in the accumulation dtype (float32; float64 for float64), which is what every forward
  path returns;
- jvp (forward-mode AD): each tangent shaped like its primal, in its dtype and on its device (any
  strides); the split op's tangents may be None (a zero tangent).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.common import acc_dtype, dtype_str, shape_str

MAX_HEAD_DIM = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
DTYPES = KERNEL_DTYPES + (torch.float64,)  # float64: CPU kernels only (gradcheck)


def _check_dtype(op: str, name: str, x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16 or float32 (float64 on the CPU), "
            f"got {dtype_str(x.dtype)}"
        )
    if x.dtype == torch.float64 and x.device.type == "cuda":
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16 or float32 on CUDA "
            "(float64 is served by the CPU kernels only)"
        )


def _check_head_dim(op: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: head dim {d} is not supported; the kernels take head dims 1..{MAX_HEAD_DIM}"
        )


def check_packed(qkv: Tensor, num_heads: int, op: str = "attention") -> int:
    """Validate a packed qkv [B, 3*H*d, T]; returns the head dim d."""
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must have shape [B, 3*H*d, T], got {shape_str(qkv)}")
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
        raise ValueError(f"{op}: q must have shape [B, H, T, d], got {shape_str(q)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(
                f"{op}: {name} has shape {shape_str(x)} but q has shape {shape_str(q)} "
                "(self-attention: q, k, v share [B, H, T, d])"
            )
        if x.dtype != q.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {dtype_str(x.dtype)} but q has dtype {dtype_str(q.dtype)}"
            )
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device} but q is on {q.device}")
    _check_dtype(op, "q", q)
    _check_head_dim(op, q.shape[-1])


def _check_like(op: str, name: str, x: Tensor, shape, ref: Tensor, dtype=None) -> None:
    dtype = dtype or ref.dtype
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {shape_str(x)}, expected {shape_str(shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {dtype_str(x.dtype)}, expected {dtype_str(dtype)}")
    if x.device != ref.device:
        raise ValueError(f"{op}: {name} is on {x.device} but the inputs are on {ref.device}")


def check_packed_backward(grad_out, qkv, out, lse, num_heads, op="attention_backward") -> int:
    """Validate the packed backward's arguments; returns the head dim d."""
    d = check_packed(qkv, num_heads, op)
    B, C3, T = qkv.shape
    _check_like(op, "grad_out", grad_out, (B, C3 // 3, T), qkv)
    _check_like(op, "out", out, (B, C3 // 3, T), qkv)
    _check_like(op, "lse", lse, (B, num_heads, T), qkv, acc_dtype(qkv))
    return d


def check_bhtd_backward(grad_out, q, k, v, out, lse, op="attention_bhtd_backward") -> None:
    """Validate the split backward's arguments."""
    check_bhtd(q, k, v, op)
    _check_like(op, "grad_out", grad_out, q.shape, q)
    _check_like(op, "out", out, q.shape, q)
    _check_like(op, "lse", lse, q.shape[:3], q, acc_dtype(q))


def _check_tangent(op: str, name: str, t: Tensor, primal: Tensor, primal_name: str) -> None:
    if t.shape != primal.shape:
        raise ValueError(
            f"{op}: {name} has shape {shape_str(t)} but {primal_name} has shape "
            f"{shape_str(primal)} (a tangent is shaped like its primal)"
        )
    if t.dtype != primal.dtype:
        raise TypeError(
            f"{op}: {name} has dtype {dtype_str(t.dtype)} but {primal_name} has dtype "
            f"{dtype_str(primal.dtype)}"
        )
    if t.device != primal.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {primal_name} is on {primal.device}")


def check_packed_jvp(qkv: Tensor, tqkv: Tensor, num_heads: int, op: str = "attention_jvp") -> int:
    """Validate a packed qkv [B, 3*H*d, T] and its tangent tqkv (same shape, dtype, device);
    returns the head dim d."""
    d = check_packed(qkv, num_heads, op)
    _check_tangent(op, "tqkv", tqkv, qkv, "qkv")
    return d


def check_bhtd_jvp(q, k, v, tq, tk, tv, op: str = "attention_bhtd_jvp") -> None:
    """Validate q, k, v [B, H, T, d] and their tangents (each None or like q)."""
    check_bhtd(q, k, v, op)
    for name, t, primal in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t is not None:
            _check_tangent(op, name, t, primal, name[1:])
