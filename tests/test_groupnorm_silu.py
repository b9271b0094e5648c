"""groupnorm_silu: every implementation (C++ CPU kernel, Triton kernel, no-extension fallback)
against the float64 reference, forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_rule, rel_err
from conftest import (
    TRITON_DEVICE,
    TRITON_MARKS,
    assert_same_error,
    forward_ad_jvp,
    raised,
    requires_cuda,
)

import cmkernels
from cmkernels.ops import groupnorm_silu, groupnorm_silu_ref
from cmkernels.ops.groupnorm_silu import (
    SCHEMA,
    check_backward_inputs,
    check_inputs,
    groupnorm_silu_backward_fallback,
    groupnorm_silu_backward_triton,
    groupnorm_silu_fallback,
    groupnorm_silu_triton,
)
from cmkernels.ops.registry import schema_of

OP = torch.ops.cmkernels.groupnorm_silu.default
BWD = torch.ops.cmkernels.groupnorm_silu_backward.default

IMPLS = {
    "cpu": (OP, BWD),
    "triton": (groupnorm_silu_triton, groupnorm_silu_backward_triton),
    "fallback": (groupnorm_silu_fallback, groupnorm_silu_backward_fallback),
}
# The Triton launchers run on TRITON_DEVICE (the GPU, or CPU tensors under the interpreter).
IMPL_PARAMS = [
    pytest.param(name, marks=TRITON_MARKS) if name == "triton" else name for name in IMPLS
]


def _device(impl: str) -> str:
    return TRITON_DEVICE if impl == "triton" else "cpu"


ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (shape, groups): odd sizes, channels per group that are not powers of two (6), a group too
# large for one program (the two-stage reduction), a 3-d input (attention's norm on [B, C, T]).
CASES = [
    ((2, 12, 5, 7), 4),
    ((3, 48, 9, 11), 8),
    ((1, 192, 8, 8), 32),
    ((2, 8, 70, 70), 2),
    ((2, 32, 13), 8),
]


def _inputs(shape, groups, dtype, layout, modulate, param_dtype=torch.float32, device="cpu"):
    """Random inputs, drawn on the CPU (the same values on every device), then moved."""
    N, C = shape[:2]
    x = (torch.randn(shape) * 1.7 + 0.6).to(dtype).to(device)
    if layout == "channels_last":
        if x.dim() != 4:
            pytest.skip("channels_last needs a 4-d tensor")
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]  # a non-contiguous view with the same values
    weight = (1 + 0.3 * torch.randn(C)).to(param_dtype).to(device)
    bias = (0.2 * torch.randn(C)).to(param_dtype).to(device)
    scale = (0.5 * torch.randn(N, C)).to(param_dtype).to(device) if modulate else None
    shift = (0.5 * torch.randn(N, C)).to(param_dtype).to(device) if modulate else None
    return x, weight, bias, scale, shift


def _eager(x, weight, bias, scale, shift, groups, activation=True):
    """Plain PyTorch in x's dtype (what the tolerance rule compares with)."""
    bc = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    h = F.group_norm(x, groups, weight.to(x.dtype), bias.to(x.dtype), 1e-5)
    if scale is not None:
        h = h * (1 + scale.to(x.dtype).reshape(bc)) + shift.to(x.dtype).reshape(bc)
    return F.silu(h) if activation else h


def _reference_with_grads(x, weight, bias, scale, shift, groups, activation, grad_y):
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None
              for t in (x, weight, bias, scale, shift)]  # fmt: skip
    y = groupnorm_silu_ref(*leaves, groups=groups, activation=activation)
    y.backward(grad_y.double())
    return y, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
