"""groupnorm_silu_jvp, the fused primal + tangent op of forward-mode AD: every implementation (C++
CPU kernel, Triton kernel, no-extension fallback) against the float64 forward-mode AD of the
reference, and the routes of the public entry point (torch.func.jvp, dual tensors, vmap, nested
transforms) and of groupnorm_silu_with_tangent (torch.compile, CUDA graphs)."""

import collections
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from _tolerance import assert_close_rule, rel_err
from conftest import (
    TRITON_DEVICE,
    TRITON_MARKS,
    assert_same_error,
    forward_ad_jvp,
    raised,
    requires_cuda,
    run_without_extension,
)

import cmkernels
from cmkernels.ops import groupnorm_silu, groupnorm_silu_ref, groupnorm_silu_with_tangent
from cmkernels.ops.groupnorm_silu import (
    JVP_SCHEMA,
    check_jvp_inputs,
    groupnorm_silu_fallback,
    groupnorm_silu_jvp_fallback,
    groupnorm_silu_jvp_triton,
    groupnorm_silu_tangent_ref,
    groupnorm_silu_triton,
    layout,
)
from cmkernels.ops.registry import schema_of

# cmkernels.ops re-exports the function groupnorm_silu, which shadows the package as an attribute.
GN = importlib.import_module("cmkernels.ops.groupnorm_silu")
LAUNCH = importlib.import_module("cmkernels.ops.groupnorm_silu.launch")

OP = torch.ops.cmkernels.groupnorm_silu_jvp.default
FWD = torch.ops.cmkernels.groupnorm_silu.default
EPS = 1e-5
NAMES = ("x", "weight", "bias", "scale", "shift")

# impl: (jvp kernel, the forward kernel whose y and statistics it must reproduce)
IMPLS = {
    "cpu": (OP, FWD),
    "fallback": (groupnorm_silu_jvp_fallback, groupnorm_silu_fallback),
    "triton": (groupnorm_silu_jvp_triton, groupnorm_silu_triton),
}
IMPL_PARAMS = [
    pytest.param(name, marks=TRITON_MARKS) if name == "triton" else name for name in IMPLS
]

# The tangents reach ~10 in magnitude; atol one bf16 / fp16 ulp near 1 at most (as in
# tests/test_groupnorm_silu.py's jvp tests).
JVP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _device(impl: str) -> str:
    return TRITON_DEVICE if impl == "triton" else "cpu"


def _in_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t with the same values in a layout: contiguous, channels_last (4-d), strided (a view with
    step 2 in the last dim) or transposed (dense, last two dims swapped in memory)."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        return torch.cat([t, t], dim=-1)[..., ::2]
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


def _problem(shape, dtype, x_layout="contiguous", tx_layout="contiguous", modulate=True,
             which=NAMES, param_dtype=torch.float32, device="cpu"):  # fmt: skip
    """(primals, tangents) in the order (x, weight, bias, scale, shift): fresh random values drawn
    on the CPU (the same on every device); a tangent for each name in `which` whose primal is
    present, None for the others."""
    N, C = shape[:2]
    x = _in_layout((torch.randn(shape) * 1.7 + 0.6).to(dtype), x_layout)
    weight = (1 + 0.3 * torch.randn(C)).to(param_dtype)
    bias = (0.2 * torch.randn(C)).to(param_dtype)
    scale = (0.5 * torch.randn(N, C)).to(param_dtype) if modulate else None
    shift = (0.5 * torch.randn(N, C)).to(param_dtype) if modulate else None
    primals = [x, weight, bias, scale, shift]
    tangents = [
        torch.randn(p.shape).to(p.dtype) if p is not None and name in which else None
        for name, p in zip(NAMES, primals, strict=True)
    ]
    if tangents[0] is not None:
        tangents[0] = _in_layout(tangents[0], tx_layout)
    move = lambda ts: [t.to(device) if t is not None else None for t in ts]
    return move(primals), move(tangents)


def _op_args(primals, tangents):
    """The op's argument order: x, tx, weight, tweight, bias, tbias, scale, tscale, shift,
    tshift."""
    return [v for pair in zip(primals, tangents, strict=True) for v in pair]


def _reference(primals, tangents, groups, activation):
    """(y64, ty64, ty_low): the reference's output and forward-mode tangent on float64 copies,
    and its tangent on the inputs themselves (the baseline error of the tolerance rule)."""
    f = lambda *a: groupnorm_silu_ref(*a, groups=groups, eps=EPS, activation=activation)
    # Contiguous CPU copies: torch's forward-AD rule of F.group_norm fails on channels_last.
    dense = lambda ts: [t.cpu().contiguous() if t is not None else None for t in ts]
    up = lambda ts: [t.double() if t is not None else None for t in dense(ts)]
    if all(t is None for t in tangents):
        y64 = f(*up(primals))
        return y64, torch.zeros_like(y64), torch.zeros_like(y64)
    y64, t64 = forward_ad_jvp(f, up(primals), up(tangents))
    _, tlow = forward_ad_jvp(f, dense(primals), dense(tangents))
    return y64, t64, tlow


