"""The pure-PyTorch references of attention: ``attention_ref`` (packed layout) and
``attention_bhtd_ref`` ([B, H, T, d]), computed in float32 (float64 for float64 input), and
``attention_bhtd_tangent_ref``, the forward-mode tangent of ``attention_bhtd_ref`` by the spec's
formula (section 11), T x T matrices in memory. The tests and the benchmarks compare the kernels
against them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cmkernels.ops.common import acc_dtype


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


def attention_bhtd_tangent_ref(q, k, v, tq, tk, tv) -> Tensor:
    """O' of O = softmax(S) V, S = Q K^T / sqrt(d), for tangents tq, tk, tv (None: zero); all
    (B, H, T, d); computed and returned in the accumulation dtype (fp32, fp64 for fp64).
    Differentiable PyTorch with the (B, H, T, T) probabilities and their tangent in memory.

    S' = (Q' K^T + Q K'^T) / sqrt(d);  O' = P V' + (P o S') V - rowsum(P o S') o O
    """
    dt = acc_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (t.to(dt) for t in (q, k, v))
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)  # (B, H, T, T)
    # Only the tangents present contribute (no zero-filled (B, H, T, T) buffers).
    ds = None  # S' (B, H, T, T)
    if tq is not None:
        ds = torch.matmul(tq.to(dt), k.transpose(-1, -2))
    if tk is not None:
        term = torch.matmul(q, tk.to(dt).transpose(-1, -2))
        ds = term if ds is None else ds + term
    out = None
    if ds is not None:
        pds = p * ds * scale  # P o S'
        o = torch.matmul(p, v)  # (B, H, T, d)
        out = torch.matmul(pds, v) - pds.sum(-1, keepdim=True) * o
    if tv is not None:
        term = torch.matmul(p, tv.to(dt))
        out = term if out is None else out + term
    return out if out is not None else torch.zeros_like(q)
