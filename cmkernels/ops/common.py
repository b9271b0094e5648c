"""Rules every op shares, so each is written once: the accumulation dtype of a tensor, the memory
layout an op's outputs keep, a density test, and how the error messages print shapes, dtypes and
numbers (the C++ kernels print them the same way: ``[2, 8, 4, 4]``, ``float32``, ``%g``; see
``csrc/common.h``), so an argument error reads the same whichever path raised it.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(x: Tensor | torch.dtype) -> torch.dtype:
    """The accumulation dtype of x: float64 for float64, float32 for everything else. It is also
    the dtype of every statistic an op returns (GroupNorm's mean and rstd, attention's lse)."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def kept_layout(
    x: Tensor,
    formats: tuple[torch.memory_format, ...] = (torch.channels_last, torch.channels_last_3d),
) -> torch.memory_format:
    """The memory format of an op's outputs: contiguous where x is contiguous; else x's own where
    it is one of ``formats`` (channels_last needs 4 dims, channels_last_3d 5); else contiguous (the
    kernels copy x to it). The rule of ``kept_layout`` in csrc/common.h."""
    if x.is_contiguous():
        return torch.contiguous_format
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if fmt in formats and x.dim() == dims and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous tensor (what ATen's
    is_non_overlapping_and_dense says, computed the same way)."""
    sizes, strides = t.shape, t.stride()
    if t.dim() == 1:
        return sizes[0] < 2 or strides[0] == 1
    # bool(): under symbolic shapes a comparison is a SymBool, which tuples cannot order.
    order = sorted(range(t.dim()), key=lambda i: (bool(sizes[i] < 2), strides[i]))
    want = 1
    for i in order:
        if sizes[i] < 2:
            return True
        if strides[i] != want:
            return False
        want *= sizes[i]
    return True


def shape_str(t: Tensor | tuple) -> str:
    """A shape as the C++ kernels print it: ``[2, 8, 4, 4]``."""
    return str(list(t.shape if isinstance(t, Tensor) else t))


def dtype_str(dtype: torch.dtype) -> str:
    """A dtype as the C++ kernels print it: ``float32``."""
    return str(dtype).removeprefix("torch.")


# Why the forward-AD routes of the public entry points are excluded from torch.compile graphs:
# dynamo inlines an autograd.Function's forward and drops its jvp when no input requires grad
# (a silent zero tangent), so they run eagerly (a graph break; under fullgraph=True, an error
# carrying this text).
FORWARD_AD_EAGER_ONLY = (
    "cmkernels: forward-mode AD through the fused ops runs eagerly (torch.compile cannot trace "
    "an autograd.Function's jvp); call torch.func.jvp outside fullgraph=True compilation"
)


def records_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on tensors: grad mode on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def has_tangent(*tensors: Tensor | None) -> bool:
    """Whether forward-mode AD is carrying a tangent on any of tensors: a dual tensor
    (torch.autograd.forward_ad) or an input of torch.func.jvp; both show through the public
    ``forward_ad.unpack_dual``. The registered ops have no forward-AD formula (torch.library has no
    such registration) and would drop the tangent silently, so the public entry points route such
    calls through an autograd.Function with a jvp. torch.compile traces this test too (without
    tangents it adds nothing to the graph)."""
    return any(
        t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
        for t in tensors
    )


def split_duals(*tensors: Tensor | None) -> tuple[list, list] | None:
    """(primals, tangents) of tensors (None stays None; a tangent is None where absent) when a
    fused primal+tangent kernel may serve this forward-mode AD call directly, its outputs re-wrapped
    with ``forward_ad.make_dual``: exactly one forward-AD level is active on the inputs (a
    ``torch.func.jvp``, or dual tensors) with no other functorch transform beneath it (vmap, grad,
    an outer jvp), and no reverse-mode graph is being recorded through them (grad mode off, or
    nothing requires grad). Otherwise None: the caller takes its autograd.Function route, whose jvp
    composes with every transform (the fused kernel's primal output then goes unused)."""
    fwad = torch.autograd.forward_ad
    fc = torch._C._functorch
    primals, tangents = [], []
    for t in tensors:
        if t is None:
            primals.append(None)
            tangents.append(None)
            continue
        p, tan = fwad.unpack_dual(t)
        for part in (p, tan):
            if part is None:
                continue
            inner = part
            if fc.is_functorch_wrapped_tensor(part):
                # torch.func.jvp's wrapper: under it must be a plain tensor
                inner = fc.get_unwrapped(part)
                if fc.is_functorch_wrapped_tensor(inner) or fc.is_batchedtensor(inner):
                    return None
            elif fc.is_batchedtensor(part):
                return None
            if fwad.unpack_dual(part).tangent is not None:  # a second dual level
                return None
            # regular autograd records beneath functorch's wrapper: ask the tensor under it
            if torch.is_grad_enabled() and (part.requires_grad or inner.requires_grad):
                return None
        primals.append(p)
        tangents.append(tan)
    return primals, tangents


def stacked_levels(*tensors: Tensor | None) -> bool:
    """Whether two or more torch.func grad / jvp levels wrap tensors (jvp of jvp, grad of a jvp,
    jvp of a grad, or a grad over the parameters of a jvp over x); vmap's levels do not count.
    There the fused ops (no derivatives of their own) and an autograd.Function's jvp (whose output
    torch.func takes as a constant for outer levels) would be silently wrong, so the entry points
    compute in differentiable PyTorch instead."""
    fc = torch._C._functorch
    if fc.maybe_current_level() is None:  # no transform active: the fast answer
        return False
    levels = set()
    for t in tensors:
        while t is not None:
            if fc.is_batchedtensor(t):
                t = fc.get_unwrapped(t)
            elif fc.is_functorch_wrapped_tensor(t):
                levels.add(fc.maybe_get_level(t))
                t = fc.get_unwrapped(t)
            else:
                t = None
    return len(levels) >= 2
