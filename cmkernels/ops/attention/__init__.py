"""Multi-head self-attention of the UNet's attention blocks, fused (flash-attention style): the
torch.library registration of the six ops and the public entry points.

Layouts:
- packed (the official checkpoints): ``qkv`` [B, 3*H*d, T], channel order (three, heads, head_dim):
  q of head h = channels [h*d, (h+1)*d), k = C + the same, v = 2C + the same (C = H*d); the output
  is [B, H*d, T], channel order (heads, head_dim). The kernels address this layout through strides,
  so no permute/reshape copy happens around them.
- split: ``q``, ``k``, ``v`` [B, H, T, d] (any strides) -> [B, H, T, d].

Where things are:
- ``reference.py``: ``attention_ref`` / ``attention_bhtd_ref``, the pure-PyTorch references, and
  ``attention_bhtd_tangent_ref``, the tangent's (section 11 of the spec, T x T in memory).
- ``checks.py``: the argument rules, one function per op, called by every path below.
- ``triton_kernels.py``: the Triton kernels; ``launch.py``: tile table, autotuning and the
  launchers ``attention_triton`` / ``attention_backward_triton`` / ``attention_bhtd_triton`` /
  ``attention_bhtd_backward_triton`` / ``attention_jvp_triton`` / ``attention_bhtd_jvp_triton``,
  the ops' CUDA kernels (also runnable on CPU tensors under ``TRITON_INTERPRET=1``, as the tests
  do).
- ``cpu.py``: the ops' CPU kernels (forward: SDPA plus a chunked logsumexp; backward: the
  kernels' blockwise math in PyTorch; JVP: query blocks against all keys in large matmuls).
- here: ``torch.ops.cmkernels.attention`` / ``attention_backward`` / ``attention_bhtd`` /
  ``attention_bhtd_backward`` / ``attention_jvp`` / ``attention_bhtd_jvp`` (schemas in
  csrc/ops.cpp), their kernels, fake kernels and autograd; the forward ops return (out, lse), lse
  [B, H, T] the natural-log logsumexp of each softmax row in the accumulation dtype (fp32; fp64 for
  fp64 input), which the backward reuses; lse is not differentiable. The JVP ops return (out,
  tout, lse) for the inputs' tangents (forward-mode AD in one pass, no T x T matrix; no reverse-mode
  derivative: differentiating through them raises). And ``attention(qkv, num_heads)`` /
  ``attention_bhtd(q, k, v)``, the public entry points: on the CPU they call
  F.scaled_dot_product_attention on contiguous q, k, v, forward and backward (its CPU flash kernels
  beat the op's recomputing backward 2-3x); elsewhere the ops. Under forward-mode AD
  (torch.func.jvp, dual tensors) they route, on every device, to the JVP ops (see "Forward-mode
  AD" below). ``attention_with_tangent`` / ``attention_bhtd_with_tangent`` call the JVP ops
  directly: (out, tout) without dual tensors, for torch.compile(fullgraph=True) and CUDA graphs.

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
    check_bhtd_jvp,
    check_packed,
    check_packed_backward,
    check_packed_jvp,
)
from cmkernels.ops.attention.cpu import (
    attention_backward_cpu,
    attention_bhtd_backward_cpu,
    attention_bhtd_cpu,
    attention_bhtd_jvp_cpu,
    attention_cpu,
    attention_jvp_cpu,
    merge_heads,
    sdpa,
    split_packed,
)
from cmkernels.ops.attention.launch import (
    attention_backward_triton,
    attention_bhtd_backward_triton,
    attention_bhtd_jvp_triton,
    attention_bhtd_triton,
    attention_jvp_triton,
    attention_triton,
    tile_config,
)
from cmkernels.ops.attention.reference import (
    attention_bhtd_ref,
    attention_bhtd_tangent_ref,
    attention_ref,
)
from cmkernels.ops.common import (
    FORWARD_AD_EAGER_ONLY,
    acc_dtype,
    has_tangent,
    records_graph,
    split_duals,
    stacked_levels,
)
from cmkernels.ops.registry import define_op, register_batch_folding_vmap
from cmkernels.ops.triton_support import HAS_TRITON

SCHEMA = "(Tensor qkv, int num_heads) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads) -> Tensor"
BHTD_SCHEMA = "(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)"
BHTD_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse) "
    "-> (Tensor, Tensor, Tensor)"
)
JVP_SCHEMA = "(Tensor qkv, Tensor tqkv, int num_heads) -> (Tensor, Tensor, Tensor)"
BHTD_JVP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? tq, Tensor? tk, Tensor? tv) -> (Tensor, Tensor, Tensor)"
)

__all__ = [
    "attention",
    "attention_bhtd",
    "attention_ref",
    "attention_bhtd_ref",
    "attention_bhtd_tangent_ref",
    "attention_with_tangent",
    "attention_bhtd_with_tangent",
    "attention_triton",
    "attention_backward_triton",
    "attention_bhtd_triton",
    "attention_bhtd_backward_triton",
    "attention_jvp_triton",
    "attention_bhtd_jvp_triton",
    "check_packed",
    "check_bhtd",
    "check_packed_jvp",
    "check_bhtd_jvp",
    "tile_config",
    "SCHEMA",
    "BACKWARD_SCHEMA",
    "BHTD_SCHEMA",
    "BHTD_BACKWARD_SCHEMA",
    "JVP_SCHEMA",
    "BHTD_JVP_SCHEMA",
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
_jvp_op = define_op(
    "attention_jvp", JVP_SCHEMA, kernels=_kernels(attention_jvp_cpu, attention_jvp_triton)
)
_bhtd_jvp_op = define_op(
    "attention_bhtd_jvp",
    BHTD_JVP_SCHEMA,
    kernels=_kernels(attention_bhtd_jvp_cpu, attention_bhtd_jvp_triton),
)


# vmap: the vmapped dimension folds into the batch (every tensor and output leads with it).
register_batch_folding_vmap("attention", [0])
register_batch_folding_vmap("attention_backward", [0, 1, 2, 3])
register_batch_folding_vmap("attention_bhtd", [0, 1, 2])
register_batch_folding_vmap("attention_bhtd_backward", [0, 1, 2, 3, 4, 5])
register_batch_folding_vmap("attention_jvp", [0, 1])
register_batch_folding_vmap("attention_bhtd_jvp", [0, 1, 2, 3, 4, 5])


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


@torch.library.register_fake("cmkernels::attention_jvp")
def _attention_jvp_fake(qkv, tqkv, num_heads):
    check_packed_jvp(qkv, tqkv, num_heads)
    B, C3, T = qkv.shape
    lse = qkv.new_empty(B, num_heads, T, dtype=acc_dtype(qkv))
    return qkv.new_empty(B, C3 // 3, T), qkv.new_empty(B, C3 // 3, T), lse


@torch.library.register_fake("cmkernels::attention_bhtd_jvp")
def _attention_bhtd_jvp_fake(q, k, v, tq, tk, tv):
    check_bhtd_jvp(q, k, v, tq, tk, tv)
    lse = q.new_empty(q.shape[:3], dtype=acc_dtype(q))
    return q.new_empty(q.shape), q.new_empty(q.shape), lse


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
# Forward-mode AD. torch.library has no forward-AD registration (a registered op drops tangents
# silently) and SDPA has none either (pytorch issues 128971, 154226). The fused JVP ops compute out
# and its tangent in one pass (flash-style on CUDA, query blocks on the CPU; no T x T matrix), and
# the public entry points route calls that carry tangents (``_attention_forward_ad``):
# - the direct route: where ``split_duals`` finds one plain forward-AD level and no reverse-mode
#   recording (torch.func.jvp under torch.no_grad(), dual tensors that do not require grad), one
#   call of the JVP op on the primals and tangents, re-wrapped with forward_ad.make_dual;
# - two or more torch.func grad / jvp levels stacked on the inputs (jvp of jvp, torch.func.grad
#   of a jvp): the reference in differentiable PyTorch (T x T), since the outer level
#   differentiates the tangent itself, which the fused ops (no derivatives of their own) cannot
#   serve;
# - otherwise the autograd.Functions ``_AttentionJvp`` / ``_AttentionBhtdJvp``: forward = the
#   registered op, backward = the registered backward op, jvp = the JVP op's tangent (its out goes
#   unused). They compose with vmap (the generated rule) and with reverse mode on the output (dual
#   tensors that require grad, torch.func.jvp in grad mode); a reverse pass through the tangent
#   there reaches the JVP op's autograd, which raises.


def _jvp_no_backward(ctx, *grads):
    raise RuntimeError(
        "cmkernels::attention_jvp / attention_bhtd_jvp have no reverse-mode derivative: the "
        "tangent they return cannot be differentiated by autograd. Differentiate the output of "
        "attention / attention_bhtd instead, or take the tangent under torch.func.grad (whose "
        "nested levels go through the differentiable reference)"
    )


def _jvp_setup_context(ctx, inputs, output):
    pass


for _name in ("attention_jvp", "attention_bhtd_jvp"):
    torch.library.register_autograd(
        f"cmkernels::{_name}", _jvp_no_backward, setup_context=_jvp_setup_context
    )


class _AttentionJvp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(qkv, num_heads):
        return _forward_op(qkv, num_heads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse)

    @staticmethod
    def jvp(ctx, tqkv, _num_heads):
        (qkv,) = ctx.saved_tensors
        _, tout, _ = _jvp_op(qkv, tqkv, ctx.num_heads)
        return tout, None


class _AttentionBhtdJvp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        return _bhtd_op(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _bhtd_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _bhtd_backward(ctx, grad_out, grad_lse)

    @staticmethod
    def jvp(ctx, tq, tk, tv):
        q, k, v = ctx.saved_tensors
        _, tout, _ = _bhtd_jvp_op(q, k, v, tq, tk, tv)
        return tout, None


# torch.compile inlines an autograd.Function's forward and drops its jvp when no input requires
# grad (a silent zero tangent), so the routes run outside the compiled graph: a graph break, or,
# under fullgraph=True, dynamo's error naming these functions. (attention_with_tangent and
# attention_bhtd_with_tangent are the compilable forms.)
@torch.compiler.disable(reason=FORWARD_AD_EAGER_ONLY)
def _attention_forward_ad(qkv: Tensor, num_heads: int) -> Tensor:
    split = split_duals(qkv)
    if split is not None:  # the direct route: one launch for out and its tangent
        (x,), (tx,) = split
        out, tout, _ = _jvp_op(x, tx, num_heads)
        return torch.autograd.forward_ad.make_dual(out, tout)
    if stacked_levels(qkv):
        check_packed(qkv, num_heads)
        return attention_ref(qkv, num_heads)
    return _AttentionJvp.apply(qkv, num_heads)[0]


@torch.compiler.disable(reason=FORWARD_AD_EAGER_ONLY)
def _attention_bhtd_forward_ad(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    split = split_duals(q, k, v)
    if split is not None:
        (q, k, v), (tq, tk, tv) = split
        out, tout, _ = _bhtd_jvp_op(q, k, v, tq, tk, tv)
        return torch.autograd.forward_ad.make_dual(out, tout)
    if stacked_levels(q, k, v):
        check_bhtd(q, k, v)
        return attention_bhtd_ref(q, k, v)
    return _AttentionBhtdJvp.apply(q, k, v)[0]


# ------------------------------------------------------------------------------------------------
# Public entry points.


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Fused multi-head self-attention on the packed official layout.

    qkv:       [B, 3*H*d, T], channel order (three, heads, head_dim); float16, bfloat16, float32
               (float64 on the CPU); any strides. Head dim d = channels / (3 * num_heads), 1..128.
    num_heads: H.
    Returns [B, H*d, T] (channel order heads, head_dim), dtype of qkv; softmax scale 1/sqrt(d).
    Differentiable in reverse and forward mode (torch.func.jvp, dual tensors: the tangent from
    the fused op attention_jvp; see the routes above).
    """
    if has_tangent(qkv):  # forward-mode AD, on every device
        return _attention_forward_ad(qkv, num_heads)
    if qkv.device.type == "cpu":  # SDPA, differentiable through its own CPU kernels
        check_packed(qkv, num_heads)
        return merge_heads(sdpa(*split_packed(qkv, num_heads)))
    out, _ = _forward_op(qkv, num_heads)
    return out


