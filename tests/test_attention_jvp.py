"""Forward-mode AD of attention: the fused JVP ops (attention_jvp, attention_bhtd_jvp), their CPU
kernel, their Triton kernel (under TRITON_INTERPRET=1 on CPU tensors without a GPU), the routes of
the public entry points under torch.func.jvp / dual tensors / vmap / reverse mode, the explicit
functions under torch.compile, the CPU path's memory bound, and bad inputs.

Accuracy: out and its tangent against the float64 forward-mode AD (torch.func.jvp) of the
references on the same (rounded) inputs. fp32: relative error (to the largest entry) <= 1e-4;
fp16 / bf16: at most twice the error of the reference's own result in that dtype (the reference
computes in fp32 and rounds once) plus a small atol, the rule of tests/test_attention.py; fp64 (CPU
only): 1e-12.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import importlib  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from conftest import (  # noqa: E402
    TRITON_DEVICE,
    TRITON_MARKS,
    assert_same_error,
    forward_ad_jvp,
    needs_triton,
    raised,
    requires_cuda,
)

import cmkernels  # noqa: E402, F401
from cmkernels.ops import (  # noqa: E402
    attention,
    attention_bhtd,
    attention_bhtd_ref,
    attention_bhtd_with_tangent,
    attention_ref,
    attention_with_tangent,
)
from cmkernels.ops.registry import schema_of  # noqa: E402

# importlib: cmkernels.ops re-exports the function attention, which shadows the package there.
A = importlib.import_module("cmkernels.ops.attention")
CPU = importlib.import_module("cmkernels.ops.attention.cpu")
LAUNCH = importlib.import_module("cmkernels.ops.attention.launch")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float16: 2e-4, torch.bfloat16: 2e-3}
RTOL32 = 1e-4  # fp32: relative to the largest entry
LSE_ATOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-12}
ROOT = Path(__file__).resolve().parents[1]
fwad = torch.autograd.forward_ad


# ------------------------------------------------------------------------------------------------
# Helpers.


def _up(xs):
    return [None if x is None else x.double() for x in xs]


def _cpu(xs):
    return [None if x is None else x.cpu() for x in xs]


def reference_jvp(fn, primals, tangents):
    """(out, tout) of fn in float64 (torch.func.jvp of the reference on the upcast inputs) and
    (out, tout) of the same reference in the inputs' dtype (fp32 math, rounded once). No
    tangent at all: a zero tangent."""
    if all(t is None for t in tangents):
        o64, olow = fn(*_up(primals)), fn(*primals)
        return o64, torch.zeros_like(o64), olow, torch.zeros_like(olow)
    o64, t64 = forward_ad_jvp(fn, _up(primals), _up(tangents))
    olow, tlow = forward_ad_jvp(fn, list(primals), list(tangents))
    return o64, t64, olow, tlow


def check_close(name, got, want64, low, dtype):
    """got against the float64 want64 by the dtype's rule (low: the reference in dtype)."""
    assert got.dtype == dtype and got.shape == want64.shape, name
    err = (got.double() - want64).abs().max().item()
    if dtype == torch.float64:
        assert err <= 1e-12 * max(1.0, want64.abs().max().item()), f"{name}: error {err:.3g}"
    elif dtype == torch.float32:
        rel = err / max(want64.abs().max().item(), 1e-30)
        assert rel <= RTOL32, f"{name}: relative error {rel:.3g}"
    else:
        base = (low.double() - want64).abs().max().item()
        bound = 2 * base + ATOL[dtype]
        assert err <= bound, f"{name}: max error {err:.3g} > 2 x the reference's {base:.3g} + atol"


