"""The CPU kernels of the attention ops: F.scaled_dot_product_attention (its fused CPU kernel) for
the output; the logsumexp, which SDPA does not return, and the backward by the Triton kernels'
blockwise math, in query chunks of bounded memory, in fp32 (fp64 for fp64 input). The backward does
not call autograd inside the op: a kernel runs below the autograd dispatch key, where that is not
reliable. The JVP ops (forward-mode AD): out, its tangent and lse in query blocks against all keys
(``_jvp_blockwise``). Also the layout helpers the public functions use on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmkernels.ops.attention.checks import (
    check_bhtd,
    check_bhtd_backward,
    check_bhtd_jvp,
    check_packed,
    check_packed_backward,
    check_packed_jvp,
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


# ------------------------------------------------------------------------------------------------
# Forward-mode AD (the formulas in triton_kernels.py). A block of JVP_ROWS queries of a few heads
# takes the exact softmax of its rows against all T keys (no online rescaling), so its score
# buffers are (heads, rows, T): a few of them at a time, O(rows x T) per head, never T x T. The
# operands of a block's heads are laid out once, when its first rows start, so that each step is
# one large matmul: S = (Q scale) K^T; S' = [Q', Q] scale [K, K']^T (inner dim 2d); P [V, V'] (2d
# outputs); (P o S') V accumulated onto P V' (baddbmm). Against torch.func.jvp of the T x T math
# (B 4, H 6, T 1024, d 64, fp32, 2 cores): 150 vs 553 ms, peak memory +74 vs +492 MB (3.4x on one
# thread; measured when the operands were laid out for all heads at once), the blocks in cache.
# out: float16 / bfloat16 return the forward op's (SDPA), see _jvp_out.

JVP_ROWS = 256  # queries per block
JVP_BLOCK = 1 << 19  # score elements per block (heads x rows x T), at least one head's rows x T


def jvp_block_shape(BH: int, T: int) -> tuple[int, int]:
    """(heads, rows) of one block of the CPU JVP: rows = min(T, JVP_ROWS) queries of as many of
    the B*H heads as fit JVP_BLOCK score elements (at least one)."""
    rows = max(1, min(T, JVP_ROWS))
    return max(1, min(BH, JVP_BLOCK // (rows * T))), rows


def _stack(parts: list[Tensor], dt: torch.dtype, scale: float | None = None,
           heads: tuple[int, int] | None = None) -> Tensor:  # fmt: skip
    """(n, T, len(parts) * d) contiguous in dt: the (B, H, T, d) parts side by side for the heads
    [h0, h1) of the flattened B*H (all of them by default, n = h1 - h0), upcast (and multiplied by
    scale) in the one copy."""
    B, H, T, d = parts[0].shape
    h0, h1 = heads if heads is not None else (0, B * H)
    out = torch.empty(h1 - h0, T, len(parts) * d, dtype=dt, device=parts[0].device)
    for i, x in enumerate(parts):
        cols = slice(i * d, (i + 1) * d)
        if (h0, h1) == (0, B * H):
            out.view(B, H, T, -1)[..., cols].copy_(x)
            continue
        row = 0
        for b in range(h0 // H, (h1 - 1) // H + 1):  # the batch elements the range touches
            a, e = max(h0 - b * H, 0), min(h1 - b * H, H)
            out[row : row + e - a, :, cols].copy_(x[b, a:e])
            row += e - a
    if scale is not None:
        out.mul_(scale)  # in dt (an out= multiply would round in the inputs' dtype)
    return out


def _jvp_blockwise(q, k, v, tq, tk, tv) -> tuple[Tensor, Tensor, Tensor]:
    """(out, tout, lse) of q, k, v (B, H, T, d) and tangents (None: zero), in the accumulation
    dtype: out, tout (B*H, T, d), lse (B*H, T)."""
    B, H, T, d = q.shape
    BH = B * H
    dt = acc_dtype(q)
    scale = d**-0.5
    dev = q.device
    out = torch.empty(BH, T, d, dtype=dt, device=dev)
    tout = torch.empty(BH, T, d, dtype=dt, device=dev)
    lse = torch.empty(BH, T, dtype=dt, device=dev)
    if out.numel() == 0:
        return out, tout, lse
    has_s = tq is not None or tk is not None  # S' != 0
    heads, rows = jvp_block_shape(BH, T)
    for h0 in range(0, BH, heads):
        hs = slice(h0, min(h0 + heads, BH))
        # The operands of this block's heads (laid out per block, so that only a block's worth of
        # copies is alive): qq = [Q', Q] scale (Q' only if given), kk = [K, K'], vv = [V, V'].
        span = (hs.start, hs.stop)
        qq = _stack([tq, q] if tq is not None else [q], dt, scale, span)
        kk = _stack([k, tk] if tk is not None else [k], dt, None, span)
        vv = _stack([v, tv] if tv is not None else [v], dt, None, span)
        qs = qq[..., -d:]  # Q scale
        kt = kk[..., :d].transpose(-1, -2)  # K^T (heads, d, T)
        vs = vv[..., :d]  # V
        if tq is not None and tk is not None:
            sq, skt = qq, kk.transpose(-1, -2)  # S' = [Q', Q] [K, K']^T scale
        elif tq is not None:
            sq, skt = qq[..., :d], kt  # S' = Q' K^T scale
        elif tk is not None:
            sq, skt = qs, kk[..., d:].transpose(-1, -2)  # S' = Q K'^T scale
        for i in range(0, T, rows):
            r = slice(i, i + rows)
            s = torch.bmm(qs[:, r], kt)  # S (heads, rows, T)
            m = s.amax(-1, keepdim=True)
            p = s.sub_(m).exp_()  # unnormalised P, in place of S
            l = p.sum(-1, keepdim=True)
            pv = torch.bmm(p, vv)  # [P V, P V'] unnormalised (heads, rows, d or 2d)
            o = pv[..., :d].div_(l)  # O
            out[hs, r] = o
            lse[hs, r] = (m + l.log()).squeeze(-1)
            if has_s:
                pds = torch.bmm(sq[:, r], skt).mul_(p)  # p o S' (heads, rows, T)
                rsum = pds.sum(-1, keepdim=True)
                if tv is not None:  # p V' + (p o S') V
                    t = torch.baddbmm(pv[..., d:], pds, vs)
                else:
                    t = torch.bmm(pds, vs)
                # O' = (t - rowsum(p o S') O) / l
                tout[hs, r] = t.sub_(rsum * o).div_(l)
            elif tv is not None:
                tout[hs, r] = pv[..., d:] / l
            else:
                tout[hs, r] = 0
    return out, tout, lse


def _jvp_out(q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> Tensor:
    """The JVP ops' out (B, H, T, d) in q's dtype: float16 / bfloat16 take the forward op's own
    (SDPA; the blockwise fp32 out, rounded, would differ from it by an ulp in places), float32 /
    float64 the blockwise out (the forward's up to the order of the additions)."""
    if q.dtype in (torch.float16, torch.bfloat16) and out.numel():
        return sdpa(q, k, v)
    return out.view(q.shape).to(q.dtype)


def attention_jvp_cpu(qkv: Tensor, tqkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    check_packed_jvp(qkv, tqkv, num_heads)
    B, C3, T = qkv.shape
    H = num_heads
    q, k, v = split_packed(qkv, H)
    out, tout, lse = _jvp_blockwise(q, k, v, *split_packed(tqkv, H))
    return (
        merge_heads(_jvp_out(q, k, v, out)),
        merge_heads(tout.view(q.shape)).to(qkv.dtype),
        lse.view(B, H, T),
    )


def attention_bhtd_jvp_cpu(q, k, v, tq, tk, tv) -> tuple[Tensor, Tensor, Tensor]:
    check_bhtd_jvp(q, k, v, tq, tk, tv)
    B, H, T, d = q.shape
    out, tout, lse = _jvp_blockwise(q, k, v, tq, tk, tv)
    return (
        _jvp_out(q, k, v, out).contiguous(),
        tout.view(B, H, T, d).to(q.dtype),
        lse.view(B, H, T),
    )