def test_forward_and_backward_match_float64(impl, dtype, layout, case):
    shape, groups = case
    fwd, bwd = IMPLS[impl]
    modulate = shape[1] != 8  # also cover the plain (no scale/shift) path
    activation = shape[1] != 12  # and the no-activation path
    x, w, b, s, sh = _inputs(shape, groups, dtype, layout, modulate, device=_device(impl))
    y, mean, rstd = fwd(x, w, b, s, sh, groups, 1e-5, activation)
    grad_y = torch.randn(shape).to(dtype).to(x.device)
    ref, ref_grads = _reference_with_grads(x, w, b, s, sh, groups, activation, grad_y)

    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_rule(y, ref, _eager(x, w, b, s, sh, groups, activation), ATOL[dtype])
    # Statistics are kept in fp32.
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    xg = x.double().reshape(shape[0], groups, -1)
    torch.testing.assert_close(mean.double(), xg.mean(-1), rtol=1e-3, atol=1e-3)

    grads = bwd(grad_y, x, w, b, s, sh, mean, rstd, groups, activation)
    names = ["grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift"]
    # Gradients in low precision: the kernel accumulates in fp32; bound relative to the largest
    # entry, loose enough for one rounding of the inputs to bf16.
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    for name, got, want in zip(names, grads, ref_grads):
        if want is None:
            assert got.numel() == 0, f"{name} must be empty without scale/shift"
            continue
        assert got.shape == want.shape, name
        assert rel_err(got, want) < tol, f"{name}: relative error {rel_err(got, want):.3g}"


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_half_parameters_and_half_modulation(impl):
    # weight/bias/scale/shift may share x's dtype instead of float32.
    fwd, bwd = IMPLS[impl]
    x, w, b, s, sh = _inputs(
        (2, 16, 6, 5), 4, torch.bfloat16, "contiguous", True, torch.bfloat16, _device(impl)
    )
    y, mean, rstd = fwd(x, w, b, s, sh, 4, 1e-5, True)
    ref = groupnorm_silu_ref(*(t.double() for t in (x, w, b, s, sh)), groups=4)
    assert rel_err(y, ref) < 2e-2
    grads = bwd(torch.randn_like(x), x, w, b, s, sh, mean, rstd, 4, True)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 5


def test_public_entry_point_autograd_matches_reference():
    x, w, b, s, sh = _inputs((2, 24, 7, 9), 8, torch.float32, "contiguous", True)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, s, sh)]
    y = groupnorm_silu(*leaves, groups=8)
    g = torch.randn_like(y)
    y.backward(g)
    ref, ref_grads = _reference_with_grads(x, w, b, s, sh, 8, True, g)
    assert rel_err(y, ref) < 1e-5
    for leaf, want in zip(leaves, ref_grads):
        assert rel_err(leaf.grad, want) < 1e-4


def test_gradcheck_float64():
    x, w, b, s, sh = (
        t.double() for t in _inputs((2, 6, 3, 2), 3, torch.float32, "contiguous", True)
    )
    args = [t.requires_grad_(True) for t in (x, w, b, s, sh)]
    fn = lambda *a: groupnorm_silu(*a, groups=3)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)
    fn_plain = lambda x, w, b: groupnorm_silu(x, w, b, groups=3, activation=False)
    assert torch.autograd.gradcheck(fn_plain, args[:3], eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("modulate", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(modulate, layout):
    x, w, b, s, sh = _inputs((2, 8, 5, 3), 4, torch.float32, layout, modulate)
    for t in (x, w, b, s, sh):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(OP, (x, w, b, s, sh, 4, 1e-5, True))


def test_torch_compile_fullgraph():
    x, w, b, s, sh = _inputs((2, 16, 6, 6), 4, torch.float32, "contiguous", True)

    def block(x, w, b, s, sh):
        return groupnorm_silu(x, w, b, s, sh, groups=4) * 2.0 + 1.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, s, sh)]
    out = compiled(*leaves)
    out.sum().backward()
    ref = block(x, w, b, s, sh)
    torch.testing.assert_close(out, ref)
    assert leaves[0].grad is not None and leaves[3].grad is not None


def test_schema_declared_once_and_matches_python():
    assert schema_of("groupnorm_silu") == "cmkernels::groupnorm_silu" + SCHEMA


