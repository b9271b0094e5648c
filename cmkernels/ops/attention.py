"""Multi-head self-attention of the UNet's attention blocks.

Layout: the packed ``qkv`` tensor of the official checkpoints, [B, 3*H*d, T], channel order
(three, heads, head_dim); the output is [B, H*d, T], channel order (heads, head_dim).
"""

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


def attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Fused attention on the packed layout (the reference until the fused kernel lands)."""
    return attention_ref(qkv, num_heads)
