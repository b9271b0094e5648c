"""Fused attention: Triton kernels (under TRITON_INTERPRET=1 on CPU tensors without a GPU), the
CPU kernels, the torch.library registration (opcheck, autograd, torch.compile) and bad inputs.

Accuracy rule (flash-attention's): against a float64 reference, the kernel's max error must be at
most twice that of plain PyTorch (the einsum/softmax formulation) in the same dtype, plus a small
atol. Under the interpreter, bfloat16 tl.dot operands are upcast to fp32 inside the kernel (the
interpreter cannot multiply bf16; the products are exact in fp32, so this is what the tensor cores
compute); everything else in the bf16 path (loads, casts of P and dS, stores) is the GPU code.
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
from cmkernels.ops import attention, attention_bhtd, attention_bhtd_ref, attention_ref  # noqa: E402
from cmkernels.ops.registry import schema_of  # noqa: E402
from cmkernels.ops.triton_support import HAS_TRITON  # noqa: E402

# importlib: cmkernels.ops re-exports the function attention, which shadows the package there.
A = importlib.import_module("cmkernels.ops.attention")
LAUNCH = importlib.import_module("cmkernels.ops.attention.launch")

gpu = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 5e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
# lse feeds exp(s - lse) in fp32: 1e-4 there is a relative 1e-4 in P, below fp16/bf16 rounding.
LSE_ATOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Helpers.


def eager_lowp(q, k, v):
    """Plain PyTorch attention computed in the inputs' dtype: the baseline error of the rule."""
    w = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(w, dim=-1), v)