def test_extension_loaded_and_build_info():
    info = cmkernels.build_info()
    assert info["extension"], info
    assert info["torch_built_against"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and info["cuda_version"]


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.update(groups=5), ValueError, "divisible by groups"),
        (lambda a: a.update(w=a["w"][:-1]), ValueError, "weight has shape"),
        (lambda a: a.update(s=a["s"][:, :-1]), ValueError, "scale has shape"),
        (lambda a: a.update(sh=a["sh"].double()), TypeError, "shift has dtype"),
        (lambda a: a.update(x=a["x"].long()), TypeError, "must be float32"),
        (lambda a: a.update(x=a["x"][0, 0, 0]), ValueError, r"\[N, C, \*spatial\]"),
        (lambda a: a.update(w=a["w"].to("meta")), ValueError, "weight is on"),
    ],
)
@pytest.mark.parametrize("impl", ["cpu", pytest.param("triton", marks=TRITON_MARKS), "public"])
def test_bad_input_raises_clear_error(mutate, error, match, impl):
    x, w, b, s, sh = _inputs(
        (2, 8, 4, 4), 4, torch.float32, "contiguous", True, device=_device(impl)
    )
    a = dict(x=x, w=w, b=b, s=s, sh=sh, groups=4)
    mutate(a)
    args = (a["x"], a["w"], a["b"], a["s"], a["sh"], a["groups"], 1e-5, True)
    if impl == "triton":
        fn = lambda: groupnorm_silu_triton(*args)
    elif impl == "cpu":
        fn = lambda: OP(*args)
    else:
        fn = lambda: groupnorm_silu(a["x"], a["w"], a["b"], a["s"], a["sh"], groups=a["groups"])
    # The C++ kernel reports through TORCH_CHECK (a RuntimeError subclass carrying the same text).
    with pytest.raises((error, RuntimeError), match=match):
        fn()


# ------------------------------------------------------------------------------------------------
# One set of argument rules (cmkernels/ops/groupnorm_silu/checks.py, mirrored in C++): for the same
# bad input every path raises what the Python check raises, type and text.

BAD_FORWARD = {
    "groups_not_dividing": lambda a: a.update(groups=5),
    "groups_zero": lambda a: a.update(groups=0),
    "x_one_dim": lambda a: a.update(x=a["x"][0, 0, 0]),
    "x_int": lambda a: a.update(x=a["x"].long()),
    "weight_shape": lambda a: a.update(w=a["w"][:-1]),
    "weight_half_for_float_x": lambda a: a.update(w=a["w"].half()),
    "bias_device": lambda a: a.update(b=a["b"].to("meta")),
    "scale_shape": lambda a: a.update(s=a["s"][:, :-1]),
    # [N, C, 1] does not broadcast against a 4-d x; [N, C] and [N, C, 1, 1] do (accepted).
    "scale_n_c_1": lambda a: a.update(s=a["s"][:, :, None]),
    "scale_5d": lambda a: a.update(s=a["s"][:, :, None, None, None]),
    "shift_float64": lambda a: a.update(sh=a["sh"].double()),
    "shift_device": lambda a: a.update(sh=a["sh"].to("meta")),
}
BAD_BACKWARD = {
    "grad_shape": lambda a: a.update(g=a["g"][..., :-1]),
    "grad_dtype": lambda a: a.update(g=a["g"].half()),
    "grad_device": lambda a: a.update(g=a["g"].to("meta")),
    "mean_numel": lambda a: a.update(mean=a["mean"][:, :-1]),
    "rstd_device": lambda a: a.update(rstd=a["rstd"].to("meta")),
    "groups_not_dividing": lambda a: a.update(groups=3),
    "scale_n_c_1": lambda a: a.update(s=a["s"][:, :, None]),
}
DEVICE_CASES = {"bias_device", "shift_device", "grad_device", "rstd_device"}

# Every path of the ops: the public function, the registered op on CPU tensors (the C++ kernel),
# the no-extension fallback, the registered op on meta tensors (its fake kernel), the Triton
# launcher (TRITON_DEVICE).
PATHS = ["public", "cpu_op", "fallback", "meta", pytest.param("triton", marks=TRITON_MARKS)]