def lse_ref(q, k):
    q, k = q.double(), k.double()
    return torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def heads(x, num_heads):
    """(B, H, T, d) views of q, k, v in a packed [B, 3*H*d, T] tensor."""
    B, C3, T = x.shape
    return x.unflatten(1, (3, num_heads, C3 // (3 * num_heads))).transpose(-1, -2).unbind(1)


def make_packed(B, H, d, T, dtype, layout, device="cpu"):
    """A packed [B, 3*H*d, T] tensor: contiguous; "tc" stored [B, T, 3*H*d] (channel stride 1);
    "step2" a view taking every second token of a [B, 3*H*d, 2T] tensor."""
    C3 = 3 * H * d
    if layout == "tc":
        return torch.randn(B, T, C3).to(dtype).transpose(1, 2).to(device)
    if layout == "step2":
        return torch.randn(B, C3, 2 * T).to(dtype).to(device)[:, :, ::2]
    return torch.randn(B, C3, T).to(dtype).to(device)


def check_packed_result(qkv, tqkv, H, out, tout, lse):
    """out, tout, lse of a packed JVP op against the references."""
    fn = lambda x: attention_ref(x, H)  # noqa: E731
    qkv, tqkv = qkv.cpu(), tqkv.cpu()
    o64, t64, olow, tlow = reference_jvp(fn, [qkv], [tqkv])
    B, C3, T = qkv.shape
    assert (
        out.shape == tout.shape == (B, C3 // 3, T) and out.is_contiguous() and tout.is_contiguous()
    )
    check_close("out", out.cpu(), o64, olow, qkv.dtype)
    check_close("tout", tout.cpu(), t64, tlow, qkv.dtype)
    q, k, _ = heads(qkv, H)
    want = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    assert lse.dtype == want and lse.shape == (B, H, T)
    torch.testing.assert_close(lse.cpu().double(), lse_ref(q, k), atol=LSE_ATOL[qkv.dtype], rtol=0)


def check_bhtd_result(primals, tangents, out, tout, lse):
    o64, t64, olow, tlow = reference_jvp(attention_bhtd_ref, primals, tangents)
    dtype = primals[0].dtype
    assert out.shape == tout.shape == primals[0].shape and tout.is_contiguous()
    check_close("out", out.cpu(), o64, olow, dtype)
    check_close("tout", tout.cpu(), t64, tlow, dtype)
    torch.testing.assert_close(
        lse.cpu().double(), lse_ref(primals[0], primals[1]), atol=LSE_ATOL[dtype], rtol=0
    )


PACKED_OPS = {
    "cpu": lambda *a: torch.ops.cmkernels.attention_jvp(*a),
    "triton": lambda *a: A.attention_jvp_triton(*a),
}
BHTD_OPS = {
    "cpu": lambda *a: torch.ops.cmkernels.attention_bhtd_jvp(*a),
    "triton": lambda *a: A.attention_bhtd_jvp_triton(*a),
}
PATHS = ["cpu", pytest.param("triton", marks=TRITON_MARKS)]


def _device(path):
    return "cpu" if path == "cpu" else TRITON_DEVICE


# ------------------------------------------------------------------------------------------------
# The ops: CPU kernel and Triton kernel, packed layout.


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, H, d, T",
    [(2, 2, 16, 1), (2, 2, 32, 7), (1, 2, 24, 33), (1, 1, 64, 100)],
    ids=lambda v: str(v),
)
def test_packed(B, H, d, T, dtype, path):
    torch.manual_seed(T * 100 + d)
    dev = _device(path)
    qkv = make_packed(B, H, d, T, dtype, "contiguous", dev)
    tqkv = make_packed(B, H, d, T, dtype, "contiguous", dev)
    check_packed_result(qkv, tqkv, H, *PACKED_OPS[path](qkv, tqkv, H))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layouts", [("tc", "step2"), ("step2", "contiguous"), ("tc", "tc")])
def test_packed_strided(layouts, dtype, path):
    # qkv and tqkv each with its own non-contiguous strides; nothing is copied into a layout.
    torch.manual_seed(1)
    B, H, d, T = 2, 2, 16, 21
    dev = _device(path)
    qkv, tqkv = (make_packed(B, H, d, T, dtype, lay, dev) for lay in layouts)
    assert not (qkv.is_contiguous() and tqkv.is_contiguous())
    check_packed_result(qkv, tqkv, H, *PACKED_OPS[path](qkv, tqkv, H))


def test_packed_cpu_float64():
    torch.manual_seed(2)
    qkv, tqkv = (torch.randn(2, 3 * 2 * 8, 13, dtype=torch.float64) for _ in range(2))
    check_packed_result(qkv, tqkv, 2, *torch.ops.cmkernels.attention_jvp(qkv, tqkv, 2))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cpu_many_blocks(monkeypatch, dtype):
    # Blocks of 16 query rows of 2 heads at T = 70 over B*H = 3: four full row blocks and a
    # ragged one, a head chunk of one; and the default blocks at T = 300 > JVP_ROWS.
    torch.manual_seed(3)
    qkv, tqkv = (make_packed(1, 3, 16, 300, dtype, "contiguous") for _ in range(2))
    assert CPU.jvp_block_shape(3, 300) == (3, CPU.JVP_ROWS)  # 3 x 256 x 300 < JVP_BLOCK
    check_packed_result(qkv, tqkv, 3, *torch.ops.cmkernels.attention_jvp(qkv, tqkv, 3))
    monkeypatch.setattr(CPU, "JVP_ROWS", 16)
    monkeypatch.setattr(CPU, "JVP_BLOCK", 2 * 16 * 70)
    assert CPU.jvp_block_shape(3, 70) == (2, 16)
    qkv, tqkv = (make_packed(1, 3, 16, 70, dtype, "tc") for _ in range(2))
    check_packed_result(qkv, tqkv, 3, *torch.ops.cmkernels.attention_jvp(qkv, tqkv, 3))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_many_blocks(monkeypatch, dtype):
    # 16 x 16 tiles at T = 61: three full query and key blocks plus ragged tails, head dim 24
    # zero-padded to 32.
    tiles = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    monkeypatch.setattr(LAUNCH, "tile_config", lambda kernel, T, d, dt: tiles)
    monkeypatch.setenv("CMKERNELS_AUTOTUNE", "0")
    torch.manual_seed(4)
    qkv, tqkv = (
        make_packed(1, 1, 24, 61, dtype, lay, TRITON_DEVICE) for lay in ("tc", "contiguous")
    )
    check_packed_result(qkv, tqkv, 1, *A.attention_jvp_triton(qkv, tqkv, 1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_out_and_lse_as_the_forward_op(path, dtype):
    # The JVP op's out and lse are the forward op's (up to the order of the additions).
    torch.manual_seed(5)
    dev = _device(path)
    qkv, tqkv = (make_packed(2, 2, 32, 19, dtype, "contiguous", dev) for _ in range(2))
    out, _, lse = PACKED_OPS[path](qkv, tqkv, 2)
    fwd = torch.ops.cmkernels.attention if path == "cpu" else A.attention_triton
    out_f, lse_f = fwd(qkv, 2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=8e-3, rtol=8e-3)
    torch.testing.assert_close(out, out_f, **tol)
    torch.testing.assert_close(lse, lse_f, atol=2e-5, rtol=1e-6)
    assert lse.dtype == lse_f.dtype


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(0, 96, 5), (2, 96, 0)])
def test_empty(shape, path):
    dev = _device(path)
    x = torch.randn(*shape, device=dev)
    out, tout, lse = PACKED_OPS[path](x, x.clone(), 2)
    assert out.shape == tout.shape == (shape[0], 32, shape[2])
    assert lse.shape == (shape[0], 2, shape[2])


# ------------------------------------------------------------------------------------------------
# The split op: every subset of the tangents (None: zero, its work skipped).

SUBSETS = [(0, 1, 2), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), ()]


def make_bhtd(B, H, T, d, dtype, layout, device):
    if layout == "bthd":  # [B, T, H, d] storage
        return torch.randn(B, T, H, d).to(dtype).transpose(1, 2).to(device)
    return torch.randn(B, H, T, d).to(dtype).to(device)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", SUBSETS, ids=str)
def test_bhtd_subsets(which, path):
    torch.manual_seed(6)
    dev = _device(path)
    B, H, T, d = 2, 2, 23, 16
    primals = [make_bhtd(B, H, T, d, torch.float32, "bthd", dev) for _ in range(3)]
    tangents = [make_bhtd(B, H, T, d, torch.float32, "contiguous", dev) if i in which else None
                for i in range(3)]  # fmt: skip
    out, tout, lse = BHTD_OPS[path](*primals, *tangents)
    if not which:
        assert torch.equal(tout, torch.zeros_like(tout))
    check_bhtd_result(_cpu(primals), _cpu(tangents), out, tout, lse)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", [(0, 1, 2), (1,)], ids=str)
def test_bhtd_dtypes(which, dtype, path):
    torch.manual_seed(7)
    dev = _device(path)
    B, H, T, d = 1, 2, 40, 32
    primals = [make_bhtd(B, H, T, d, dtype, "contiguous", dev) for _ in range(3)]
    tangents = [make_bhtd(B, H, T, d, dtype, "bthd", dev) if i in which else None
                for i in range(3)]  # fmt: skip
    out, tout, lse = BHTD_OPS[path](*primals, *tangents)
    check_bhtd_result(_cpu(primals), _cpu(tangents), out, tout, lse)


def test_bhtd_cpu_float64():
    torch.manual_seed(8)
    xs = [torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(6)]
    check_bhtd_result(xs[:3], xs[3:], *torch.ops.cmkernels.attention_bhtd_jvp(*xs))


# ------------------------------------------------------------------------------------------------
# The public entry points: which route serves which call, and each one's result.


class _Spy:
    """Counts the calls of the JVP ops made by the public functions and fails the test if the
    autograd.Function routes are taken where forbid_function is set."""

    def __init__(self, monkeypatch, forbid_function=False):
        self.calls = 0
        for name in ("_jvp_op", "_bhtd_jvp_op"):
            op = getattr(A, name)

            def counted(*args, _op=op):
                self.calls += 1
                return _op(*args)

            monkeypatch.setattr(A, name, counted)
        if forbid_function:
            for name in ("_AttentionJvp", "_AttentionBhtdJvp"):
                monkeypatch.setattr(A, name, None)  # .apply on None: an AttributeError


H = 2


def _packed_inputs(dtype=torch.float32, T=17, d=16):
    return make_packed(2, H, d, T, dtype, "tc"), make_packed(2, H, d, T, dtype, "contiguous")


def _check_public(qkv, tqkv, out, tout):
    fn = lambda x: attention_ref(x, H)  # noqa: E731
    o64, t64, olow, tlow = reference_jvp(fn, [qkv], [tqkv])
    check_close("out", out, o64, olow, qkv.dtype)
    check_close("tout", tout, t64, tlow, qkv.dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_direct_route_func_jvp_no_grad(monkeypatch, dtype):
    spy = _Spy(monkeypatch, forbid_function=True)
    qkv, tqkv = _packed_inputs(dtype)
    with torch.no_grad():
        out, tout = torch.func.jvp(lambda x: attention(x, H), (qkv,), (tqkv,))
    assert spy.calls == 1  # one launch for out and its tangent
    _check_public(qkv, tqkv, out, tout)


def test_direct_route_dual_tensors(monkeypatch):
    spy = _Spy(monkeypatch, forbid_function=True)
    qkv, tqkv = _packed_inputs()
    with fwad.dual_level():  # grad mode on, but nothing requires grad
        y = fwad.unpack_dual(attention(fwad.make_dual(qkv, tqkv), H))
    assert spy.calls == 1
    _check_public(qkv, tqkv, y.primal, y.tangent)


@pytest.mark.parametrize("which", [(0, 1, 2), (0,), (2,), (1, 2)], ids=str)
@pytest.mark.parametrize("mode", ["func", "dual"])
def test_direct_route_bhtd(monkeypatch, mode, which):
    spy = _Spy(monkeypatch, forbid_function=True)
    torch.manual_seed(9)
    primals = [make_bhtd(2, 2, 15, 24, torch.float32, "bthd", "cpu") for _ in range(3)]
    tangents = [torch.randn(2, 2, 15, 24) if i in which else None for i in range(3)]
    with torch.no_grad():
        out, tout = forward_ad_jvp(attention_bhtd, primals, tangents, mode)
    assert spy.calls == 1
    o64, t64, olow, tlow = reference_jvp(attention_bhtd_ref, primals, tangents)
    check_close("out", out, o64, olow, torch.float32)
    check_close("tout", tout, t64, tlow, torch.float32)


@pytest.mark.parametrize("mode", ["func", "dual"])
def test_function_route_with_reverse_mode(monkeypatch, mode):
    # qkv requires grad in grad mode: the autograd.Function route. Its tangent comes from the
    # JVP op, its gradient (of out) from the backward op; the tangent itself has no reverse-mode
    # derivative, and asking for one raises.
    spy = _Spy(monkeypatch)
    torch.manual_seed(10)
    qkv, tqkv = _packed_inputs(T=12)
    grad_out = torch.randn(2, H * 16, 12)
    x = qkv.clone().requires_grad_()
    if mode == "func":
        out, tout = torch.func.jvp(lambda a: attention(a, H), (x,), (tqkv,))
    else:
        with fwad.dual_level():
            y = fwad.unpack_dual(attention(fwad.make_dual(x, tqkv), H))
            out, tout = y.primal, y.tangent
    assert spy.calls == 1 and out.requires_grad
    _check_public(qkv, tqkv, out.detach(), tout.detach())
    (grad,) = torch.autograd.grad(out, x, grad_out, retain_graph=True)
    x64 = qkv.double().requires_grad_()
    (want,) = torch.autograd.grad(attention_ref(x64, H), x64, grad_out.double())
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="no reverse-mode derivative"):
        torch.autograd.grad(tout.sum(), x)


def test_function_route_bhtd_with_reverse_mode():
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    tk = torch.randn(1, 2, 9, 16)
    with fwad.dual_level():
        y = fwad.unpack_dual(attention_bhtd(q, fwad.make_dual(k, tk), v))
    want = A.attention_bhtd_tangent_ref(
        q.detach().double(), k.detach().double(), v.detach().double(), None, tk.double(), None
    )
    torch.testing.assert_close(y.tangent.double(), want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(y.primal.sum(), (q, k, v))
    refs = torch.autograd.grad(attention_bhtd_ref(q, k, v).sum(), (q, k, v))
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r, atol=2e-6, rtol=1e-5)


def test_vmap_over_jvp():
    torch.manual_seed(12)
    xs, ts = (torch.randn(3, 2, 3 * H * 8, 11) for _ in range(2))

    def tangent(fn):
        return lambda x, t: torch.func.jvp(fn, (x,), (t,))[1]

    got = torch.vmap(tangent(lambda x: attention(x, H)))(xs, ts)
    want = torch.vmap(tangent(lambda x: attention_ref(x, H)))(xs.double(), ts.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_nested_transforms():
    # jvp of a jvp and torch.func.grad of a tangent: the outer level differentiates the tangent
    # itself (the differentiable reference route).
    torch.manual_seed(13)
    x, t1, t2 = (torch.randn(1, 3 * H * 8, 7) for _ in range(3))

    def inner(fn, t):
        return lambda a: torch.func.jvp(fn, (a,), (t,))[1]

    f = lambda a: attention(a, H)  # noqa: E731
    fr = lambda a: attention_ref(a, H)  # noqa: E731
    _, got = torch.func.jvp(inner(f, t1), (x,), (t2,))
    _, want = torch.func.jvp(inner(fr, t1.double()), (x.double(),), (t2.double(),))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    got = torch.func.grad(lambda a: inner(f, t1)(a).square().sum())(x)
    want = torch.func.grad(lambda a: inner(fr, t1.double())(a).square().sum())(x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_on_the_triton_device(dtype):
    # On TRITON_DEVICE (on a GPU: the Triton JVP kernel behind the public function).
    if TRITON_DEVICE == "cpu":
        pytest.skip("CPU tensors take the CPU kernel; the launcher is tested directly above")
    torch.manual_seed(14)
    qkv, tqkv = _packed_inputs(dtype, T=33)
    with torch.no_grad():
        out, tout = torch.func.jvp(lambda x: attention(x, H), (qkv.cuda(),), (tqkv.cuda(),))
    _check_public(qkv, tqkv, out.cpu(), tout.cpu())


# ------------------------------------------------------------------------------------------------
# The explicit functions: eager, torch.compile(fullgraph=True), opcheck.


def test_with_tangent_eager_and_compiled():
    torch.manual_seed(15)
    qkv, tqkv = _packed_inputs(T=10)
    q, k, v, tq = (torch.randn(2, 2, 10, 16) for _ in range(4))

    def step(qkv, tqkv, q, k, v, tq):
        out, tout = attention_with_tangent(qkv, tqkv, H)
        o2, t2 = attention_bhtd_with_tangent(q, k, v, tq=tq)
        return out * 2.0 + 1.0, tout.square(), o2 - 1.0, t2 * 3.0

    eager = step(qkv, tqkv, q, k, v, tq)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(qkv, tqkv, q, k, v, tq)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)
    _check_public(qkv, tqkv, *attention_with_tangent(qkv, tqkv, H))


def test_the_jvp_ops_reverse_mode_raises():
    qkv, tqkv = _packed_inputs(T=5)
    x = qkv.requires_grad_()
    out, _, _ = torch.ops.cmkernels.attention_jvp(x, tqkv, H)
    with pytest.raises(RuntimeError, match="no reverse-mode derivative"):
        out.sum().backward()
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    out, _, _ = torch.ops.cmkernels.attention_bhtd_jvp(q, q, q, None, None, torch.randn(1, 1, 4, 8))
    with pytest.raises(RuntimeError, match="no reverse-mode derivative"):
        torch.autograd.grad(out.sum(), q)


def _check_packed_grad(got, qkv, grad_out):
    """got = d(out . grad_out)/d qkv of attention against the reference's, in float64 and in
    qkv's dtype (the tolerance rule's baseline)."""
    x64 = qkv.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(attention_ref(x64, H), x64, grad_out.double())
    xl = qkv.detach().clone().requires_grad_()
    (low,) = torch.autograd.grad(attention_ref(xl, H), xl, grad_out)
    check_close("grad qkv", got, want, low, qkv.dtype)


def _check_bhtd_grads(got, qkv, grad_out):
    """As _check_packed_grad for attention_bhtd's gradients of (q, k, v)."""
    up = [t.detach().double().requires_grad_() for t in qkv]
    want = torch.autograd.grad(attention_bhtd_ref(*up), up, grad_out.double())
    lows = [t.detach().clone().requires_grad_() for t in qkv]
    low = torch.autograd.grad(attention_bhtd_ref(*lows), lows, grad_out)
    for name, g, w, lo in zip("qkv", got, want, low, strict=True):
        check_close(f"grad {name}", g, w, lo, qkv[0].dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_with_tangent_in_grad_mode_has_attentions_gradient(dtype):
    # out's gradient against float64 and tout the no-grad tangent, a constant for autograd. (On
    # the CPU out and its backward are SDPA's, see attention._CPU_GRAD_MODE; the CUDA route,
    # one JVP launch whose lse feeds the fused backward, is the GPU test below.)
    torch.manual_seed(21)
    qkv, tqkv = _packed_inputs(dtype, T=23)
    x = qkv.requires_grad_()
    out, tout = attention_with_tangent(x, tqkv, H)
    grad_out = torch.randn(out.shape).to(dtype)
    (got,) = torch.autograd.grad(out, x, grad_out)
    assert not tout.requires_grad
    with torch.no_grad():
        out0, tout0 = attention_with_tangent(qkv, tqkv, H)
    assert torch.equal(out.detach(), attention(qkv, H)) and torch.equal(tout, tout0)
    _check_public(qkv, tqkv, out.detach(), tout)
    _check_packed_grad(got, qkv, grad_out)

    q, k, v = (torch.randn(2, 2, 19, 16).to(dtype).requires_grad_() for _ in range(3))
    tq = torch.randn(2, 2, 19, 16).to(dtype)
    out, tout = attention_bhtd_with_tangent(q, k, v, tq=tq)
    grad_out = torch.randn(out.shape).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert not tout.requires_grad
    _check_bhtd_grads(got, (q, k, v), grad_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_one_launch_grad_mode_functions(dtype):
    # What the CUDA route runs (_AttentionWithTangent, _AttentionBhtdWithTangent), here on the
    # CPU kernels: out and tout from the JVP op, the gradient from its lse by the backward op.
    torch.manual_seed(24)
    qkv, tqkv = _packed_inputs(dtype, T=21)
    x = qkv.requires_grad_()
    out, tout, lse = A._AttentionWithTangent.apply(x, tqkv, H)
    assert not tout.requires_grad and not lse.requires_grad
    _check_public(qkv, tqkv, out.detach(), tout)
    grad_out = torch.randn(out.shape).to(dtype)
    (got,) = torch.autograd.grad(out, x, grad_out)
    _check_packed_grad(got, qkv, grad_out)
    q, k, v = (torch.randn(1, 2, 13, 8).to(dtype).requires_grad_() for _ in range(3))
    tk = torch.randn(1, 2, 13, 8).to(dtype)
    out, tout, _ = A._AttentionBhtdWithTangent.apply(q, k, v, None, tk, None)
    grad_out = torch.randn(out.shape).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    _check_bhtd_grads(got, (q, k, v), grad_out)


def test_with_tangent_in_grad_mode_under_torch_compile_fullgraph():
    torch.manual_seed(22)
    qkv, tqkv = _packed_inputs(T=10)
    x = qkv.requires_grad_()

    def step(x):
        out, tout = attention_with_tangent(x, tqkv, H)
        return out.square().sum(), tout

    loss, tout = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (got,) = torch.autograd.grad(loss, x)
    want_loss, want_tout = step(x)
    torch.testing.assert_close(got, torch.autograd.grad(want_loss, x)[0], rtol=0, atol=0)
    assert torch.equal(tout, want_tout) and not tout.requires_grad


def test_opcheck():
    torch.manual_seed(16)
    qkv, tqkv = torch.randn(2, 3 * 2 * 8, 6), torch.randn(2, 3 * 2 * 8, 6)
    # (no input requires grad: the ops have no reverse-mode derivative, opcheck would take one)
    torch.library.opcheck(torch.ops.cmkernels.attention_jvp.default, (qkv, tqkv, 2))
    q, k, v, tq, tv = (torch.randn(2, 2, 6, 8) for _ in range(5))
    torch.library.opcheck(torch.ops.cmkernels.attention_bhtd_jvp.default, (q, k, v, tq, None, tv))


# ------------------------------------------------------------------------------------------------
# Memory: the CPU path allocates score blocks of O(rows x T) per head, never T x T.


def test_cpu_memory_is_blockwise():
    B, H_, T, d = 1, 2, 2048, 16
    heads_, rows = CPU.jvp_block_shape(B * H_, T)
    assert rows == CPU.JVP_ROWS < T and heads_ * rows * T <= max(CPU.JVP_BLOCK, rows * T)
    assert CPU.jvp_block_shape(4 * 6, 16384) == (1, CPU.JVP_ROWS)  # large T: one head's rows
    torch.manual_seed(17)
    qkv, tqkv = torch.randn(B, 3 * H_ * d, T), torch.randn(B, 3 * H_ * d, T)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:  # fmt: skip
        torch.ops.cmkernels.attention_jvp(qkv, tqkv, H_)
    largest = max(e.cpu_memory_usage for e in prof.events())
    one_head_square = T * T * 4  # one fp32 T x T matrix of one head: 16 MiB
    assert 0 < largest <= one_head_square // 4, f"largest allocation {largest} B"


# ------------------------------------------------------------------------------------------------
# Registration and bad inputs.


def test_schemas_match_cpp():
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    cpp = {}
    for body in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", body))
        cpp[schema.split("(", 1)[0]] = schema
    for name, schema in (
        ("attention_jvp", A.JVP_SCHEMA),
        ("attention_bhtd_jvp", A.BHTD_JVP_SCHEMA),
    ):
        assert cpp[name] == name + schema
        assert schema_of(name) == f"cmkernels::{name}{schema}"


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _b(T=5, d=16, dtype=torch.float32, device="cpu"):
    return torch.randn(1, 2, T, d).to(dtype).to(device)


BAD = {  # name: (op, arguments on the CPU)
    "channels": ("attention_jvp", lambda: (_x(1, 51, 4), _x(1, 51, 4), 2)),
    "num_heads": ("attention_jvp", lambda: (_x(1, 48, 4), _x(1, 48, 4), 0)),
    "head_dim": ("attention_jvp", lambda: (_x(1, 768, 4), _x(1, 768, 4), 1)),
    "qkv_int": ("attention_jvp", lambda: (torch.ones(1, 48, 4, dtype=torch.int32),) * 2 + (1,)),
    "tqkv_shape": ("attention_jvp", lambda: (_x(1, 48, 4), _x(1, 48, 5), 1)),
    "tqkv_dtype": ("attention_jvp", lambda: (_x(1, 48, 4), _x(1, 48, 4, dtype=torch.half), 1)),
    "tqkv_device": ("attention_jvp", lambda: (_x(1, 48, 4), _x(1, 48, 4).to("meta"), 1)),
    "k_shape": ("attention_bhtd_jvp", lambda: (_b(), _b(T=6), _b(), None, None, None)),
    "tq_shape": ("attention_bhtd_jvp", lambda: (_b(), _b(), _b(), _b(T=6), None, None)),
    "tk_dtype": (
        "attention_bhtd_jvp",
        lambda: (_b(), _b(), _b(), None, _b(dtype=torch.half), None),
    ),
    "tv_device": ("attention_bhtd_jvp", lambda: (_b(), _b(), _b(), None, None, _b(device="meta"))),
    "bhtd_head_dim": ("attention_bhtd_jvp", lambda: (_b(d=160),) * 3 + (None, None, None)),
}
CHECKS = {"attention_jvp": A.check_packed_jvp, "attention_bhtd_jvp": A.check_bhtd_jvp}
EXPLICIT = {
    "attention_jvp": attention_with_tangent,
    "attention_bhtd_jvp": attention_bhtd_with_tangent,
}


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize(
    "path", ["explicit", "cpu_op", "meta", pytest.param("triton", marks=TRITON_MARKS)]
)
def test_every_path_raises_the_same_error(path, kind):
    op, make = BAD[kind]
    args = make()
    if path == "meta" and kind.endswith("device"):
        pytest.skip("on meta every tensor is on one device")
    if path in ("meta", "triton"):
        dev = "meta" if path == "meta" else TRITON_DEVICE
        args = tuple(a.to(dev) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a
                     for a in args)  # fmt: skip
    want = raised(lambda: CHECKS[op](*args))
    if path == "explicit":
        fn = EXPLICIT[op]
    elif path == "triton":
        fn = getattr(A, op + "_triton")
    else:
        fn = getattr(torch.ops.cmkernels, op).default
    assert_same_error(want, lambda: fn(*args))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="tqkv has shape \\[1, 48, 5\\] but qkv has shape"):
        attention_with_tangent(_x(1, 48, 4), _x(1, 48, 5), 1)
    with pytest.raises(TypeError, match="tk has dtype float16 but k has dtype float32"):
        attention_bhtd_with_tangent(_b(), _b(), _b(), tk=_b(dtype=torch.half))
    with pytest.raises(ValueError, match="positive multiple of 3 \\* num_heads"):
        torch.func.jvp(lambda x: attention(x, 2), (_x(1, 51, 4),), (_x(1, 51, 4),))


# ------------------------------------------------------------------------------------------------
# GPU: the real kernel at the UNet's sizes, autotuned and not; compile and CUDA graphs.


@requires_cuda
@pytest.mark.parametrize("autotune", ["1", "0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, d", [(64, 64), (1024, 64), (1025, 64), (256, 128), (4096, 16)])
def test_gpu_packed_large(T, d, dtype, autotune, monkeypatch):
    monkeypatch.setenv("CMKERNELS_AUTOTUNE", autotune)
    torch.manual_seed(T + d)
    H_ = 2
    qkv, tqkv = (torch.randn(2, 3 * H_ * d, T, device="cuda").to(dtype) for _ in range(2))
    out, tout, lse = torch.ops.cmkernels.attention_jvp(qkv, tqkv, H_)
    o64, t64 = torch.func.jvp(lambda x: attention_ref(x, H_), (qkv.double(),), (tqkv.double(),))
    olow, tlow = torch.func.jvp(lambda x: attention_ref(x, H_), (qkv,), (tqkv,))
    check_close("out", out, o64, olow, dtype)
    check_close("tout", tout, t64, tlow, dtype)


@requires_cuda
def test_gpu_compile_and_cuda_graph():
    torch.manual_seed(18)
    qkv, tqkv = (torch.randn(2, 3 * 4 * 64, 256, device="cuda", dtype=torch.bfloat16)
                 for _ in range(2))  # fmt: skip
    fn = lambda x, t: attention_with_tangent(x, t, 4)  # noqa: E731
    eager = fn(qkv, tqkv)  # warm-up: compiles and autotunes outside the capture
    compiled = torch.compile(fn, fullgraph=True)(qkv, tqkv)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(qkv, tqkv)
    qkv.normal_()
    tqkv.normal_()
    graph.replay()
    for a, b in zip(captured, fn(qkv, tqkv), strict=True):
        torch.testing.assert_close(a, b)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_with_tangent_in_grad_mode(dtype):
    torch.manual_seed(23)
    qkv, tqkv = (torch.randn(2, 3 * 4 * 64, 1024, device="cuda").to(dtype) for _ in range(2))
    x = qkv.clone().requires_grad_()
    out, tout = attention_with_tangent(x, tqkv, 4)
    grad_out = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad_out)
    xr = qkv.clone().requires_grad_()
    (want,) = torch.autograd.grad(attention(xr, 4), xr, grad_out)  # the plain op's backward
    torch.testing.assert_close(got, want)
    assert not tout.requires_grad