def split_heads(qkv, num_heads):
    """(B, H, T, d) views of q, k, v in a packed [B, 3*H*d, T] tensor."""
    B, C3, T = qkv.shape
    return qkv.unflatten(1, (3, num_heads, C3 // (3 * num_heads))).transpose(-1, -2).unbind(1)


def merge_heads(x):
    B, H, T, d = x.shape
    return x.transpose(-1, -2).reshape(B, H * d, T)


def check_rule(name, actual, lowp, ref, dtype):
    err = (actual.double() - ref).abs().max().item()
    base = (lowp.double() - ref).abs().max().item()
    bound = 2 * base + ATOL[dtype]
    assert err <= bound, f"{name}: max error {err:.3g} > 2 x PyTorch's {base:.3g} + {ATOL[dtype]:g}"


def reference_packed(qkv, num_heads, grad_out):
    """(out, lse, grad_qkv) in float64 and (out, grad_qkv) of eager PyTorch in qkv.dtype."""
    x64 = qkv.detach().double().requires_grad_()
    out64 = attention_ref(x64, num_heads)
    (g64,) = torch.autograd.grad(out64, x64, grad_out.double())
    q, k, _ = split_heads(x64.detach(), num_heads)
    lse64 = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    xl = qkv.detach().requires_grad_()
    outl = merge_heads(eager_lowp(*split_heads(xl, num_heads)))
    (gl,) = torch.autograd.grad(outl, xl, grad_out)
    return out64.detach(), lse64, g64, outl.detach(), gl


def reference_bhtd(q, k, v, grad_out):
    ins64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out64 = attention_bhtd_ref(*ins64)
    g64 = torch.autograd.grad(out64, ins64, grad_out.double())
    lse64 = torch.logsumexp(ins64[0] @ ins64[1].transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    insl = [x.detach().requires_grad_() for x in (q, k, v)]
    outl = eager_lowp(*insl)
    gl = torch.autograd.grad(outl, insl, grad_out)
    return out64.detach(), lse64.detach(), g64, outl.detach(), gl


def run_packed_triton(qkv, num_heads, grad_out):
    out, lse = A.attention_triton(qkv, num_heads)
    grad = A.attention_backward_triton(grad_out, qkv, out, lse, num_heads)
    return out, lse, grad


def check_packed(qkv, num_heads, grad_out, out, lse, grad):
    dtype = qkv.dtype
    out64, lse64, g64, outl, gl = reference_packed(qkv, num_heads, grad_out)
    assert out.shape == out64.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    check_rule("out", out, outl, out64, dtype)
    torch.testing.assert_close(lse.double(), lse64, atol=LSE_ATOL[dtype], rtol=1e-6)
    C = qkv.shape[1] // 3
    for i, name in enumerate(("dq", "dk", "dv")):
        sl = slice(i * C, (i + 1) * C)
        check_rule(name, grad[:, sl], gl[:, sl], g64[:, sl], dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU tensors, or the GPU).


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 7, 64, 97])
def test_triton_packed(T, d, dtype):
    torch.manual_seed(T * 1000 + d)
    B, H = (2, 2) if T < 64 else (1, 2)  # the interpreter's time grows with the programs
    qkv = torch.randn(B, 3 * H * d, T, device=TRITON_DEVICE).to(dtype)
    grad_out = torch.randn(B, H * d, T, device=TRITON_DEVICE).to(dtype)
    out, lse, grad = run_packed_triton(qkv, H, grad_out)
    check_packed(qkv, H, grad_out, out, lse, grad)


@needs_triton
@pytest.mark.parametrize(
    "d, dtype",
    [(128, torch.float16), (8, torch.float32), (24, torch.bfloat16), (40, torch.float16)],
)
def test_triton_other_head_dims(d, dtype):
    # 128, and head dims zero-padded inside the kernel (8: LSUN's 32 channels over 4 heads).
    torch.manual_seed(d)
    H, T = 2, 33
    qkv = torch.randn(1, 3 * H * d, T, device=TRITON_DEVICE).to(dtype)
    grad_out = torch.randn(1, H * d, T, device=TRITON_DEVICE).to(dtype)
    check_packed(qkv, H, grad_out, *run_packed_triton(qkv, H, grad_out))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_small_blocks(monkeypatch, dtype):
    # 16 x 16 tiles at T = 61: three full blocks plus a ragged tail in every loop of every kernel.
    tiles = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    monkeypatch.setattr(LAUNCH, "tile_config", lambda kernel, T, d, dt: tiles)
    monkeypatch.setenv("CMKERNELS_AUTOTUNE", "0")
    torch.manual_seed(0)
    H, d, T = 1, 32, 61
    qkv = torch.randn(1, 3 * H * d, T, device=TRITON_DEVICE).to(dtype)
    grad_out = torch.randn(1, H * d, T, device=TRITON_DEVICE).to(dtype)
    check_packed(qkv, H, grad_out, *run_packed_triton(qkv, H, grad_out))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_packed_noncontiguous(dtype):
    # qkv as a channels-last view (token-major storage, channel stride 1) and grad_out strided in T.
    torch.manual_seed(1)
    H, d, T = 2, 16, 37
    qkv = torch.randn(2, T, 3 * H * d, device=TRITON_DEVICE).to(dtype).transpose(1, 2)
    grad_out = torch.randn(2, H * d, 2 * T, device=TRITON_DEVICE).to(dtype)[:, :, ::2]
    assert not qkv.is_contiguous() and not grad_out.is_contiguous()
    check_packed(qkv, H, grad_out, *run_packed_triton(qkv, H, grad_out))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "bthd", "packed_bt3hd"])
def test_triton_bhtd(layout, dtype):
    torch.manual_seed(2)
    B, H, T, d = 2, 2, 45, 32
    dev = TRITON_DEVICE
    if layout == "contiguous":
        q, k, v = (torch.randn(B, H, T, d, device=dev).to(dtype) for _ in range(3))
    elif layout == "bthd":  # [B, T, H, d] storage
        q, k, v = (torch.randn(B, T, H, d, device=dev).to(dtype).transpose(1, 2) for _ in range(3))
    else:  # one [B, T, 3, H, d] tensor
        q, k, v = torch.randn(B, T, 3, H, d, device=dev).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    grad_out = torch.randn(B, H, T, d, device=dev).to(dtype)
    out, lse = A.attention_bhtd_triton(q, k, v)
    grads = A.attention_bhtd_backward_triton(grad_out, q, k, v, out, lse)
    out64, lse64, g64, outl, gl = reference_bhtd(q, k, v, grad_out)
    check_rule("out", out, outl, out64, dtype)
    torch.testing.assert_close(lse.double(), lse64, atol=LSE_ATOL[dtype], rtol=1e-6)
    for name, g, gr, gb in zip(("dq", "dk", "dv"), grads, g64, gl, strict=True):
        assert g.shape == (B, H, T, d) and g.dtype == dtype
        check_rule(name, g, gb, gr, dtype)