def _bad_call(path, kind, backward):
    """(the Python check's call, the path's call) on the same bad arguments."""
    dev = TRITON_DEVICE if path == "triton" else "cpu"
    if path == "cpu_op" and not cmkernels.HAS_EXTENSION:
        pytest.skip("needs the compiled extension")
    if path == "meta" and kind in DEVICE_CASES:
        pytest.skip("on meta every tensor is on one device")
    if path == "public" and backward:
        pytest.skip("the public function has no backward entry")
    x, w, b, s, sh = _inputs((2, 8, 4, 4), 4, torch.float32, "contiguous", True, device=dev)
    a = dict(x=x, w=w, b=b, s=s, sh=sh, groups=4, g=torch.randn_like(x))
    a["mean"], a["rstd"] = torch.zeros(2, 4, device=dev), torch.ones(2, 4, device=dev)
    (BAD_BACKWARD if backward else BAD_FORWARD)[kind](a)
    if path == "meta":
        a = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    fwd_args = (a["x"], a["w"], a["b"], a["s"], a["sh"], a["groups"])
    if backward:
        args = (a["g"], *fwd_args[:-1], a["mean"], a["rstd"], a["groups"])
        check = lambda: check_backward_inputs(*args)
        fn = {"cpu_op": BWD, "meta": BWD, "fallback": groupnorm_silu_backward_fallback,
              "triton": groupnorm_silu_backward_triton}[path]  # fmt: skip
        return check, lambda: fn(*args, True)
    check = lambda: check_inputs(*fwd_args)
    if path == "public":
        return check, lambda: groupnorm_silu(*fwd_args[:-1], groups=a["groups"])
    fn = {"cpu_op": OP, "meta": OP, "fallback": groupnorm_silu_fallback,
          "triton": groupnorm_silu_triton}[path]  # fmt: skip
    return check, lambda: fn(*fwd_args, 1e-5, True)


@pytest.mark.parametrize("kind", list(BAD_FORWARD))
@pytest.mark.parametrize("path", PATHS)
def test_every_path_raises_the_same_error(path, kind):
    check, call = _bad_call(path, kind, backward=False)
    assert_same_error(raised(check), call)


@pytest.mark.parametrize("kind", list(BAD_BACKWARD))
@pytest.mark.parametrize("path", PATHS)
def test_every_backward_path_raises_the_same_error(path, kind):
    check, call = _bad_call(path, kind, backward=True)
    assert_same_error(raised(check), call)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_broadcastable_scale_shape_is_accepted(impl):
    # scale / shift as [N, C, 1, 1] (what broadcasts against x) give what [N, C] gives, and their
    # gradients come back in that shape.
    fwd, bwd = IMPLS[impl]
    x, w, b, s, sh = _inputs(
        (2, 8, 5, 3), 4, torch.float32, "contiguous", True, device=_device(impl)
    )
    s4, sh4 = s[:, :, None, None], sh[:, :, None, None]
    y, mean, rstd = fwd(x, w, b, s, sh, 4, 1e-5, True)
    y4, mean4, rstd4 = fwd(x, w, b, s4, sh4, 4, 1e-5, True)
    torch.testing.assert_close(y4, y, rtol=0, atol=0)
    g = torch.randn_like(y)
    grads = bwd(g, x, w, b, s, sh, mean, rstd, 4, True)
    grads4 = bwd(g, x, w, b, s4, sh4, mean4, rstd4, 4, True)
    assert grads4[3].shape == s4.shape and grads4[4].shape == sh4.shape
    for got, want in zip(grads4, grads, strict=True):
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=0)


STAT_PATHS = ["cpu_op", "fallback", "meta", pytest.param("triton", marks=TRITON_MARKS)]


