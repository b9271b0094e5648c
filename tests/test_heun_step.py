"""heun_step1 / heun_step2: the C++ CPU kernels, the no-extension fallback and (on a GPU) the CUDA
kernels against the float64 reference, forward and every gradient.

Non-contiguous inputs: x's layout is kept when it is contiguous, channels_last or
channels_last_3d; any other strides are copied to contiguous (tested with a strided view), and
inputs in a different layout than x are copied to x's (tested by mixing layouts)."""

import pytest
import torch
from _tolerance import assert_close_rule, rel_err
from conftest import assert_same_error, raised, requires_cuda, run_without_extension

import cmkernels
from cmkernels.ops import heun_step1, heun_step1_ref, heun_step2, heun_step2_ref
from cmkernels.ops.heun_step import (
    SCHEMA1,
    SCHEMA2,
    check_inputs,
    heun_step1_fallback,
    heun_step2_fallback,
)
from cmkernels.ops.registry import schema_of

OP1 = torch.ops.cmkernels.heun_step1.default
OP2 = torch.ops.cmkernels.heun_step2.default
IMPLS = {"kernel": (OP1, OP2), "fallback": (heun_step1_fallback, heun_step2_fallback)}
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}

# Odd sizes: per-sample lengths that are no multiple of any vector width, a single sample, a
# flat [B] state, a 5-d tensor.
SHAPES = [(3, 5, 7, 9), (1, 3, 17, 5), (4, 3, 8, 8), (7,), (2, 3, 3, 4, 5)]


def _schedule(B, t_dtype=torch.float32, device="cpu"):
    """Per-sample noise levels t in [0.5, 80] and t_next in (0.3 t, 0.9 t)."""
    t = 0.5 + 79.5 * torch.rand(B, dtype=torch.float64)
    tn = t * (0.3 + 0.6 * torch.rand(B, dtype=torch.float64))
    return t.to(device, t_dtype), tn.to(device, t_dtype)


def _layout(v, layout):
    if layout == "channels_last" and v.dim() in (4, 5):
        fmt = torch.channels_last if v.dim() == 4 else torch.channels_last_3d
        return v.contiguous(memory_format=fmt)
    if layout == "strided":
        return torch.stack([v, v], dim=-1)[..., 0]  # a non-contiguous view with the same values
    return v


def _inputs(shape, dtype, d_dtype, t_dtype=torch.float32, layout="contiguous", device="cpu"):
    B = shape[0]
    t, tn = _schedule(B, t_dtype, device)
    sig = t.double().reshape((B,) + (1,) * (len(shape) - 1)).cpu()
    x = torch.randn(shape, dtype=torch.float64) * sig  # the state at noise level t
    D = torch.randn(shape, dtype=torch.float64)  # a network output: the clean image estimate
    D1 = D + 0.1 * torch.randn(shape, dtype=torch.float64)
    x, D, D1 = (_layout(v.to(device), layout) for v in (x, D, D1))
    return x.to(dtype), D.to(d_dtype), D1.to(d_dtype), t, tn


def _eager1(x, D, t, tn):
    """Plain PyTorch in the tensors' own dtypes (what the tolerance rule compares with)."""
    bc = (-1,) + (1,) * (x.dim() - 1)
    d = (x - D) / t.to(x.dtype).reshape(bc)
    return (x + (tn - t).to(x.dtype).reshape(bc) * d).to(x.dtype), d.to(x.dtype)


def _eager2(x, d, x1, D1, t, tn):
    bc = (-1,) + (1,) * (x.dim() - 1)
    h, tnn = (tn - t).to(x.dtype).reshape(bc), tn.to(x.dtype).reshape(bc)
    return (x + h * (d + (x1 - D1) / tnn) / 2).to(x.dtype)


