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