@pytest.mark.parametrize("path", STAT_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_statistics_dtype_is_the_accumulation_dtype_on_every_path(path, dtype):
    # mean and rstd: float32, float64 for float64 input, on every path; the fake kernel (meta)
    # says the same as the kernels.
    if path == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take no float64")
    dev = {"triton": TRITON_DEVICE, "meta": "meta"}.get(path, "cpu")
    x, w, b, s, sh = _inputs((2, 8, 4, 4), 4, dtype, "contiguous", True, device="cpu")
    args = [t.to(dev) for t in (x, w, b, s, sh)]
    fn = {"cpu_op": OP, "meta": OP, "fallback": groupnorm_silu_fallback,
          "triton": groupnorm_silu_triton}[path]  # fmt: skip
    y, mean, rstd = fn(*args, 4, 1e-5, True)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and mean.dtype == want and rstd.dtype == want
    assert mean.shape == rstd.shape == (2, 4)


@pytest.mark.triton
def test_triton_launcher_device_and_dtype_checks():
    x, w, b, s, sh = _inputs((2, 8, 4, 4), 4, torch.float32, "contiguous", True)
    if TRITON_DEVICE != "cpu":  # without the interpreter, CPU tensors are refused
        with pytest.raises(ValueError, match="take CUDA tensors"):
            groupnorm_silu_triton(x, w, b, s, sh, 4, 1e-5, True)
    if TRITON_DEVICE is not None:
        args = [t.to(TRITON_DEVICE) for t in (x.double(), w.double(), b.double(), s, sh)]
        with pytest.raises(TypeError, match="float64 is served by the CPU kernels only"):
            groupnorm_silu_triton(*args, 4, 1e-5, True)


@requires_cuda
def test_cuda_launch_runs_on_the_tensors_device():
    # The launcher guards the device: a tensor on the last GPU runs there, whichever is current.
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    x, w, b, s, sh = _inputs((2, 64, 8, 8), 32, torch.float32, "contiguous", True, device=dev)
    with torch.cuda.device(0):
        y, mean, rstd = groupnorm_silu_triton(x, w, b, s, sh, 32, 1e-5, True)
    assert y.device == dev and mean.device == dev
    ref = groupnorm_silu_ref(*(t.double() for t in (x, w, b, s, sh)), groups=32)
    assert rel_err(y, ref) < 1e-5
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="is on|one device"):
            groupnorm_silu_triton(x, w.to("cuda:0"), b, s, sh, 32, 1e-5, True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape, groups",
    [((4, 192, 64, 64), 32), ((1, 384, 32, 32), 32), ((64, 576, 16, 16), 32), ((3, 96, 17, 5), 32)],
)
def test_cuda_kernel_matches_float64(dtype, layout, shape, groups):
    x, w, b, s, sh = _inputs(shape, groups, dtype, layout, True)
    x, w, b, s, sh = (t.cuda() for t in (x, w, b, s, sh))
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, s, sh)]
    y = groupnorm_silu(*leaves, groups=groups)
    g = torch.randn_like(y)
    y.backward(g)
    ref, ref_grads = _reference_with_grads(x, w, b, s, sh, groups, True, g)
    assert_close_rule(y, ref, _eager(x, w, b, s, sh, groups), ATOL[dtype])
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    for leaf, want in zip(leaves, ref_grads):
        assert rel_err(leaf.grad, want) < tol


@requires_cuda
def test_cuda_graph_capture_and_compile():
    x, w, b, s, sh = (
        t.cuda() for t in _inputs((8, 64, 16, 16), 32, torch.bfloat16, "channels_last", True)
    )
    y_eager = groupnorm_silu(x, w, b, s, sh)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        groupnorm_silu(x, w, b, s, sh)  # warm-up (Triton compilation) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = groupnorm_silu(x, w, b, s, sh)
    x.copy_(x * 0.5)
    graph.replay()
    torch.testing.assert_close(y_graph, groupnorm_silu(x, w, b, s, sh))
    compiled = torch.compile(lambda *a: groupnorm_silu(*a), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b, s, sh), groupnorm_silu(x, w, b, s, sh))
    assert y_eager.shape == x.shape


# ------------------------------------------------------------------------------------------------
# Forward-mode AD (torch.func.jvp and forward_ad dual tensors): the tangent against the float64
# jvp of the reference, for tangents on every argument.

JVP_MODES = ["func", "dual"]
# (shape, groups): C = 12 and 20 (not multiples of 8), odd spatial sizes, a 3-d input, a group
# too large for one program of the Triton forward.
JVP_CASES = [((2, 12, 5, 7), 4), ((3, 20, 3, 5), 5), ((2, 32, 13), 8), ((1, 8, 70, 70), 2)]