def _f64(*ts):
    return [v.double() for v in ts]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "dtype, d_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),  # fp32 sampler state, bf16 network output
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
    ids=lambda d: str(d).split(".")[-1],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(impl, dtype, d_dtype, layout, shape):
    step1, step2 = IMPLS[impl]
    t_dtype = torch.float64 if shape[0] % 2 else torch.float32
    x, D, D1, t, tn = _inputs(shape, dtype, d_dtype, t_dtype, layout)
    x1, d = step1(x, D, t, tn)
    ref_x1, ref_d = heun_step1_ref(*_f64(x, D, t, tn))
    eager_x1, eager_d = _eager1(x, D, t, tn)
    for out, ref, eager, name in ((x1, ref_x1, eager_x1, "x1"), (d, ref_d, eager_d, "d")):
        assert out.dtype == dtype and out.shape == x.shape, name
        assert_close_rule(out, ref, eager, ATOL[dtype] * ref.abs().max().item(), name)

    out = step2(x, d, x1, D1, t, tn)
    ref = heun_step2_ref(*_f64(x, d, x1, D1, t, tn))
    eager = _eager2(x, d, x1, D1, t, tn)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rule(out, ref, eager, ATOL[dtype] * ref.abs().max().item(), "x_next")

    # Layout rule: channels_last(_3d) is kept, other strides give contiguous outputs.
    for o in (x1, d, out):
        if layout == "channels_last" and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert o.is_contiguous(memory_format=fmt)
        else:
            assert o.is_contiguous()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_float64_is_exact(impl):
    step1, step2 = IMPLS[impl]
    x, D, D1, t, tn = _inputs((3, 4, 5, 6), torch.float64, torch.float64, torch.float64)
    x1, d = step1(x, D, t, tn)
    ref_x1, ref_d = heun_step1_ref(x, D, t, tn)
    torch.testing.assert_close(x1, ref_x1, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(d, ref_d, rtol=1e-14, atol=1e-12)
    out = step2(x, d, x1, D1, t, tn)
    torch.testing.assert_close(out, heun_step2_ref(x, d, x1, D1, t, tn), rtol=1e-14, atol=1e-12)


def test_mixed_layouts_and_per_sample_t():
    # Inputs in layouts other than x's are copied to x's; every sample uses its own t, t_next:
    # the batch equals B single-sample calls.
    x, D, D1, t, tn = _inputs((5, 3, 6, 7), torch.float32, torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    x1, d = heun_step1(x, D, t, tn)
    out = heun_step2(x, d.contiguous(), x1, _layout(D1, "strided"), t, tn)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for b in range(5):
        s = slice(b, b + 1)
        x1_b, d_b = heun_step1(x[s], D[s], t[s], tn[s])
        torch.testing.assert_close(x1_b, x1[s], rtol=0, atol=0)
        torch.testing.assert_close(d_b, d[s], rtol=0, atol=0)
        torch.testing.assert_close(
            heun_step2(x[s], d_b, x1_b, D1[s], t[s], tn[s]), out[s], rtol=0, atol=0
        )


def test_empty_batch_and_empty_sample():
    for shape in [(0, 3, 4, 4), (3, 0, 4)]:
        x, D, D1, t, tn = _inputs(shape, torch.float32, torch.float32)
        x1, d = heun_step1(x, D, t, tn)
        assert x1.shape == d.shape == x.shape
        assert heun_step2(x, d, x1, D1, t, tn).shape == x.shape


def _ref_grads(fn, inputs, grads):
    leaves = [v.detach().double().requires_grad_(True) for v in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.double() for g in grads])
    return [v.grad for v in leaves]


@pytest.mark.parametrize(
    "dtype, d_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_gradients_match_float64(dtype, d_dtype):
    x, D, D1, t, tn = _inputs((3, 2, 5, 7), dtype, d_dtype)
    leaves = [v.clone().requires_grad_(True) for v in (x, D, t, tn)]
    x1, d = heun_step1(*leaves)
    g1, gd = torch.randn_like(x1), torch.randn_like(d)
    torch.autograd.backward((x1, d), (g1, gd))
    want = _ref_grads(heun_step1_ref, (x, D, t, tn), (g1, gd))
    # Gradients come back in their input's dtype: bound the error by that dtype's rounding (the
    # t gradients are per-sample sums; bf16 tensors feed them rounded values).
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
    for name, leaf, w in zip(["x", "denoised", "t", "t_next"], leaves, want):
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        err = rel_err(leaf.grad, w)
        assert err < tol[leaf.dtype if dtype == torch.float32 else dtype], f"grad {name}: {err:.3g}"

    leaves = [v.detach().clone().requires_grad_(True) for v in (x, d, x1, D1, t, tn)]
    out = heun_step2(*leaves)
    g = torch.randn_like(out)
    out.backward(g)
    want = _ref_grads(heun_step2_ref, (x, d, x1, D1, t, tn), (g,))
    for name, leaf, w in zip(["x", "d", "x1", "denoised1", "t", "t_next"], leaves, want):
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape, name
        err = rel_err(leaf.grad, w)
        assert err < tol[leaf.dtype if dtype == torch.float32 else dtype], f"grad {name}: {err:.3g}"


def test_gradcheck_float64():
    x, D, D1, t, tn = _inputs((2, 3, 2, 2), torch.float64, torch.float64, torch.float64)
    args1 = [v.requires_grad_(True) for v in (x, D, t, tn)]
    assert torch.autograd.gradcheck(heun_step1, args1, eps=1e-6, atol=1e-7)
    x1, d = (v.detach().requires_grad_(True) for v in heun_step1(x, D, t, tn))
    args2 = [x, d, x1, D1.requires_grad_(True), t, tn]
    assert torch.autograd.gradcheck(heun_step2, args2, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, D, D1, t, tn = _inputs((2, 3, 4, 5), torch.float32, torch.bfloat16, layout=layout)
    x1, d = heun_step1(x, D, t, tn)
    for v in (x, D, D1, t, tn, x1, d):
        v.requires_grad_(v.dtype == torch.float32)
    torch.library.opcheck(OP1, (x, D, t, tn))
    torch.library.opcheck(OP2, (x, d, x1, D1, t, tn))


def test_torch_compile_fullgraph():
    # A whole Heun step around a toy denoiser, compiled as one graph.
    x, _, _, t, tn = _inputs((2, 3, 8, 8), torch.float32, torch.float32)

    def denoiser(x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    def step(x, t, tn):
        x1, d = heun_step1(x, denoiser(x, t), t, tn)
        return heun_step2(x, d, x1, denoiser(x1, tn), t, tn)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaf = x.clone().requires_grad_(True)
    out = compiled(leaf, t, tn)
    out.sum().backward()
    torch.testing.assert_close(out, step(x, t, tn))
    ref = x.clone().requires_grad_(True)
    step(ref, t, tn).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_schemas_declared_once_and_match_python():
    assert schema_of("heun_step1") == "cmkernels::heun_step1" + SCHEMA1
    assert schema_of("heun_step2") == "cmkernels::heun_step2" + SCHEMA2


def test_fallback_without_extension():
    # The ops are declared from Python and served by the references.
    run_without_extension("""
        import torch
        from cmkernels.ops import heun_step1, heun_step2, heun_step1_ref, heun_step2_ref
        x = torch.randn(2, 3, 4, 4); D = torch.randn_like(x); t = torch.tensor([2.0, 3.0])
        tn = t / 2
        x1, d = heun_step1(x, D, t, tn)
        r1, rd = heun_step1_ref(x, D, t, tn)
        assert torch.equal(x1, r1) and torch.equal(d, rd)
        assert torch.equal(heun_step2(x, d, x1, D, t, tn), heun_step2_ref(x, d, x1, D, t, tn))
        print("ok")
    """)


# (mutation, error, message, whether stage 1 takes the mutated argument too)
BAD_INPUTS = [
    (lambda a: a.update(x=a["x"].long()), TypeError, "x must be float32", True),
    (lambda a: a.update(x=a["x"][0, 0, 0, 0]), ValueError, r"shape \[B, \.\.\.\]", True),
    (lambda a: a.update(D=a["D"][:, :2]), ValueError, "denoised has shape", True),
    (lambda a: a.update(D=a["D"].double()), TypeError, "denoised must be float32", True),
    (lambda a: a.update(d=a["d"].half()), TypeError, "d has dtype", False),
    (lambda a: a.update(x1=a["x1"][:1]), ValueError, "x1 has shape", False),
    (lambda a: a.update(t=a["t"][:1]), ValueError, r"t must have shape \[B\]", True),
    (
        lambda a: a.update(tn=a["tn"].reshape(2, 1)),
        ValueError,
        r"t_next must have shape \[B\]",
        True,
    ),
    (lambda a: a.update(t=a["t"].half()), TypeError, "t must be float32 or float64", True),
    (lambda a: a.update(t=a["t"].double()), TypeError, "the same dtype", True),
    (lambda a: a.update(D=a["D"].to("meta")), ValueError, "is on meta", True),
]


def _bad_args(mutate, device="cpu"):
    x, D, D1, t, tn = _inputs((2, 3, 4, 4), torch.float32, torch.float32)
    a = dict(x=x, D=D, t=t, tn=tn, d=x.clone(), x1=x.clone())
    if device != "cpu":  # every tensor there, before the mutation (which may move one to meta)
        a = {k: v.to(device) for k, v in a.items()}
    mutate(a)
    return a


@pytest.mark.parametrize("mutate, error, match, in_stage1", BAD_INPUTS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_input_raises_clear_error(mutate, error, match, in_stage1, impl):
    step1, step2 = IMPLS[impl]
    a = _bad_args(mutate)
    with pytest.raises(error, match=match):
        step2(a["x"], a["d"], a["x1"], a["D"], a["t"], a["tn"])
    if in_stage1:
        with pytest.raises(error, match=match):
            step1(a["x"], a["D"], a["t"], a["tn"])


# Every path of the ops: the C++ kernel (the registered op on CPU tensors), the no-extension
# fallback, the public functions, and the registered op on meta tensors (its fake kernel). For the
# same bad input each raises what the Python check raises, type and text.
PATHS = {
    "kernel": (OP1, OP2),
    "fallback": (heun_step1_fallback, heun_step2_fallback),
    "public": (heun_step1, heun_step2),
    "meta": (OP1, OP2),
}


@pytest.mark.parametrize("mutate, error, match, in_stage1", BAD_INPUTS)
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_raises_the_same_error(mutate, error, match, in_stage1, path):
    if path == "kernel" and not cmkernels.HAS_EXTENSION:
        pytest.skip("needs the compiled extension")
    if path == "meta" and "meta" in match:
        pytest.skip("on meta every tensor is on one device")
    step1, step2 = PATHS[path]
    a = _bad_args(mutate, "meta" if path == "meta" else "cpu")
    args2 = (a["x"], a["d"], a["x1"], a["D"], a["t"], a["tn"])
    want = raised(lambda: check_inputs("heun_step2", args2[0], dict(d=a["d"], x1=a["x1"]),
                                       *args2[3:]))  # fmt: skip
    assert want[0] is error
    assert_same_error(want, lambda: step2(*args2))
    if in_stage1:
        want = raised(lambda: check_inputs("heun_step1", a["x"], {}, a["D"], a["t"], a["tn"]))
        assert_same_error(want, lambda: step1(a["x"], a["D"], a["t"], a["tn"]))


# ------------------------------------------------------------------------------------------------
# GPU.


@requires_cuda
@pytest.mark.parametrize(
    "dtype, d_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
    ids=lambda d: str(d).split(".")[-1],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "misaligned"])
@pytest.mark.parametrize("shape", [(64, 3, 64, 64), (3, 5, 7, 9), (1, 3, 256, 256), (70000, 3)])
def test_cuda_kernel_matches_float64(dtype, d_dtype, layout, shape):
    if layout == "misaligned":  # storage offset 1: the scalar (non-vector) path
        x, D, D1, t, tn = _inputs(shape, dtype, d_dtype, device="cuda")
        x, D, D1 = (
            torch.cat([v.flatten(), v.flatten()])[1 : 1 + v.numel()].view(v.shape)
            for v in (x, D, D1)
        )
    else:
        x, D, D1, t, tn = _inputs(shape, dtype, d_dtype, layout=layout, device="cuda")
    x1, d = heun_step1(x, D, t, tn)
    ref_x1, ref_d = heun_step1_ref(*_f64(x, D, t, tn))
    eager_x1, eager_d = _eager1(x, D, t, tn)
    assert_close_rule(x1, ref_x1, eager_x1, ATOL[dtype] * ref_x1.abs().max().item(), "x1")
    assert_close_rule(d, ref_d, eager_d, ATOL[dtype] * ref_d.abs().max().item(), "d")
    out = heun_step2(x, d, x1, D1, t, tn)
    ref = heun_step2_ref(*_f64(x, d, x1, D1, t, tn))
    assert_close_rule(out, ref, _eager2(x, d, x1, D1, t, tn), ATOL[dtype] * ref.abs().max().item())
    # CPU and CUDA kernels agree.
    cpu_x1, cpu_d = heun_step1(*(v.cpu() for v in (x, D, t, tn)))
    torch.testing.assert_close(
        x1.cpu(), cpu_x1, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-5
    )


@requires_cuda
def test_cuda_gradients_opcheck_and_graph_capture():
    x, D, D1, t, tn = _inputs((4, 3, 16, 16), torch.float32, torch.bfloat16, device="cuda")
    leaves = [v.clone().requires_grad_(True) for v in (x, D, t, tn)]
    x1, d = heun_step1(*leaves)
    g1, gd = torch.randn_like(x1), torch.randn_like(d)
    torch.autograd.backward((x1, d), (g1, gd))
    want = _ref_grads(heun_step1_ref, (x, D, t, tn), (g1, gd))
    for leaf, w in zip(leaves, want):
        assert rel_err(leaf.grad, w) < 1e-5
    torch.library.opcheck(OP1, (x, D, t, tn))
    x1, d = heun_step1(x, D, t, tn)
    torch.library.opcheck(OP2, (x, d, x1, D1, t, tn))

    # One-step sampler shape: capture both stages in a CUDA graph and replay on new inputs.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        x1, d = heun_step1(x, D, t, tn)
        heun_step2(x, d, x1, D1, t, tn)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x1_g, d_g = heun_step1(x, D, t, tn)
        out_g = heun_step2(x, d_g, x1_g, D1, t, tn)
    x.mul_(0.5)
    t.add_(1.0)
    graph.replay()
    x1, d = heun_step1(x, D, t, tn)
    torch.testing.assert_close(out_g, heun_step2(x, d, x1, D1, t, tn))
    compiled = torch.compile(lambda *a: heun_step1(*a), fullgraph=True)
    torch.testing.assert_close(compiled(x, D, t, tn), heun_step1(x, D, t, tn))


# ------------------------------------------------------------------------------------------------
# Forward-mode AD: the tangents of both stages (the registered ops alone would drop them).


@pytest.mark.parametrize("mode", ["func", "dual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_heun_steps_carry_tangents(mode, dtype, channels_last):
    g = torch.Generator().manual_seed(11)
    shape = (3, 5, 7, 9)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*s, dt=dtype):
        return torch.randn(*s, generator=g).to(dt)

    x, D, D1 = (rand(*shape).contiguous(memory_format=fmt) for _ in range(3))
    t = torch.rand(3, generator=g) * 5 + 0.5
    tn = t * 0.6
    tangents = [rand(*shape).contiguous(memory_format=fmt) for _ in range(3)]
    tt, ttn = torch.randn(3, generator=g), torch.randn(3, generator=g)

    def stages(step1, step2, x, D, D1, t, tn):
        x1, d = step1(x, D, t, tn)
        return x1, d, step2(x, d, x1, D1, t, tn)

    primals = (x, D, D1, t, tn)
    tans = (*tangents, tt, ttn)
    if mode == "func":
        out, tan = torch.func.jvp(lambda *a: stages(heun_step1, heun_step2, *a), primals, tans)
    else:
        fwad = torch.autograd.forward_ad
        with fwad.dual_level():
            duals = [fwad.make_dual(p, q) for p, q in zip(primals, tans, strict=True)]
            res = [fwad.unpack_dual(o) for o in stages(heun_step1, heun_step2, *duals)]
            assert all(r.tangent is not None for r in res)
            out, tan = [r.primal for r in res], [r.tangent for r in res]
    wide = [a.double() for a in primals]
    _, want = torch.func.jvp(lambda *a: stages(heun_step1_ref, heun_step2_ref, *a), tuple(wide),
                             tuple(q.double() for q in tans))  # fmt: skip
    plain = stages(heun_step1, heun_step2, *primals)  # the fused ops, no tangents
    for a, b in zip(out, plain, strict=True):
        assert rel_err(a, b) <= (1e-6 if dtype == torch.float32 else 1e-2)
    for got, ref in zip(tan, want, strict=True):
        assert got.dtype == dtype
        # fp32: rounding only; bf16: the outputs' own bf16 rounding (8 bits of mantissa).
        bound = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(got, ref) <= bound, rel_err(got, ref)
