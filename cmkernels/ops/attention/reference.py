"""The pure-PyTorch references of attention: ``attention_ref`` (packed layout) and
``attention_bhtd_ref`` ([B, H, T, d]), computed in float32 (float64 for float64 input). The tests
and the benchmarks compare the kernels against them."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