def _tangents(primals, which="all"):
    """Random tangents like the primals (same dtype and layout), None where there is no primal or
    which excludes it ("all", or a set of argument positions)."""
    return [
        torch.randn_like(p) if p is not None and (which == "all" or i in which) else None
        for i, p in enumerate(primals)
    ]


def _jvp_reference(primals, tangents, groups, activation):
    """(tangent in float64, tangent of the reference in the inputs' dtypes): the reference's jvp
    on float64 copies, and on the inputs themselves (the baseline error of the rule)."""
    f = lambda *a: groupnorm_silu_ref(*a, groups=groups, activation=activation)
    # Contiguous copies: torch 2.11's forward-AD rule of F.group_norm fails on channels_last input
    # ("view size is not compatible"); the reference's math does not depend on the layout.
    dense = lambda ts: [t.contiguous() if t is not None else None for t in ts]
    up = lambda ts: [t.double() if t is not None else None for t in dense(ts)]
    _, t64 = forward_ad_jvp(f, up(primals), up(tangents))
    _, tlow = forward_ad_jvp(f, dense(primals), dense(tangents))
    return t64, tlow


def _check_tangent(got, primals, tangents, groups, activation):
    x = primals[0]
    t64, tlow = _jvp_reference(primals, tangents, groups, activation)
    assert got.dtype == x.dtype and got.shape == x.shape
    if x.dtype in (torch.float32, torch.float64):
        assert rel_err(got, t64) <= 1e-5, f"tangent: relative error {rel_err(got, t64):.3g}"
    else:  # fp32 math from the same rounded inputs: only the final rounding differs
        assert_close_rule(got, t64, tlow, JVP_ATOL[x.dtype], name="tangent")
    return rel_err(got, t64)


