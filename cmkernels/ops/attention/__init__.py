"""Multi-head self-attention of the UNet's attention blocks, fused (flash-attention style): the
torch.library registration of the four ops and the public entry points.

Layouts:
- packed (the official checkpoints): ``qkv`` [B, 3*H*d, T], channel order (three, heads, head_dim):
  q of head h = channels [h*d, (h+1)*d), k = C + the same, v = 2C + the same (C = H*d); the output
  is [B, H*d, T], channel order (heads, head_dim). The kernels address this layout through strides,
  so no permute/reshape copy happens around them.
- split: ``q``, ``k``, ``v`` [B, H, T, d] (any strides) -> [B, H, T, d].

Where things are:
- ``reference.py``: ``attention_ref`` / ``attention_bhtd_ref``, the pure-PyTorch references.
- ``checks.py``: the argument rules, one function per op, called by every path below.
- ``triton_kernels.py``: the Triton kernels; ``launch.py``: tile table, autotuning and the
  launchers ``attention_triton`` / ``attention_backward_triton`` / ``attention_bhtd_triton`` /
  ``attention_bhtd_backward_triton``, the ops' CUDA kernels (also runnable on CPU tensors under
  ``TRITON_INTERPRET=1``, as the tests do).
- ``cpu.py``: the ops' CPU kernels (forward: SDPA plus a chunked logsumexp; backward: the
  kernels' blockwise math in PyTorch).
- here: ``torch.ops.cmkernels.attention`` / ``attention_backward`` / ``attention_bhtd`` /
  ``attention_bhtd_backward`` (schemas in csrc/ops.cpp), their kernels, fake kernels and
  autograd; the forward ops return (out, lse), lse [B, H, T] the natural-log logsumexp of each
  softmax row in the accumulation dtype (fp32; fp64 for fp64 input), which the backward reuses; lse
  is not differentiable. And ``attention(qkv, num_heads)`` / ``attention_bhtd(q, k, v)``, the
  public entry points: on the CPU they call F.scaled_dot_product_attention on contiguous q, k, v,
  forward and backward (its CPU flash kernels beat the op's recomputing backward 2-3x); elsewhere
  the ops.

On CUDA the kernels' block sizes are autotuned per (T, d, dtype) on first use;
``CMKERNELS_AUTOTUNE=0`` selects the fixed per-head-dim table instead.

Head dims 1..128 (16, 32, 64, 128 natively; others are zero-padded inside the kernel to the next
power of two >= 16); any T >= 1; float16, bfloat16, float32 (float64 on the CPU only). The softmax
scale is 1/sqrt(d).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmkernels.ops.attention.checks import (
    check_bhtd,
    check_bhtd_backward,
    check_packed,
    check_packed_backward,
)
from cmkernels.ops.attention.cpu import (
    attention_backward_cpu,
    attention_bhtd_backward_cpu,
    attention_bhtd_cpu,
    attention_cpu,
    merge_heads,
    sdpa,
    split_packed,
)
from cmkernels.ops.attention.launch import (
    attention_backward_triton,
    attention_bhtd_backward_triton,
    attention_bhtd_triton,
    attention_triton,
    tile_config,
)
from cmkernels.ops.attention.reference import attention_bhtd_ref, attention_ref
from cmkernels.ops.common import acc_dtype
from cmkernels.ops.registry import define_op
from cmkernels.ops.triton_support import HAS_TRITON

SCHEMA = "(Tensor qkv, int num_heads) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads) -> Tensor"
BHTD_SCHEMA = "(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)"
BHTD_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse) "
    "-> (Tensor, Tensor, Tensor)"
)

__all__ = [
    "attention",
    "attention_bhtd",
    "attention_ref",
    "attention_bhtd_ref",
    "attention_triton",
    "attention_backward_triton",
    "attention_bhtd_triton",
    "attention_bhtd_backward_triton",
    "check_packed",
    "check_bhtd",
    "tile_config",
    "SCHEMA",
    "BACKWARD_SCHEMA",
    "BHTD_SCHEMA",
    "BHTD_BACKWARD_SCHEMA",
]


# ------------------------------------------------------------------------------------------------
# Registration. The extension declares the schemas but holds no attention kernels: the CPU
# kernels (and, with triton, the CUDA ones) are registered here whether or not it is built.


def _kernels(cpu, cuda) -> dict:
    return {"cpu": cpu, "cuda": cuda} if HAS_TRITON else {"cpu": cpu}


_forward_op = define_op("attention", SCHEMA, kernels=_kernels(attention_cpu, attention_triton))
_backward_op = define_op(
    "attention_backward",
    BACKWARD_SCHEMA,
    kernels=_kernels(attention_backward_cpu, attention_backward_triton),
)
_bhtd_op = define_op(
    "attention_bhtd", BHTD_SCHEMA, kernels=_kernels(attention_bhtd_cpu, attention_bhtd_triton)
)
_bhtd_backward_op = define_op(
    "attention_bhtd_backward",
    BHTD_BACKWARD_SCHEMA,
    kernels=_kernels(attention_bhtd_backward_cpu, attention_bhtd_backward_triton),
)


@torch.library.register_fake("cmkernels::attention")
def _attention_fake(qkv, num_heads):
    check_packed(qkv, num_heads)
    B, C3, T = qkv.shape
    return qkv.new_empty(B, C3 // 3, T), qkv.new_empty(B, num_heads, T, dtype=acc_dtype(qkv))


@torch.library.register_fake("cmkernels::attention_backward")
def _attention_backward_fake(grad_out, qkv, out, lse, num_heads):
    check_packed_backward(grad_out, qkv, out, lse, num_heads)
    return qkv.new_empty(qkv.shape)


@torch.library.register_fake("cmkernels::attention_bhtd")
def _attention_bhtd_fake(q, k, v):
    check_bhtd(q, k, v)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q))


@torch.library.register_fake("cmkernels::attention_bhtd_backward")
def _attention_bhtd_backward_fake(grad_out, q, k, v, out, lse):
    check_bhtd_backward(grad_out, q, k, v, out, lse)
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


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Fused multi-head self-attention on the packed official layout.

    qkv:       [B, 3*H*d, T], channel order (three, heads, head_dim); float16, bfloat16, float32
               (float64 on the CPU); any strides. Head dim d = channels / (3 * num_heads), 1..128.
    num_heads: H.
    Returns [B, H*d, T] (channel order heads, head_dim), dtype of qkv; softmax scale 1/sqrt(d).
    """
    if qkv.device.type == "cpu":  # SDPA, differentiable through its own CPU kernels
        check_packed(qkv, num_heads)
        return merge_heads(sdpa(*split_packed(qkv, num_heads)))
    out, _ = _forward_op(qkv, num_heads)
    return out


def attention_bhtd(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Fused multi-head self-attention on q, k, v [B, H, T, d] (any strides, same shape and dtype;
    d in 1..128). Returns [B, H, T, d]; softmax scale 1/sqrt(d)."""
    if q.device.type == "cpu":
        check_bhtd(q, k, v)
        return sdpa(q, k, v)
    out, _ = _bhtd_op(q, k, v)
    return out
