"""The pure-PyTorch reference of groupnorm_silu, ``groupnorm_silu_ref``: silu(GN(x) * (1 + scale) +
shift) in float32 (float64 for float64 input). The tests and the benchmarks compare the kernels
against it; the no-extension fallback (fallback.py) computes its output with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