# The tangents reach ~10 in magnitude; atol one bf16 / fp16 ulp near 1 at most.
JVP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("mode", JVP_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("modulate, activation", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("case", JVP_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-g{c[1]}")
def test_jvp_matches_float64(case, modulate, activation, layout, dtype, mode):
    shape, groups = case
    primals = list(_inputs(shape, groups, dtype, layout, modulate))
    tangents = _tangents(primals)
    fn = lambda *a: groupnorm_silu(*a, groups=groups, activation=activation)
    y, t = forward_ad_jvp(fn, primals, tangents, mode)
    torch.testing.assert_close(y, groupnorm_silu(*primals, groups=groups, activation=activation))
    if layout == "channels_last":
        assert t.is_contiguous(memory_format=torch.channels_last)
    _check_tangent(t, primals, tangents, groups, activation)


@pytest.mark.parametrize("mode", JVP_MODES)
@pytest.mark.parametrize("which", [{0}, {1, 2}, {3}, {4}, {0, 3, 4}], ids=str)
def test_jvp_of_some_arguments(which, mode):
    # Tangents on a subset of the arguments (the others carry none): e.g. only scale / shift, as
    # when the time embedding alone depends on t; half parameters and modulation.
    primals = list(_inputs((2, 12, 5, 7), 4, torch.bfloat16, "contiguous", True, torch.bfloat16))
    tangents = _tangents(primals, which)
    y, t = forward_ad_jvp(lambda *a: groupnorm_silu(*a, groups=4), primals, tangents, mode)
    _check_tangent(t, primals, tangents, 4, True)


def test_jvp_float64_and_broadcastable_modulation():
    primals = [t.double() for t in _inputs((2, 12, 5, 7), 4, torch.float32, "contiguous", True)]
    primals[3], primals[4] = primals[3][:, :, None, None], primals[4][:, :, None, None]
    tangents = _tangents(primals)
    _, t = forward_ad_jvp(lambda *a: groupnorm_silu(*a, groups=4), primals, tangents)
    assert t.dtype == torch.float64
    t64, _ = _jvp_reference(primals, tangents, 4, True)
    assert rel_err(t, t64) <= 1e-12


def test_jvp_of_the_formerly_silent_case():
    # Before forward-mode AD was routed, this returned an all-zero tangent without a word.
    x = torch.randn(2, 64, 5, 5)
    w, b, s, sh = torch.randn(64), torch.randn(64), torch.randn(2, 64), torch.randn(2, 64)
    tx = torch.randn_like(x)
    _, t = torch.func.jvp(lambda x: groupnorm_silu(x, w, b, s, sh, groups=32), (x,), (tx,))
    f64 = lambda x: groupnorm_silu_ref(x, w.double(), b.double(), s.double(), sh.double())
    _, want = torch.func.jvp(f64, (x.double(),), (tx.double(),))
    assert t.abs().max() > 0 and rel_err(t, want) <= 1e-5
    with torch.autograd.forward_ad.dual_level():
        y = groupnorm_silu(torch.autograd.forward_ad.make_dual(x, tx), w, b, s, sh, groups=32)
        dual = torch.autograd.forward_ad.unpack_dual(y).tangent
    assert dual is not None and rel_err(dual, want) <= 1e-5


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_jvp_from_every_implementations_statistics(impl, dtype):
    # The tangent reuses the forward's mean / rstd: from the C++ kernel, the fallback and the
    # Triton launcher (on the GPU, or CPU tensors under the interpreter) alike.
    from cmkernels.ops.groupnorm_silu import groupnorm_silu_tangent_ref

    fwd, _ = IMPLS[impl]
    shape, groups = (2, 20, 9, 5), 5
    primals = list(_inputs(shape, groups, dtype, "channels_last", True, device=_device(impl)))
    tangents = _tangents(primals)
    _, mean, rstd = fwd(*primals, groups, 1e-5, True)
    t = groupnorm_silu_tangent_ref(*primals, mean, rstd, groups, True, *tangents)
    cpu = lambda ts: [x.cpu() if x is not None else None for x in ts]
    _check_tangent(t.cpu(), cpu(primals), cpu(tangents), groups, True)


def test_jvp_composes_with_reverse_mode_and_vmap():
    primals = list(_inputs((2, 12, 5, 7), 4, torch.float32, "contiguous", True))
    tangents = _tangents(primals)
    fn = lambda *a: groupnorm_silu(*a, groups=4)
    # A dual tensor that also requires grad: the gradient is the fused backward's.
    x = primals[0].clone().requires_grad_(True)
    with torch.autograd.forward_ad.dual_level():
        y = fn(torch.autograd.forward_ad.make_dual(x, tangents[0]), *primals[1:])
        (gx,) = torch.autograd.grad(y.square().sum(), x)
    x64 = primals[0].double().requires_grad_(True)
    y64 = groupnorm_silu_ref(x64, *(p.double() for p in primals[1:]), groups=4)
    (want,) = torch.autograd.grad(y64.square().sum(), x64)
    assert rel_err(gx, want) <= 1e-4
    # vmap over jvp (the Function's generated vmap rule).
    xs, txs = torch.randn(3, *primals[0].shape), torch.randn(3, *primals[0].shape)
    per = lambda f: (
        lambda x, tx: torch.func.jvp(lambda x: f(x, *primals[1:], groups=4), (x,), (tx,))[1]
    )
    got = torch.func.vmap(per(groupnorm_silu))(xs, txs)
    ref = torch.func.vmap(per(groupnorm_silu_ref))(xs, txs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_jvp_under_torch_compile_is_right_or_refused():
    x, *rest = _inputs((2, 12, 5, 7), 4, torch.float32, "contiguous", True)
    tx = torch.randn_like(x)
    fn = lambda x: groupnorm_silu(x, *rest, groups=4)

    def broken(x, tx):  # two functions: dynamo caches compiled code per code object
        return torch.func.jvp(fn, (x,), (tx,))[1]

    def full(x, tx):
        return torch.func.jvp(fn, (x,), (tx,))[1]

    ref = broken(x, tx)
    # A graph break: the tangent is computed eagerly, right.
    torch.testing.assert_close(torch.compile(broken, backend="aot_eager")(x, tx), ref)
    # fullgraph=True cannot break the graph: an error naming the reason, not a zero tangent.
    with pytest.raises(Exception, match="forward-mode AD through the fused ops runs eagerly"):
        torch.compile(full, backend="aot_eager", fullgraph=True)(x, tx)