def _check_tangent(ty, primals, tangents, groups, activation):
    x = primals[0]
    _, t64, tlow = _reference(primals, tangents, groups, activation)
    assert ty.dtype == x.dtype and ty.shape == x.shape
    if x.dtype in (torch.float32, torch.float64):
        tol = 1e-5 if x.dtype == torch.float32 else 1e-12
        assert rel_err(ty, t64) <= tol, f"tangent: relative error {rel_err(ty, t64):.3g}"
    else:  # at most twice the reference's own error in that dtype
        assert_close_rule(ty.cpu(), t64, tlow, JVP_ATOL[x.dtype], name="tangent")


def _run_and_check(impl, primals, tangents, groups, activation):
    """Runs the impl's jvp kernel; checks y, mean, rstd against its forward kernel (to the bit),
    the outputs' layout, and the tangent against float64."""
    jvp, fwd = IMPLS[impl]
    y, ty, mean, rstd = jvp(*_op_args(primals, tangents), groups, EPS, activation)
    y0, mean0, rstd0 = fwd(*primals, groups, EPS, activation)
    assert torch.equal(y, y0), f"y differs from the forward's by {(y - y0).abs().max():.3g}"
    assert torch.equal(mean, mean0) and torch.equal(rstd, rstd0)
    fmt = layout(primals[0])
    assert y.is_contiguous(memory_format=fmt) and ty.is_contiguous(memory_format=fmt)
    _check_tangent(ty, primals, tangents, groups, activation)
    return y, ty


# (shape, groups): C = 6 with 3 groups (2 channels each), odd spatial sizes, a 3-d and a 5-d x,
# 5 channels per group, and a group too large for one program (the two-stage reduction).
CASES = [
    ((2, 6, 5, 7), 3),
    ((2, 12, 9), 4),
    ((2, 6, 3, 4, 5), 3),
    ((3, 20, 3, 5), 4),
    ((1, 8, 70, 70), 2),
]
# tx's layout for each layout of x: x's own, or another one (the kernels take any)
TX_LAYOUT = {"contiguous": "transposed", "channels_last": "contiguous", "strided": "strided"}


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
def test_y_and_tangent_match_float64(impl, dtype, x_layout, case):
    shape, groups = case
    if x_layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs a 4-d tensor")
    modulate = shape[1] != 12  # the 3-d case also covers the plain (no scale/shift) path
    activation = shape[1] != 20  # and one case the no-activation path
    primals, tangents = _problem(
        shape, dtype, x_layout, TX_LAYOUT[x_layout], modulate, device=_device(impl)
    )
    _run_and_check(impl, primals, tangents, groups, activation)


