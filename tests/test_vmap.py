"""torch.func.vmap over the fused ops: the batching rules fold the vmapped dimension into the op's
batch (one kernel call, no per-instance fallback of PyTorch), or loop where instances differ in
the weights; the results equal a Python loop over the instances. Also vmap of the JVPs."""

import warnings

import pytest
import torch

from cmkernels import ops

OPS = torch.ops.cmkernels


def _no_cmkernels_fallback(fn):
    """fn() with PyTorch's "not yet implemented the batching rule for cmkernels::..." warning
    turned into a failure."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    bad = [str(w.message) for w in seen if "batching rule for cmkernels::" in str(w.message)]
    assert not bad, bad
    return out


def _loop(fn, args, in_dims):
    V = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [
        fn(*(a if d is None else a.select(d, j) for a, d in zip(args, in_dims))) for j in range(V)
    ]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


def _close(got, want, tol=1e-5):
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dims", [(0, 0), (2, 0), (0, None), (None, 1)])
def test_attention_ops_fold_the_vmapped_dimension(dims):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 2, 3 * 2 * 8, 13, generator=g)  # V 3, B 2, H 2, d 8, T 13
    tqkv = torch.randn(3, 2, 3 * 2 * 8, 13, generator=g)
    qkv_in = qkv.movedim(0, dims[0]) if dims[0] is not None else qkv[0]
    tqkv_in = tqkv.movedim(0, dims[1]) if dims[1] is not None else tqkv[0]
    args, in_dims = (qkv_in, tqkv_in), dims

    def fn(q, t):
        return OPS.attention_jvp(q, t, 2)

    got = _no_cmkernels_fallback(lambda: torch.func.vmap(fn, in_dims=in_dims)(*args))
    _close(got, _loop(fn, args, in_dims))
    if dims[0] is not None:
        fwd = _no_cmkernels_fallback(
            lambda: torch.func.vmap(lambda q: OPS.attention(q, 2), in_dims=dims[0])(qkv_in)
        )
        _close(fwd, _loop(lambda q: OPS.attention(q, 2), (qkv_in,), (dims[0],)))


def test_attention_backward_and_bhtd_ops_fold():
    g = torch.Generator().manual_seed(1)
    q, k, v, tq, tk, tv, go = (torch.randn(4, 2, 3, 11, 8, generator=g) for _ in range(7))
    args = (q, k, v, tq, tk, tv)
    _close(
        _no_cmkernels_fallback(lambda: torch.func.vmap(OPS.attention_bhtd_jvp)(*args)),
        _loop(OPS.attention_bhtd_jvp, args, (0,) * 6),
    )
    out, lse = torch.func.vmap(OPS.attention_bhtd)(q, k, v)
    _close((out, lse), _loop(OPS.attention_bhtd, (q, k, v), (0, 0, 0)))
    bargs = (go, q, k, v, out, lse)
    _close(
        _no_cmkernels_fallback(lambda: torch.func.vmap(OPS.attention_bhtd_backward)(*bargs)),
        _loop(OPS.attention_bhtd_backward, bargs, (0,) * 6),
    )


@pytest.mark.parametrize("batched_weight", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_groupnorm_silu_ops_fold_unless_the_weights_differ(batched_weight, channels_last):
    g = torch.Generator().manual_seed(2)
    V, N, C = 3, 2, 64
    x = torch.randn(V, N, C, 5, 7, generator=g)
    if channels_last:
        x = torch.stack([xi.contiguous(memory_format=torch.channels_last) for xi in x])
    tx = torch.randn_like(x)
    w = torch.randn(V, C, generator=g) if batched_weight else torch.randn(C, generator=g)
    b, scale, shift = torch.randn(C, generator=g), torch.randn(V, N, C, generator=g), None
    wd = 0 if batched_weight else None

    def fwd(x_, w_, s_):
        return OPS.groupnorm_silu(x_, w_, b, s_, shift, 32, 1e-5, True)

    def jvp(x_, tx_, w_, s_):
        return OPS.groupnorm_silu_jvp(x_, tx_, w_, None, b, None, s_, s_, shift, None, 32, 1e-5,
                                      True)  # fmt: skip

    check = _no_cmkernels_fallback if not batched_weight else (lambda f: f())
    _close(
        check(lambda: torch.func.vmap(fwd, in_dims=(0, wd, 0))(x, w, scale)),
        _loop(fwd, (x, w, scale), (0, wd, 0)),
    )
    _close(
        check(lambda: torch.func.vmap(jvp, in_dims=(0, 0, wd, 0))(x, tx, w, scale)),
        _loop(jvp, (x, tx, w, scale), (0, 0, wd, 0)),
        tol=1e-4,
    )


def test_vmap_of_the_public_functions_and_their_jvps():
    """vmap over torch.func.jvp of groupnorm_silu and attention: per-sample tangents (the way
    several tangent directions are pushed through at once)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 4, 4, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    dirs = torch.randn(5, 2, 64, 4, 4, generator=g)

    def gn_tangent(t):
        return torch.func.jvp(lambda x_: ops.groupnorm_silu(x_, w, b, groups=32), (x,), (t,))[1]

    got = _no_cmkernels_fallback(lambda: torch.func.vmap(gn_tangent)(dirs))
    _close(got, torch.stack([gn_tangent(t) for t in dirs]), tol=1e-4)
    qkv = torch.randn(2, 3 * 2 * 16, 20, generator=g)
    tdirs = torch.randn(5, *qkv.shape, generator=g)

    def attn_tangent(t):
        return torch.func.jvp(lambda q: ops.attention(q, 2), (qkv,), (t,))[1]

    got = _no_cmkernels_fallback(lambda: torch.func.vmap(attn_tangent)(tdirs))
    _close(got, torch.stack([attn_tangent(t) for t in tdirs]), tol=1e-4)