def attention_bhtd(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Fused multi-head self-attention on q, k, v [B, H, T, d] (any strides, same shape and dtype;
    d in 1..128). Returns [B, H, T, d]; softmax scale 1/sqrt(d). Differentiable in reverse and
    forward mode."""
    if has_tangent(q, k, v):
        return _attention_bhtd_forward_ad(q, k, v)
    if q.device.type == "cpu":
        check_bhtd(q, k, v)
        return sdpa(q, k, v)
    out, _ = _bhtd_op(q, k, v)
    return out


# _CPU_GRAD_MODE: on the CPU, with autograd recording, the *_with_tangent functions take the value
# (and its backward) from attention() / attention_bhtd(), i.e. PyTorch's SDPA, and only the
# tangent from the JVP op: SDPA's CPU forward + backward beat the JVP op's value + our CPU
# backward (B 16, C 128, T 256: 68 vs 97 ms per step on 2 cores, 2026-12-03), although the value
# is then computed twice. On CUDA the JVP launch's value and lse feed the Triton backward.


def _value_from_sdpa(x: Tensor) -> bool:
    """Whether a grad-mode *_with_tangent call takes its value from attention() (_CPU_GRAD_MODE)."""
    return x.device.type == "cpu"


class _AttentionWithTangent(torch.autograd.Function):
    """(out, tout) from one JVP launch with out differentiable in reverse mode: the JVP op's lse
    feeds the fused backward, so a training step that needs out's gradients and tout as a
    constant runs one attention per layer. tout is marked non-differentiable (requires_grad
    False), as groupnorm_silu_with_tangent's ty and for the same reason."""

    generate_vmap_rule = True

    @staticmethod
    def forward(qkv, tqkv, num_heads):
        return _jvp_op(qkv, tqkv, num_heads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, _, num_heads = inputs
        out, _, lse = output
        ctx.mark_non_differentiable(output[1], lse)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads

    @staticmethod
    def backward(ctx, grad_out, grad_tout, grad_lse):
        return _backward(ctx, grad_out, None)[0], None, None


class _AttentionBhtdWithTangent(torch.autograd.Function):
    """attention_bhtd_with_tangent's reverse mode, as _AttentionWithTangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, tq, tk, tv):
        return _bhtd_jvp_op(q, k, v, tq, tk, tv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        out, _, lse = output
        ctx.mark_non_differentiable(output[1], lse)
        ctx.save_for_backward(*inputs[:3], out, lse)

    @staticmethod
    def backward(ctx, grad_out, grad_tout, grad_lse):
        return tuple(_bhtd_backward(ctx, grad_out, None)) + (None,) * 3


def attention_with_tangent(qkv: Tensor, tqkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """(out, tout): out = attention(qkv, num_heads) and its tangent along tqkv (shaped and typed
    like qkv, any strides), in one fused pass; both [B, H*d, T] in qkv's dtype.

    The explicit form of forward-mode AD through attention: no dual tensors, so it compiles under
    torch.compile(fullgraph=True) and captures in CUDA graphs. In reverse mode out has the
    gradient of attention (the fused backward, from the same launch's log-sum-exp) and tout comes
    back non-differentiable (requires_grad False; derivatives of the tangent need attention under
    torch.func.jvp).
    """
    if records_graph(qkv):
        if _value_from_sdpa(qkv):
            with torch.no_grad():
                tout = _jvp_op(qkv.detach(), tqkv, num_heads)[1]
            return attention(qkv, num_heads), tout
        out, tout, _ = _AttentionWithTangent.apply(qkv, tqkv, num_heads)
        return out, tout
    out, tout, _ = _jvp_op(qkv, tqkv, num_heads)
    return out, tout


def attention_bhtd_with_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None = None,
    tk: Tensor | None = None,
    tv: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, tout): out = attention_bhtd(q, k, v) and its tangent along tq, tk, tv (None: a zero
    tangent, its work skipped; each like q, any strides), in one fused pass; both [B, H, T, d].
    Compilable and capturable like attention_with_tangent; in reverse mode out has
    attention_bhtd's gradients and tout is non-differentiable."""
    if records_graph(q, k, v):
        if _value_from_sdpa(q):
            with torch.no_grad():
                tout = _bhtd_jvp_op(q.detach(), k.detach(), v.detach(), tq, tk, tv)[1]
            return attention_bhtd(q, k, v), tout
        out, tout, _ = _AttentionBhtdWithTangent.apply(q, k, v, tq, tk, tv)
        return out, tout
    out, tout, _ = _bhtd_jvp_op(q, k, v, tq, tk, tv)
    return out, tout