# Which arguments carry a tangent: x only (e.g. the data direction), scale / shift only (the time
# embedding alone depends on t), the affine parameters, one of scale / shift, all, none.
SUBSETS = {
    "tx": ("x",),
    "tscale_tshift": ("scale", "shift"),
    "tweight_tbias": ("weight", "bias"),
    "tscale": ("scale",),
    "tx_tshift": ("x", "shift"),
    "all": NAMES,
    "none": (),
}


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("which", list(SUBSETS))
@pytest.mark.parametrize("modulate, activation", [(True, True), (False, True), (True, False)])
def test_each_subset_of_tangents(impl, which, modulate, activation):
    if not modulate and which in ("tscale_tshift", "tscale"):
        pytest.skip("no scale / shift to carry a tangent")
    primals, tangents = _problem(
        (2, 6, 5, 7), torch.float32, modulate=modulate, which=SUBSETS[which], device=_device(impl)
    )
    _, ty = _run_and_check(impl, primals, tangents, 3, activation)
    if which == "none":
        assert not ty.any()


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("which", ["tx", "all", "tscale_tshift"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_stage_reduction_with_several_slices(impl, which, dtype, monkeypatch):
    # Small tiles and no one-program path: each group splits into slices of several tiles, so
    # both merges (tiles within a slice, slices within the group) of x's and x''s statistics run.
    if impl == "triton":
        monkeypatch.setattr(LAUNCH, "FUSED_MAX", 0)
        monkeypatch.setattr(LAUNCH, "TILE", 32)
    primals, tangents = _problem((1, 6, 5, 7), dtype, which=SUBSETS[which], device=_device(impl))
    if impl == "triton":
        block_hw, S, slice_ = LAUNCH._split(1, 3, 35, 2, primals[0].device)
        assert S == 2 and slice_ == 2 * block_hw  # two slices, the first of two tiles
    _run_and_check(impl, primals, tangents, 3, True)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_half_parameters_and_modulation(impl):
    # weight / bias / scale / shift and their tangents in x's dtype instead of float32.
    primals, tangents = _problem(
        (2, 12, 5, 7), torch.bfloat16, "channels_last", "strided",
        param_dtype=torch.bfloat16, device=_device(impl),
    )  # fmt: skip
    _run_and_check(impl, primals, tangents, 4, True)


@pytest.mark.parametrize("impl", ["cpu", "fallback"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_float64_on_the_cpu(impl, x_layout):
    primals, tangents = _problem((2, 12, 5, 7), torch.float64, x_layout, "strided")
    primals[3], primals[4] = primals[3][:, :, None, None], primals[4][:, :, None, None]
    tangents[3], tangents[4] = tangents[3][:, :, None, None], tangents[4][:, :, None, None]
    _run_and_check(impl, primals, tangents, 4, True)
    mean = IMPLS[impl][0](*_op_args(primals, tangents), 4, EPS, True)[2]
    assert mean.dtype == torch.float64


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_empty_input(impl):
    primals, tangents = _problem((0, 6, 5, 7), torch.float32, device=_device(impl))
    y, ty, mean, rstd = IMPLS[impl][0](*_op_args(primals, tangents), 3, EPS, True)
    assert y.shape == ty.shape == (0, 6, 5, 7) and mean.shape == rstd.shape == (0, 3)


def test_tangent_ref_matches_the_kernel():
    # The reference formula (groupnorm_silu_tangent_ref) from the forward's statistics.
    primals, tangents = _problem((2, 12, 5, 7), torch.float32, "channels_last", "transposed")
    _, mean, rstd = FWD(*primals, 4, EPS, True)
    ty = groupnorm_silu_tangent_ref(*primals, mean, rstd, 4, True, *tangents)
    assert ty.is_contiguous(memory_format=torch.channels_last)
    _check_tangent(ty, primals, tangents, 4, True)


def test_schema_declared_once_and_matches_python():
    assert schema_of("groupnorm_silu_jvp") == "cmkernels::groupnorm_silu_jvp" + JVP_SCHEMA


@pytest.mark.parametrize("which", ["all", "tx", "tscale_tshift"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_opcheck(which, x_layout):
    primals, tangents = _problem((2, 8, 5, 3), torch.float32, x_layout, which=SUBSETS[which])
    torch.library.opcheck(OP, (*_op_args(primals, tangents), 4, EPS, True))


# ------------------------------------------------------------------------------------------------
# The public entry point: which route each kind of forward-mode AD call takes, and its results.


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of the registered forward op and of the fused jvp op by the entry point."""
    calls = collections.Counter()
    for name in ("_forward_op", "_jvp_op"):
        op = getattr(GN, name)

        def counted(*args, _op=op, _name=name):
            calls[_name] += 1
            return _op(*args)

        monkeypatch.setattr(GN, name, counted)
    return calls


def _public(groups=3, activation=True):
    return lambda *a: groupnorm_silu(*a, groups=groups, activation=activation)


@pytest.mark.parametrize("mode", ["func", "dual"])
@pytest.mark.parametrize("which", ["tx", "tscale_tshift", "all"])
def test_direct_route_is_one_fused_call(mode, which, op_calls):
    # torch.func.jvp under torch.no_grad(), or dual tensors that do not require grad: one call of
    # the fused op, its y and ty re-wrapped as the output and its tangent.
    primals, tangents = _problem((2, 6, 5, 7), torch.float32, "channels_last", which=SUBSETS[which])
    with torch.no_grad():
        y, ty = forward_ad_jvp(_public(), primals, tangents, mode)
    assert op_calls == {"_jvp_op": 1}
    torch.testing.assert_close(y, groupnorm_silu(*primals, groups=3), rtol=0, atol=0)
    assert ty.is_contiguous(memory_format=torch.channels_last)
    _check_tangent(ty, primals, tangents, 3, True)


def test_direct_route_in_grad_mode_when_nothing_requires_grad(op_calls):
    primals, tangents = _problem((2, 6, 5, 7), torch.bfloat16)
    _, ty = forward_ad_jvp(_public(), primals, tangents)
    assert op_calls == {"_jvp_op": 1}
    _check_tangent(ty, primals, tangents, 3, True)


@pytest.mark.parametrize("mode", ["func", "dual"])
def test_function_route_with_parameters_requiring_grad(mode, op_calls):
    # Grad mode with parameters that require grad: the autograd.Function route (y from the
    # forward op, ty from the fused op), and the gradient of y is the fused backward's.
    primals, tangents = _problem((2, 6, 5, 7), torch.float32, which=("x", "scale"))
    w = primals[1].clone().requires_grad_(True)
    primals_rg = [primals[0], w, *primals[2:]]
    if mode == "func":
        y, ty = forward_ad_jvp(_public(), primals_rg, tangents, mode)
        (gw,) = torch.autograd.grad(y.square().sum(), w)
    else:
        fwad = torch.autograd.forward_ad
        with fwad.dual_level():
            duals = [fwad.make_dual(p, t) if t is not None else p
                     for p, t in zip(primals_rg, tangents, strict=True)]  # fmt: skip
            y, ty = fwad.unpack_dual(_public()(*duals))
            (gw,) = torch.autograd.grad(y.square().sum(), w)
    assert op_calls == {"_forward_op": 1, "_jvp_op": 1}
    _check_tangent(ty.detach(), primals, tangents, 3, True)
    w64 = primals[1].double().requires_grad_(True)
    ref = [p.double() if p is not None else None for p in primals]
    y64 = groupnorm_silu_ref(ref[0], w64, *ref[2:], groups=3)
    (want,) = torch.autograd.grad(y64.square().sum(), w64)
    assert rel_err(gw, want) <= 1e-4


def test_vmap_over_jvp(op_calls):
    # vmap over torch.func.jvp: the autograd.Function route (its generated vmap rule runs the
    # ops per sample).
    primals, _ = _problem((2, 6, 5, 7), torch.float32)
    xs, txs = torch.randn(3, *primals[0].shape), torch.randn(3, *primals[0].shape)
    ss = torch.randn(3, *primals[3].shape)

    def per_sample(f):
        def tangent(x, tx, ts):
            g = lambda x, s: f(x, primals[1], primals[2], s, primals[4], groups=3)
            return torch.func.jvp(g, (x, primals[3]), (tx, ts))[1]

        return tangent

    got = torch.func.vmap(per_sample(groupnorm_silu))(xs, txs, ss)
    assert op_calls == {"_forward_op": 1, "_jvp_op": 1}
    want = torch.func.vmap(per_sample(groupnorm_silu_ref))(*(t.double() for t in (xs, txs, ss)))
    assert rel_err(got, want) <= 1e-5


def _nested_reference(primals, u, v, groups=3):
    """d/de [the float64 reference's tangent along v at x + e u] at e = 0, by central differences
    (the reference's F.silu has no second-order forward AD)."""
    p64 = [p.double() for p in primals]
    f = lambda x: groupnorm_silu_ref(x, *p64[1:], groups=groups)
    tangent = lambda x: torch.func.jvp(f, (x,), (v.double(),))[1]
    h = 1e-4
    return (tangent(p64[0] + h * u.double()) - tangent(p64[0] - h * u.double())) / (2 * h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_jvp_of_jvp(dtype, op_calls):
    # Two stacked jvp levels: the second-order term is right (not a silent zero), through the
    # differentiable composite route; neither fused op can serve it.
    primals, _ = _problem((2, 6, 5, 7), dtype)
    u, v = torch.randn_like(primals[0]), torch.randn_like(primals[0])
    f = lambda x: groupnorm_silu(x, *primals[1:], groups=3)
    inner = lambda x: torch.func.jvp(f, (x,), (v,))[1]
    with torch.no_grad():
        t1, t2 = torch.func.jvp(inner, (primals[0],), (u,))
    assert op_calls == {}
    _check_tangent(t1, primals, [v, None, None, None, None], 3, True)
    want = _nested_reference(primals, u, v)
    assert rel_err(t2, want) <= (1e-5 if dtype == torch.float32 else 1e-7)


def test_grad_of_a_tangent_and_jvp_of_a_grad():
    # A gradient of the tangent (torch.func.grad over a jvp) and a Hessian-vector product
    # (jvp of a grad): both stack two levels; both match float64.
    primals, _ = _problem((2, 6, 5, 7), torch.float32)
    p64 = [p.double() for p in primals]
    v = torch.randn_like(primals[0])

    def tangent_sum(f, ps, v):
        return lambda x: torch.func.jvp(lambda x: f(x, *ps[1:], groups=3), (x,), (v,))[1].sum()

    got = torch.func.grad(tangent_sum(groupnorm_silu, primals, v))(primals[0])
    want = torch.func.grad(tangent_sum(groupnorm_silu_ref, p64, v.double()))(p64[0])
    assert rel_err(got, want) <= 1e-5

    def loss(f, ps):
        return lambda x: f(x, *ps[1:], groups=3).square().sum()

    _, hvp = torch.func.jvp(torch.func.grad(loss(groupnorm_silu, primals)), (primals[0],), (v,))
    grad64 = torch.func.grad(loss(groupnorm_silu_ref, p64))
    h = 1e-4
    want = (grad64(p64[0] + h * v.double()) - grad64(p64[0] - h * v.double())) / (2 * h)
    assert rel_err(hvp, want) <= 1e-5
    # and a grad of a grad (no tangent anywhere; the same composite route)
    gg = lambda f, ps: torch.func.grad(lambda x: (torch.func.grad(loss(f, ps))(x) * v).sum())
    got = gg(groupnorm_silu, primals)(primals[0])
    assert rel_err(got, hvp) <= 1e-5


def test_reverse_mode_through_the_fused_op_raises_a_clear_error():
    primals, tangents = _problem((2, 6, 5, 7), torch.float32)
    x = primals[0].clone().requires_grad_(True)
    # The registered op itself has no backward.
    y, ty, _, _ = OP(*_op_args([x] + primals[1:], tangents), 3, EPS, True)
    with pytest.raises(RuntimeError, match="groupnorm_silu_jvp has no reverse-mode derivative"):
        y.sum().backward()
    # Through the autograd.Function route: the gradient of y works, one of the tangent raises.
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():
        out = groupnorm_silu(fwad.make_dual(x, tangents[0]), *primals[1:], groups=3)
        y, ty = fwad.unpack_dual(out)
        assert torch.autograd.grad(y.sum(), x)[0].abs().sum() > 0
        with pytest.raises(RuntimeError, match="no reverse-mode derivative"):
            ty.sum().backward()


# ------------------------------------------------------------------------------------------------
# groupnorm_silu_with_tangent: the explicit form, under torch.compile.


def test_with_tangent_matches_the_op_and_the_public_jvp():
    primals, tangents = _problem((2, 12, 5, 7), torch.float32, "channels_last")
    x, w, b, s, sh = primals
    tx, tw, tb, ts, tsh = tangents
    y, ty = groupnorm_silu_with_tangent(
        x, tx, w, b, s, sh, tweight=tw, tbias=tb, tscale=ts, tshift=tsh, groups=4
    )
    y_op, ty_op, _, _ = OP(*_op_args(primals, tangents), 4, EPS, True)
    assert torch.equal(y, y_op) and torch.equal(ty, ty_op)
    with torch.no_grad():
        y_ad, ty_ad = forward_ad_jvp(_public(groups=4), primals, tangents)
    assert torch.equal(y, y_ad) and torch.equal(ty, ty_ad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last", "strided"])
def test_with_tangent_in_grad_mode_has_the_ops_gradients(dtype, x_layout):
    # One launch for y, ty and the saved statistics: y's gradients are groupnorm_silu's (the same
    # fused backward from the same statistics, so bit for bit), ty is the no-grad tangent and a
    # constant for autograd.
    primals, tangents = _problem((2, 12, 5, 7), dtype, x_layout, param_dtype=dtype)
    leaves = [p.requires_grad_() for p in primals]
    kw = dict(tweight=tangents[1], tbias=tangents[2], tscale=tangents[3], tshift=tangents[4],
              groups=4)  # fmt: skip
    y, ty = groupnorm_silu_with_tangent(primals[0], tangents[0], *primals[1:], **kw)
    grad_y = torch.randn(y.shape).to(dtype)
    got = torch.autograd.grad(y, leaves, grad_y)
    want = torch.autograd.grad(groupnorm_silu(*primals, groups=4), leaves, grad_y)
    for name, g, w in zip(NAMES, got, want, strict=True):
        assert torch.equal(g, w), f"grad {name} differs by {(g - w).abs().max():.3g}"
    assert not ty.requires_grad
    with torch.no_grad():
        y0, ty0 = groupnorm_silu_with_tangent(primals[0], tangents[0], *primals[1:], **kw)
    assert torch.equal(y.detach(), y0) and torch.equal(ty, ty0)
    if dtype == torch.float64:  # and against the reference's gradients
        ref = groupnorm_silu_ref(*primals, groups=4, eps=EPS)
        for g, w in zip(got, torch.autograd.grad(ref, leaves, grad_y), strict=True):
            assert rel_err(g, w) <= 1e-12


def test_with_tangent_in_grad_mode_under_torch_compile_fullgraph():
    primals, tangents = _problem((2, 12, 5, 7), torch.float32, which=("x", "scale", "shift"))
    leaves = [p.requires_grad_() for p in primals]
    tx, _, _, ts, tsh = tangents

    def block(x, w, b, s, sh):
        y, ty = groupnorm_silu_with_tangent(x, tx, w, b, s, sh, tscale=ts, tshift=tsh, groups=4)
        return (y * y).sum(), ty

    loss, ty = torch.compile(block, fullgraph=True, backend="aot_eager")(*leaves)
    got = torch.autograd.grad(loss, leaves)
    want_loss, want_ty = block(*leaves)
    for g, w in zip(got, torch.autograd.grad(want_loss, leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert torch.equal(ty, want_ty) and not ty.requires_grad


def test_with_tangent_under_torch_compile_fullgraph():
    primals, tangents = _problem((2, 12, 5, 7), torch.float32, which=("x", "scale", "shift"))
    x, w, b, s, sh = primals
    tx, _, _, ts, tsh = tangents

    def block(x, tx, w, b, s, sh, ts, tsh):
        y, ty = groupnorm_silu_with_tangent(x, tx, w, b, s, sh, tscale=ts, tshift=tsh, groups=4)
        return y * 2.0 + 1.0, ty * 2.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x, tx, w, b, s, sh, ts, tsh)
    want = block(x, tx, w, b, s, sh, ts, tsh)
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_entry_point_jvp_under_torch_compile_is_right_or_refused():
    # Both routes run eagerly (a graph break); under fullgraph=True an error naming the reason.
    primals, tangents = _problem((2, 6, 5, 7), torch.float32)
    f = lambda x: groupnorm_silu(x, *primals[1:], groups=3)

    def broken(x, tx):
        with torch.no_grad():
            return torch.func.jvp(f, (x,), (tx,))[1]

    def full(x, tx):
        with torch.no_grad():
            return torch.func.jvp(f, (x,), (tx,))[1]

    want = broken(primals[0], tangents[0])
    got = torch.compile(broken, backend="aot_eager")(primals[0], tangents[0])
    torch.testing.assert_close(got, want)
    with pytest.raises(Exception, match="forward-mode AD through the fused ops runs eagerly"):
        torch.compile(full, backend="aot_eager", fullgraph=True)(primals[0], tangents[0])


# ------------------------------------------------------------------------------------------------
# Argument checks: one set of rules (check_jvp_inputs, mirrored in C++); for the same bad input
# every path raises what the Python check raises, type and text.

BAD = {
    "groups_not_dividing": lambda a: a.update(groups=4),
    "scale_shape": lambda a: a.update(scale=a["scale"][:, :-1]),
    "tx_shape": lambda a: a.update(tx=a["tx"][..., :-1]),
    "tx_dtype": lambda a: a.update(tx=a["tx"].double()),
    "tx_device": lambda a: a.update(tx=a["tx"].to("meta")),
    "tweight_shape": lambda a: a.update(tweight=a["tweight"][:-1]),
    "tbias_float64": lambda a: a.update(tbias=a["tbias"].double()),
    "tbias_device": lambda a: a.update(tbias=a["tbias"].to("meta")),
    "tscale_shape": lambda a: a.update(tscale=a["tscale"][:, :, None]),
    "tshift_half": lambda a: a.update(tshift=a["tshift"].half()),
    "tscale_without_scale": lambda a: a.update(scale=None),
    "tshift_without_shift": lambda a: a.update(shift=None),
}
DEVICE_CASES = {"tx_device", "tbias_device"}
PATHS = ["public", "cpu_op", "fallback", "meta", pytest.param("triton", marks=TRITON_MARKS)]
ORDER = ("x", "tx", "weight", "tweight", "bias", "tbias", "scale", "tscale", "shift", "tshift")


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("path", PATHS)
def test_every_path_raises_the_same_error(path, kind):
    if path == "cpu_op" and not cmkernels.HAS_EXTENSION:
        pytest.skip("needs the compiled extension")
    if path == "meta" and kind in DEVICE_CASES:
        pytest.skip("on meta every tensor is on one device")
    dev = TRITON_DEVICE if path == "triton" else "cpu"
    primals, tangents = _problem((2, 6, 4, 4), torch.float32, device=dev)
    a = dict(zip(ORDER, _op_args(primals, tangents), strict=True), groups=3)
    BAD[kind](a)
    if path == "meta":
        a = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    args = [a[k] for k in ORDER]
    check = lambda: check_jvp_inputs(*args, a["groups"])
    if path == "public":
        call = lambda: groupnorm_silu_with_tangent(
            a["x"], a["tx"], a["weight"], a["bias"], a["scale"], a["shift"], tweight=a["tweight"],
            tbias=a["tbias"], tscale=a["tscale"], tshift=a["tshift"], groups=a["groups"],
        )  # fmt: skip
    else:
        fn = {"cpu_op": OP, "meta": OP, "fallback": groupnorm_silu_jvp_fallback,
              "triton": groupnorm_silu_jvp_triton}[path]  # fmt: skip
        call = lambda: fn(*args, a["groups"], EPS, True)
    expected = raised(check)
    assert expected[0] in (ValueError, TypeError) and expected[1].startswith("groupnorm_silu")
    assert_same_error(expected, call)


def test_error_messages_name_the_argument():
    primals, tangents = _problem((2, 6, 4, 4), torch.float32)
    a = _op_args(primals, tangents)
    a[6] = None  # scale
    with pytest.raises(ValueError, match="groupnorm_silu_jvp: tscale is given but scale is None"):
        OP(*a, 3, EPS, True)
    a = _op_args(primals, tangents)
    a[1] = a[1][:, :, :2]
    with pytest.raises(ValueError, match=r"tx has shape \[2, 6, 2, 4\] but x has shape"):
        groupnorm_silu_with_tangent(a[0], a[1], primals[1], primals[2], groups=3)


# ------------------------------------------------------------------------------------------------
# Other builds: the baseline x86-64 code of the C++ kernel, and no extension at all.

BASELINE_SCRIPT = r"""
import torch
import cmkernels
from cmkernels.ops.groupnorm_silu import groupnorm_silu_ref

assert cmkernels.build_info()["cpu_avx2_kernels"] is False, cmkernels.build_info()
OP = torch.ops.cmkernels.groupnorm_silu_jvp.default
FWD = torch.ops.cmkernels.groupnorm_silu.default
torch.manual_seed(0)
for shape, fmt in [((3, 64, 7, 5), torch.contiguous_format), ((2, 96, 9, 11), torch.channels_last)]:
    for act in (True, False):
        for with_tx in (True, False):
            N, C = shape[:2]
            x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=fmt)
            w, b, s, sh = torch.randn(C), torch.randn(C), torch.randn(N, C), torch.randn(N, C)
            tx = torch.randn(shape) if with_tx else None
            tw, ts = torch.randn(C), torch.randn(N, C)
            y, ty, _, _ = OP(x, tx, w, tw, b, None, s, ts, sh, None, 16, 1e-5, act)
            assert torch.equal(y, FWD(x, w, b, s, sh, 16, 1e-5, act)[0])
            f = lambda *a: groupnorm_silu_ref(*a, groups=16, activation=act)
            p64 = [t.double().contiguous() for t in (x, w, b, s, sh)]
            if with_tx:
                g = lambda x, w, s: f(x, w, *p64[2:3], s, p64[4])
                _, want = torch.func.jvp(g, (p64[0], p64[1], p64[3]),
                                         (tx.double(), tw.double(), ts.double()))
            else:
                g = lambda w, s: f(p64[0], w, p64[2], s, p64[4])
                _, want = torch.func.jvp(g, (p64[1], p64[3]), (tw.double(), ts.double()))
            err = (ty.double() - want).abs().max() / want.abs().max()
            assert err < 1e-5, (shape, act, with_tx, err.item())
print("baseline jvp OK")
"""


@pytest.mark.skipif(not cmkernels.HAS_EXTENSION, reason="needs the compiled extension")
def test_baseline_cpu_code_matches_the_reference():
    env = dict(os.environ, CMKERNELS_NO_AVX2="1", OMP_NUM_THREADS="2")
    run = subprocess.run(
        [sys.executable, "-c", BASELINE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "baseline jvp OK" in run.stdout


def test_without_the_extension_the_fallback_serves_the_op():
    run_without_extension("""
        import torch
        from cmkernels.ops import groupnorm_silu, groupnorm_silu_ref, groupnorm_silu_with_tangent
        torch.manual_seed(0)
        x, tx = torch.randn(2, 6, 5, 7), torch.randn(2, 6, 5, 7)
        w, b, s, ts = torch.randn(6), torch.randn(6), torch.randn(2, 6), torch.randn(2, 6)
        f = lambda x, s: groupnorm_silu(x, w, b, s, groups=3)
        with torch.no_grad():
            y, ty = torch.func.jvp(f, (x, s), (tx, ts))
        y2, ty2 = groupnorm_silu_with_tangent(x, tx, w, b, s, tscale=ts, groups=3)
        assert torch.equal(y, y2) and torch.equal(ty, ty2)
        g = lambda x, s: groupnorm_silu_ref(x, w.double(), b.double(), s, groups=3)
        _, want = torch.func.jvp(g, (x.double(), s.double()), (tx.double(), ts.double()))
        assert (ty.double() - want).abs().max() / want.abs().max() < 1e-5
        print("ok")
    """)


# ------------------------------------------------------------------------------------------------
# On a GPU: the Triton kernels at the UNet's sizes, CUDA graphs, torch.compile.


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape, groups",
    # one program per group (8 x 32 groups fill 132 SMs), two-stage (a 64x64 group is too large;
    # 32 groups at batch 1 are too few), odd sizes
    [((8, 384, 16, 16), 32), ((4, 192, 64, 64), 32), ((1, 384, 32, 32), 32), ((3, 96, 17, 5), 32)],
)
def test_cuda_kernel_matches_float64(dtype, x_layout, shape, groups):
    primals, tangents = _problem(shape, dtype, x_layout, "contiguous", device="cuda")
    y, ty, mean, rstd = groupnorm_silu_jvp_triton(*_op_args(primals, tangents), groups, EPS, True)
    y0, mean0, rstd0 = groupnorm_silu_triton(*primals, groups, EPS, True)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(mean, mean0)
    _check_tangent(ty, primals, tangents, groups, True)
    with torch.no_grad():  # the public entry point's direct route on CUDA
        _, ty_ad = forward_ad_jvp(_public(groups), primals, tangents)
    torch.testing.assert_close(ty_ad, ty, rtol=0, atol=0)


@requires_cuda
def test_cuda_graph_capture_and_compile():
    primals, tangents = _problem(
        (8, 64, 16, 16), torch.bfloat16, "channels_last", which=("x", "scale", "shift"),
        device="cuda",
    )  # fmt: skip
    x, w, b, s, sh = primals
    tx, _, _, ts, tsh = tangents
    f = lambda: groupnorm_silu_with_tangent(x, tx, w, b, s, sh, tscale=ts, tshift=tsh)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        f()  # warm-up (Triton compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, ty_graph = f()
    x.copy_(x * 0.5)
    tx.copy_(tx * 2.0)
    graph.replay()
    y_eager, ty_eager = f()
    torch.testing.assert_close(y_graph, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(ty_graph, ty_eager, rtol=0, atol=0)
    compiled = torch.compile(
        lambda *a: groupnorm_silu_with_tangent(*a[:6], tscale=a[6], tshift=a[7]), fullgraph=True
    )
    got = compiled(x, tx, w, b, s, sh, ts, tsh)
    torch.testing.assert_close(got[0], y_eager)
    torch.testing.assert_close(got[1], ty_eager)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="TRITON_INTERPRET=1: nothing to compile (run with TRITON_INTERPRET=0 on a CPU machine)",
)
@pytest.mark.parametrize("shape", [(8, 384, 16, 16), (1, 384, 32, 32)], ids=["fused", "two_stage"])
def test_kernels_compile_for_sm90(shape, monkeypatch, tmp_path):
    # tools/aot_check.py's recorder: the launcher's launches on fake CUDA tensors, compiled for
    # sm_90 ahead of time; no spills, within the hardware limits.
    spec = importlib.util.spec_from_file_location(
        "aot_check", os.path.join(os.path.dirname(__file__), "..", "tools", "aot_check.py")
    )
    aot = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, aot)
    spec.loader.exec_module(aot)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    N, C = shape[:2]
    f32 = torch.float32

    def case():
        x = aot._empty(*shape, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        tx = aot._empty(*shape, dtype=torch.bfloat16)
        w, b = aot._empty(C, dtype=f32), aot._empty(C, dtype=f32)
        s, sh, ts, tsh = (aot._empty(N, C, dtype=f32) for _ in range(4))
        groupnorm_silu_jvp_triton(x, tx, w, None, b, None, s, ts, sh, tsh, 32, EPS, True)

    with aot.Recorder(90) as rec:
        rec.label = "test"
        case()
    specs = list(rec.specs.values())
    names = {s.kernel.split(":")[1] for s in specs}
    if shape[0] == 8:
        assert names == {"_gn_fused_jvp_kernel"}
    else:
        assert names == {"_gn_jvp_partial_stats_kernel", "_gn_apply_jvp_kernel"}
    for s in specs:
        row = aot.make_row(s, aot.compile_spec(s.kernel, s.arch, s.data))
        assert "error" not in row, row.get("error")
        assert 0 < row["regs"] <= 255 and row["spill_stores"] == 0 and row["problems"] == []


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_with_tangent_in_grad_mode_has_the_ops_gradients(dtype):
    # The Triton JVP kernel's statistics feed the Triton backward: the same gradients as the
    # plain op's, bit for bit (the statistics are the forward kernel's).
    primals, tangents = _problem((4, 128, 16, 16), dtype, "channels_last", device="cuda")
    leaves = [p.requires_grad_() for p in primals]
    kw = dict(tweight=tangents[1], tbias=tangents[2], tscale=tangents[3], tshift=tangents[4])
    y, ty = groupnorm_silu_with_tangent(primals[0], tangents[0], *primals[1:], **kw)
    grad_y = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad_y)
    want = torch.autograd.grad(groupnorm_silu(*primals), leaves, grad_y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert not ty.requires_grad
    _check_tangent(ty, [p.detach() for p in primals], tangents, 32, True)