@needs_triton
def test_triton_empty_batch():
    qkv = torch.randn(0, 3 * 2 * 16, 5, device=TRITON_DEVICE)
    out, lse = A.attention_triton(qkv, 2)
    assert out.shape == (0, 32, 5) and lse.shape == (0, 2, 5)
    grad = A.attention_backward_triton(out.clone(), qkv, out, lse, 2)
    assert grad.shape == qkv.shape


# ------------------------------------------------------------------------------------------------
# The ops on CPU tensors: CPU kernels, autograd, opcheck, torch.compile.


# The two CPU paths: the ops' own CPU kernels (through their registered autograd) and the public
# entry points, which call SDPA on the CPU.
PACKED = {"op": lambda x, h: torch.ops.cmkernels.attention(x, h)[0], "public": attention}
BHTD = {"op": lambda q, k, v: torch.ops.cmkernels.attention_bhtd(q, k, v)[0],
        "public": attention_bhtd}  # fmt: skip


@pytest.mark.parametrize("path", list(PACKED))
@pytest.mark.parametrize("B, H, d, T, strided", [(2, 2, 16, 29, False), (3, 3, 40, 1, True),
                                                 (1, 1, 64, 70, True)])  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_paths(dtype, B, H, d, T, strided, path):
    torch.manual_seed(3)
    if strided:  # [B, T, C] storage seen as [B, C, T]: no dimension has stride 1 where expected
        qkv = torch.randn(B, T, 3 * H * d).to(dtype).transpose(1, 2)
    else:
        qkv = torch.randn(B, 3 * H * d, T).to(dtype)
    grad_out = torch.randn(B, H * d, T).to(dtype)
    x = qkv.clone().requires_grad_()
    out = PACKED[path](x, H)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    _, lse = torch.ops.cmkernels.attention(qkv, H)
    check_packed(qkv, H, grad_out, out.detach(), lse, grad)
    with torch.no_grad():
        inference = PACKED[path](qkv, H)
    out64, _, _, outl, _ = reference_packed(qkv, H, grad_out)
    check_rule("inference", inference, outl, out64, dtype)


@pytest.mark.parametrize("path", list(PACKED))
@pytest.mark.parametrize("shape", [(0, 96, 5), (2, 96, 0)])
def test_cpu_empty(shape, path):
    x = torch.randn(*shape, requires_grad=True)
    out = PACKED[path](x, 2)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert out.shape == (shape[0], 32, shape[2]) and grad.shape == shape
    _, lse = torch.ops.cmkernels.attention(x.detach(), 2)
    assert lse.shape == (shape[0], 2, shape[2]) and lse.dtype == torch.float32


@pytest.mark.parametrize("path", list(BHTD))
def test_cpu_bhtd(path):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 17, 8).requires_grad_() for _ in range(3))
    out = BHTD[path](q, k, v)
    torch.testing.assert_close(out, attention_bhtd_ref(q, k, v), atol=2e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    refs = torch.autograd.grad(attention_bhtd_ref(q, k, v).sum(), (q, k, v))
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("path", list(PACKED))
def test_gradcheck_cpu(path):
    torch.manual_seed(5)
    qkv = torch.randn(1, 3 * 2 * 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: PACKED[path](x, 2), (qkv,), fast_mode=True)
    qs = [torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(BHTD[path], qs, fast_mode=True)


def test_opcheck():
    torch.manual_seed(6)
    H, d, T = 2, 8, 6
    qkv = torch.randn(2, 3 * H * d, T, requires_grad=True)
    out, lse = torch.ops.cmkernels.attention(qkv.detach(), H)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.cmkernels.attention.default, (qkv, H))
    torch.library.opcheck(
        torch.ops.cmkernels.attention_backward.default, (grad_out, qkv.detach(), out, lse, H)
    )
    q, k, v = (torch.randn(2, H, T, d, requires_grad=True) for _ in range(3))
    out, lse = torch.ops.cmkernels.attention_bhtd(q.detach(), k.detach(), v.detach())
    torch.library.opcheck(torch.ops.cmkernels.attention_bhtd.default, (q, k, v))
    torch.library.opcheck(
        torch.ops.cmkernels.attention_bhtd_backward.default,
        (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse),
    )


def test_torch_compile_cpu():
    torch.manual_seed(7)
    H, d, T = 2, 16, 12
    qkv = torch.randn(2, 3 * H * d, T)

    def block(x):  # the attention block's core: attention, then a residual-style use
        return attention(x, H) * 2.0 + 1.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x1, x2 = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    y1, y2 = block(x1), compiled(x2)
    torch.testing.assert_close(y2, y1)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    with torch.no_grad():
        torch.testing.assert_close(compiled(qkv), block(qkv))


# ------------------------------------------------------------------------------------------------
# Registration and bad inputs.


def _cpp_schemas():
    """name -> schema text of every m.def in csrc/ops.cpp (adjacent literals joined)."""
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    defs = {}
    for body in re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text):
        schema = "".join(re.findall(r"\"([^\"]*)\"", body))
        defs[schema.split("(", 1)[0]] = schema
    return defs


