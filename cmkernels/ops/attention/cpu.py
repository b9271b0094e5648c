"""The CPU kernels of the attention ops: F.scaled_dot_product_attention (its fused CPU kernel) for
the output; the logsumexp, which SDPA does not return, and the backward by the Triton kernels'
blockwise math, in query chunks of bounded memory, in fp32 (fp64 for fp64 input). The backward does
not call autograd inside the op: a kernel runs below the autograd dispatch key, where that is not
reliable. Also the layout helpers the public functions use on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmkernels.ops.attention.checks import (
    check_bhtd,
    check_bhtd_backward,
    check_packed,
    check_packed_backward,
)
from cmkernels.ops.common import acc_dtype


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # On the CPU, SDPA is 1.2-1.9x faster on contiguous (B, H, T, d) inputs than on the packed
    # layout's views (last dimension strided), copies included.
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """View (B, H, T, d) of x [B, H*d, T]."""
    return x.unflatten(1, (num_heads, -1)).transpose(-1, -2)


def split_packed(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Views q, k, v (B, H, T, d) of a packed qkv [B, 3*H*d, T]."""
    return _heads(qkv, 3 * num_heads).chunk(3, dim=1)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> [B, H*d, T], contiguous."""
    B, H, T, d = x.shape
    return x.transpose(-1, -2).reshape(B, H * d, T).contiguous()


def _chunk_rows(B: int, H: int, T: int) -> int:
    return max(1, (1 << 22) // max(1, B * H * T))  # (B, H, rows, T) score chunks <= 4M elements


def _sdpa_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out (B, H, T, d), lse (B, H, T)): SDPA plus a chunked logsumexp."""
    B, H, T, d = q.shape
    dt = acc_dtype(q)
    if q.numel() == 0:  # no rows (B or T = 0): nothing to compute, no chunks to concatenate
        return q.new_empty(q.shape), q.new_empty(B, H, T, dtype=dt)
    kt = k.to(dt).transpose(-1, -2)  # (B, H, d, T)
    rows = _chunk_rows(B, H, T)
    lse = [
        torch.logsumexp(torch.matmul(q[:, :, i : i + rows].to(dt), kt) * d**-0.5, dim=-1)
        for i in range(0, T, rows)
    ]
    return sdpa(q, k, v), torch.cat(lse, dim=-1)


def _math_backward(q, k, v, out, grad_out, lse) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each (B, H, T, d): the derivation in triton_kernels.py."""
    B, H, T, d = q.shape
    dt = acc_dtype(q)
    scale = d**-0.5
    q, k, v, o, do = (x.to(dt) for x in (q, k, v, out, grad_out))
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)  # (B, H, d, T)
    delta = (do * o).sum(-1, keepdim=True)  # (B, H, T, 1)
    lse = lse.to(dt).unsqueeze(-1)  # (B, H, T, 1)
    dq = torch.empty(B, H, T, d, dtype=dt, device=q.device)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    rows = _chunk_rows(B, H, T)
    for i in range(0, T, rows):
        r = slice(i, i + rows)
        p = torch.exp(torch.matmul(q[:, :, r], kt) * scale - lse[:, :, r])  # (B, H, rows, T)
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, r])
        ds = p * (torch.matmul(do[:, :, r], vt) - delta[:, :, r])  # dS / scale
        dq[:, :, r] = torch.matmul(ds, k) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q[:, :, r])
    return dq.to(grad_out.dtype), (dk * scale).to(grad_out.dtype), dv.to(grad_out.dtype)


def attention_cpu(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    check_packed(qkv, num_heads)
    out, lse = _sdpa_forward(*split_packed(qkv, num_heads))
    return merge_heads(out), lse


def attention_backward_cpu(grad_out, qkv, out, lse, num_heads) -> Tensor:
    check_packed_backward(grad_out, qkv, out, lse, num_heads)
    o, do = _heads(out, num_heads), _heads(grad_out, num_heads)
    grads = _math_backward(*split_packed(qkv, num_heads), o, do, lse)
    B, C3, T = qkv.shape
    grad = grad_out.new_empty(B, C3, T)
    for g, slot in zip(grads, split_packed(grad, num_heads), strict=True):
        slot.copy_(g)  # (B, H, T, d) into the packed layout, one copy each
    return grad


def attention_bhtd_cpu(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    check_bhtd(q, k, v)
    out, lse = _sdpa_forward(q, k, v)
    return out.contiguous(), lse


def attention_bhtd_backward_cpu(grad_out, q, k, v, out, lse):
    check_bhtd_backward(grad_out, q, k, v, out, lse)
    return _math_backward(q, k, v, out, grad_out, lse)