def test_schemas_match_cpp():
    cpp = _cpp_schemas()
    for name, schema in (
        ("attention", A.SCHEMA),
        ("attention_backward", A.BACKWARD_SCHEMA),
        ("attention_bhtd", A.BHTD_SCHEMA),
        ("attention_bhtd_backward", A.BHTD_BACKWARD_SCHEMA),
    ):
        assert cpp[name] == name + schema
        assert schema_of(name) == f"cmkernels::{name}{schema}"


def test_bad_inputs():
    with pytest.raises(ValueError, match="positive multiple of 3 \\* num_heads"):
        attention(torch.randn(1, 3 * 16 + 3, 4), 2)
    with pytest.raises(ValueError, match="num_heads must be positive"):
        attention(torch.randn(1, 48, 4), 0)
    with pytest.raises(ValueError, match="head dim 256 is not supported"):
        attention(torch.randn(1, 3 * 256, 4), 1)
    with pytest.raises(ValueError, match="shape \\[B, 3\\*H\\*d, T\\]"):
        attention(torch.randn(48, 4), 1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attention(torch.ones(1, 48, 4, dtype=torch.int32), 1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        torch.ops.cmkernels.attention(torch.ones(1, 48, 4, dtype=torch.int32), 1)
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="k has shape"):
        attention_bhtd(q, torch.randn(1, 2, 6, 16), q)
    with pytest.raises(TypeError, match="v has dtype"):
        attention_bhtd(q, q, q.half())
    with pytest.raises(ValueError, match="is on meta"):
        attention_bhtd(q, q, torch.randn(1, 2, 5, 16, device="meta"))
    with pytest.raises(ValueError, match="head dim 160"):
        attention_bhtd(*(torch.randn(1, 1, 3, 160) for _ in range(3)))
    qkv = torch.randn(1, 48, 4)
    out, lse = torch.ops.cmkernels.attention(qkv, 1)
    with pytest.raises(ValueError, match="grad_out has shape"):
        torch.ops.cmkernels.attention_backward(out[:, :, :3], qkv, out, lse, 1)
    with pytest.raises(TypeError, match="lse has dtype"):
        torch.ops.cmkernels.attention_backward(out, qkv, out, lse.double(), 1)


# For the same bad input every path raises what the op's check (cmkernels/ops/attention/checks.py)
# raises, type and text: the public function, the registered op on CPU tensors (its CPU kernel),
# the op on meta tensors (its fake kernel) and the Triton launcher.
def _qkv(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _bhtd(T=5, d=16, dtype=torch.float32, device="cpu"):
    return torch.randn(1, 2, T, d).to(dtype).to(device)


def _packed_backward(grad_T=4, out_dtype=torch.float32, lse_dtype=torch.float32):
    """(grad_out, qkv, out, lse, num_heads) of one head of d = 16 over T = 4."""
    grad_out, out = _qkv(1, 16, grad_T), _qkv(1, 16, 4).to(out_dtype)
    return grad_out, _qkv(1, 48, 4), out, _qkv(1, 1, 4).to(lse_dtype), 1


BAD = {  # name: (op, arguments on the CPU)
    "channels": ("attention", lambda: (_qkv(1, 3 * 16 + 3, 4), 2)),
    "num_heads": ("attention", lambda: (_qkv(1, 48, 4), 0)),
    "head_dim": ("attention", lambda: (_qkv(1, 3 * 256, 4), 1)),
    "qkv_dims": ("attention", lambda: (_qkv(48, 4), 1)),
    "qkv_int": ("attention", lambda: (torch.ones(1, 48, 4, dtype=torch.int32), 1)),
    "q_dims": ("attention_bhtd", lambda: (_qkv(2, 5, 16),) * 3),
    "k_shape": ("attention_bhtd", lambda: (_bhtd(), _bhtd(T=6), _bhtd())),
    "v_dtype": ("attention_bhtd", lambda: (_bhtd(), _bhtd(), _bhtd(dtype=torch.half))),
    "v_device": ("attention_bhtd", lambda: (_bhtd(), _bhtd(), _bhtd(device="meta"))),
    "bhtd_head_dim": ("attention_bhtd", lambda: (_bhtd(d=160),) * 3),
    "grad_out_shape": ("attention_backward", lambda: _packed_backward(grad_T=3)),
    "out_dtype": ("attention_backward", lambda: _packed_backward(out_dtype=torch.half)),
    "lse_dtype": ("attention_backward", lambda: _packed_backward(lse_dtype=torch.double)),
    "lse_shape": ("attention_bhtd_backward", lambda: (_bhtd(),) * 5 + (_qkv(1, 2, 4),)),
}
CHECKS = {
    "attention": A.check_packed,
    "attention_bhtd": A.check_bhtd,
    "attention_backward": A.check_packed_backward,
    "attention_bhtd_backward": A.check_bhtd_backward,
}
PUBLIC = {"attention": attention, "attention_bhtd": attention_bhtd}


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize(
    "path", ["public", "cpu_op", "meta", pytest.param("triton", marks=TRITON_MARKS)]
)
def test_every_path_raises_the_same_error(path, kind):
    op, make = BAD[kind]
    args = make()
    if path == "public" and op not in PUBLIC:
        pytest.skip("the public functions have no backward entry")
    if path == "meta" and kind.endswith("device"):
        pytest.skip("on meta every tensor is on one device")
    if path in ("meta", "triton"):
        dev = "meta" if path == "meta" else TRITON_DEVICE
        args = tuple(a.to(dev) if isinstance(a, torch.Tensor) and a.device.type == "cpu" else a
                     for a in args)  # fmt: skip
    want = raised(lambda: CHECKS[op](*args))
    if path == "public":
        fn = PUBLIC[op]
    elif path == "triton":
        fn = getattr(A, op + "_triton")
    else:
        fn = getattr(torch.ops.cmkernels, op).default
    assert_same_error(want, lambda: fn(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_lse_dtype_is_the_accumulation_dtype_on_every_path(dtype):
    # lse: float32, float64 for float64 input, from the CPU kernel and the fake kernel alike (the
    # Triton kernels take no float64; their float32 lse is checked above).
    want = torch.float64 if dtype == torch.float64 else torch.float32
    qkv = _qkv(2, 3 * 2 * 8, 5, dtype=dtype)
    for x in (qkv, qkv.to("meta")):
        out, lse = torch.ops.cmkernels.attention(x, 2)
        assert out.dtype == dtype and lse.dtype == want and lse.shape == (2, 2, 5)
        q = x[:, :16].reshape(2, 2, 8, 5).transpose(-1, -2)
        out, lse = torch.ops.cmkernels.attention_bhtd(q, q, q)
        assert out.dtype == dtype and lse.dtype == want and lse.shape == (2, 2, 5)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_bad_inputs():
    if TRITON_DEVICE is not None:
        x64 = torch.randn(1, 48, 4, dtype=torch.float64, device=TRITON_DEVICE)
        with pytest.raises(TypeError, match="float64 is served by the CPU kernels only"):
            A.attention_triton(x64, 1)
    if TRITON_DEVICE != "cpu":  # without the interpreter, CPU tensors are refused
        with pytest.raises(ValueError, match="take CUDA tensors"):
            A.attention_triton(torch.randn(1, 48, 4), 1)


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels at the UNet's sizes (skipped without CUDA).


@gpu
@pytest.mark.parametrize("autotune", ["1", "0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, d", [(64, 64), (256, 64), (1024, 64), (1025, 64), (4096, 64),
                                  (1024, 128), (4096, 16)])  # fmt: skip
def test_gpu_packed_large(T, d, dtype, autotune, monkeypatch):
    monkeypatch.setenv("CMKERNELS_AUTOTUNE", autotune)
    torch.manual_seed(T + d)
    H = 2
    qkv = torch.randn(2, 3 * H * d, T, device="cuda").to(dtype)
    grad_out = torch.randn(2, H * d, T, device="cuda").to(dtype)
    x = qkv.clone().requires_grad_()
    out = attention(x, H)  # op -> Triton forward; autograd -> Triton backward
    (grad,) = torch.autograd.grad(out, x, grad_out)
    _, lse = torch.ops.cmkernels.attention(qkv, H)
    check_packed(qkv, H, grad_out, out.detach(), lse, grad)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_bhtd_and_compile(dtype):
    torch.manual_seed(8)
    q, k, v = (torch.randn(4, 6, 1024, 64, device="cuda", dtype=dtype) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = attention_bhtd(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=0)
    compiled = torch.compile(lambda x: attention(x, 6), fullgraph=True)
    qkv = torch.randn(4, 3 * 6 * 64, 1024, device="cuda", dtype=dtype)
    torch.testing.assert_close(compiled(qkv), attention(qkv, 6))


@gpu
def test_gpu_cuda_graph():
    qkv = torch.randn(2, 3 * 4 * 64, 256, device="cuda", dtype=torch.bfloat16)
    eager = attention(qkv, 4)  # warm-up: compiles and autotunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attention(qkv, 4)
    qkv.normal_()
    graph.replay()
    torch.testing.assert_close(captured, attention(qkv, 4))
    assert not torch.equal(captured, eager)


# ------------------------------------------------------------------------------------------------
# Forward-mode AD (torch.func.jvp and forward_ad dual tensors): the tangent against the float64
# jvp of the references, random tangents on every input.

JVP_MODES = ["func", "dual"]
JVP_RTOL = 1e-4  # fp32: relative to the tangent's largest entry


def _up(ts):
    return [t.double() if t is not None else None for t in ts]


def check_tangent(name, got, fn_ref, primals, tangents):
    """got against the float64 jvp of fn_ref; half dtypes by the rule against the reference's own
    jvp in that dtype (fp32 math from the same rounded inputs, rounded once)."""
    _, t64 = forward_ad_jvp(fn_ref, _up(primals), _up(tangents))
    dtype = primals[0].dtype
    assert got.dtype == dtype and got.shape == t64.shape, name
    if dtype == torch.float32:
        err = (got.double() - t64).abs().max().item() / t64.abs().max().item()
        assert err <= JVP_RTOL, f"{name}: relative error {err:.3g}"
    else:
        _, tlow = forward_ad_jvp(fn_ref, list(primals), list(tangents))
        check_rule(name, got, tlow, t64, dtype)


@pytest.mark.parametrize("mode", JVP_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, H, d, T, strided",
    [(2, 2, 16, 33, False), (1, 3, 8, 7, True), (2, 1, 40, 1, False), (1, 2, 32, 64, True)],
)
def test_jvp_packed(B, H, d, T, strided, dtype, mode):
    torch.manual_seed(T * 7 + d)
    if strided:  # [B, T, C] storage seen as [B, C, T]
        qkv = torch.randn(B, T, 3 * H * d).to(dtype).transpose(1, 2)
        tqkv = torch.randn(B, T, 3 * H * d).to(dtype).transpose(1, 2)
    else:
        qkv, tqkv = (torch.randn(B, 3 * H * d, T).to(dtype) for _ in range(2))
    out, t = forward_ad_jvp(lambda x: attention(x, H), [qkv], [tqkv], mode)
    torch.testing.assert_close(out, attention(qkv, H))
    check_tangent("tangent", t, lambda x: attention_ref(x, H), [qkv], [tqkv])


@pytest.mark.parametrize("mode", JVP_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("which", [(0, 1, 2), (0,), (1,), (2,)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "bthd"])
def test_jvp_bhtd(layout, which, dtype, mode):
    torch.manual_seed(9)
    B, H, T, d = 2, 2, 33, 24
    if layout == "contiguous":
        make = lambda: torch.randn(B, H, T, d).to(dtype)
    else:  # [B, T, H, d] storage
        make = lambda: torch.randn(B, T, H, d).to(dtype).transpose(1, 2)
    primals = [make() for _ in range(3)]
    tangents = [make() if i in which else None for i in range(3)]
    out, t = forward_ad_jvp(attention_bhtd, primals, tangents, mode)
    torch.testing.assert_close(out, attention_bhtd(*primals))
    check_tangent("tangent", t, attention_bhtd_ref, primals, tangents)


def test_jvp_float64():
    qkv, tqkv = (torch.randn(2, 3 * 2 * 8, 7, dtype=torch.float64) for _ in range(2))
    _, t = forward_ad_jvp(lambda x: attention(x, 2), [qkv], [tqkv])
    _, want = forward_ad_jvp(lambda x: attention_ref(x, 2), [qkv], [tqkv])
    assert t.dtype == torch.float64
    torch.testing.assert_close(t, want, rtol=1e-12, atol=1e-12)


def test_jvp_was_refused_by_sdpa_and_now_is_right():
    # Formerly the CPU path raised SDPA's NotImplementedError (and the GPU op dropped the tangent).
    qkv, tqkv = torch.randn(2, 3 * 4 * 16, 25), torch.randn(2, 3 * 4 * 16, 25)
    _, t = torch.func.jvp(lambda x: attention(x, 4), (qkv,), (tqkv,))
    _, want = torch.func.jvp(lambda x: attention_ref(x, 4), (qkv.double(),), (tqkv.double(),))
    assert t.abs().max() > 0
    assert (t.double() - want).abs().max() <= JVP_RTOL * want.abs().max()


def test_jvp_composes_with_reverse_mode_and_compile():
    torch.manual_seed(10)
    H = 2
    qkv, tqkv = torch.randn(2, 3 * H * 16, 9), torch.randn(2, 3 * H * 16, 9)
    # A dual tensor that also requires grad: the gradient comes from the op's backward.
    x = qkv.clone().requires_grad_()
    with torch.autograd.forward_ad.dual_level():
        out = attention(torch.autograd.forward_ad.make_dual(x, tqkv), H)
        (g,) = torch.autograd.grad(out.square().sum(), x)
    x64 = qkv.double().requires_grad_()
    (want,) = torch.autograd.grad(attention_ref(x64, H).square().sum(), x64)
    torch.testing.assert_close(g.double(), want, rtol=1e-4, atol=1e-5)

    def under_compile(x, tx):  # jvp inside torch.compile: a graph break, the tangent right
        return torch.func.jvp(lambda x: attention(x, H), (x,), (tx,))[1]

    _, ref = forward_ad_jvp(lambda x: attention_ref(x, H), [qkv], [tqkv])
    got = torch.compile(under_compile, backend="aot_eager")(qkv, tqkv)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jvp_on_the_triton_device(dtype):
    # The forward-AD route on TRITON_DEVICE tensors (on a GPU: the Triton op's forward and a
    # PyTorch tangent), and the tangent formula against the Triton forward's output.
    torch.manual_seed(11)
    H, d, T = 2, 16, 33
    qkv, tqkv = (torch.randn(1, 3 * H * d, T).to(dtype) for _ in range(2))
    dev = [qkv.to(TRITON_DEVICE)], [tqkv.to(TRITON_DEVICE)]
    out, t = forward_ad_jvp(lambda x: attention(x, H), *dev)
    check_tangent("tangent", t.cpu(), lambda x: attention_ref(x, H), [qkv], [tqkv])
    tri, _ = A.attention_triton(dev[0][0], H)
    check_rule("out", out.cpu(), tri.cpu(), attention_ref(qkv.double(), H), dtype)
