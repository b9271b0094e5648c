"""ema_update_ and the EMA helper: the C++ CPU kernel, the no-extension fallback and (on a GPU)
the CUDA multi-tensor kernel against the float64 reference.

Non-contiguous inputs: every EMA copy must be dense (contiguous or a permutation such as
channels_last: used in place); a parameter laid out differently from its copies is copied to their
layout first (tested with channels_last and strided parameters); a non-dense copy is an error."""

import copy
import io

import pytest
import torch
from _tolerance import assert_close_rule
from conftest import assert_same_error, raised, requires_cuda, run_without_extension
from torch import nn

import cmkernels
from cmkernels.ops import EMA, ema_update_, ema_update_ref_
from cmkernels.ops.ema import SCHEMA, check_inputs, ema_update_fallback_
from cmkernels.ops.registry import schema_of

OP = torch.ops.cmkernels.ema_update_.default
IMPLS = {"kernel": OP, "fallback": ema_update_fallback_}
RATES = {
    1: [0.9],
    3: [0.999, 0.9, 0.5],
    5: [0.99, 0.0, 1.0, 0.7, 0.25],
    8: [i / 8 for i in range(8)],
}

# Odd sizes, an empty tensor, one above the CPU kernel's grain (several threads share it).
SHAPES = [(7,), (3, 5, 1, 1), (97,), (0, 4), (33, 31), (40000,)]


def _params(dtypes, shapes=SHAPES, device="cpu"):
    return [
        (torch.randn(s, device=device) * 2 + 0.5).to(dtypes[i % len(dtypes)])
        for i, s in enumerate(shapes)
    ]


def _copies(params, K):
    return [[torch.randn(p.shape, device=p.device) for p in params] for _ in range(K)]


def _flat(emas):
    return [e for copies in emas for e in copies]


def _check_steps(update, params, emas, rates, steps=3):
    """Runs `steps` updates and compares each copy with the float64 reference, and with plain
    PyTorch in fp32 (the tolerance rule)."""
    ref64 = [[e.double() for e in copies] for copies in emas]
    eager = copy.deepcopy(emas)
    for _ in range(steps):
        update(params, emas, rates)
        ema_update_ref_([p.double() for p in params], ref64, rates)
        ema_update_ref_(params, eager, rates)
    for k in range(len(rates)):
        for i, (got, want, plain) in enumerate(zip(emas[k], ref64[k], eager[k])):
            assert got.dtype == torch.float32 and got.shape == params[i].shape
            if got.numel() == 0:
                continue
            assert_close_rule(
                got, want, plain, 1e-7 * (1 + want.abs().max().item()), f"copy {k} of {i}"
            )


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("K", list(RATES))
@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32],
        [torch.bfloat16],
        [torch.float16],
        [torch.float32, torch.bfloat16, torch.float16],
    ],
    ids=["fp32", "bf16", "fp16", "mixed"],
)
def test_matches_float64(impl, K, dtypes):
    params = _params(dtypes)
    emas = _copies(params, K)
    op = IMPLS[impl]
    _check_steps(lambda p, e, r: op(p, _flat(e), r), params, emas, RATES[K])


def test_rates_zero_and_one_are_exact():
    params = _params([torch.float32, torch.bfloat16])
    emas = _copies(params, 2)
    keep = [e.clone() for e in emas[1]]
    ema_update_(params, emas, [0.0, 1.0])
    for p, e0, e1, k in zip(params, emas[0], emas[1], keep):
        assert torch.equal(e0, p.float()) and torch.equal(e1, k)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_layouts(impl):
    # channels_last copies of channels_last params: used in place; params in another layout than
    # their copies (channels_last, a strided view): copied first; results as the reference.
    w = torch.randn(4, 6, 3, 3)
    params = [
        w.contiguous(memory_format=torch.channels_last),
        w.contiguous(memory_format=torch.channels_last),
        torch.randn(6, 10)[:, ::2],
        torch.randn(7, 5),
        torch.randn(5, 7).t(),
    ]
    emas = [
        [
            torch.randn_like(params[0]),  # channels_last like its parameter
            torch.randn(4, 6, 3, 3),  # contiguous: the parameter is copied to it
            torch.randn(6, 5),
            torch.randn(5, 7).t(),  # transposed: its contiguous parameter is copied to that
            torch.randn(5, 7).t(),  # transposed like its parameter
        ]
        for _ in range(3)
    ]
    assert emas[0][0].is_contiguous(memory_format=torch.channels_last)
    _check_steps(lambda p, e, r: IMPLS[impl](p, _flat(e), r), params, emas, RATES[3])


def test_opcheck():
    params = _params([torch.float32, torch.bfloat16], shapes=[(5, 3), (17,), (2, 3, 4, 4)])
    emas = _copies(params, 3)
    torch.library.opcheck(OP, (params, _flat(emas), RATES[3]))


def test_torch_compile_fullgraph():
    # Inside a compiled train-step-like function: a parameter update, then the EMA, one graph.
    params = _params([torch.float32], shapes=[(8, 3), (5,), (2, 3, 3, 3)])
    emas = _copies(params, 3)
    ref_params = [p.clone() for p in params]
    ref_emas = copy.deepcopy(emas)

    def step(params, emas, lr):
        with torch.no_grad():
            for p in params:
                p.mul_(1 - lr)
        ema_update_(params, emas, RATES[3])

    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        compiled(params, emas, 0.1)
        step(ref_params, ref_emas, 0.1)
    for got, want in zip(_flat(emas), _flat(ref_emas)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_schema_declared_once_and_matches_python():
    assert schema_of("ema_update_") == "cmkernels::ema_update_" + SCHEMA


def test_fallback_without_extension():
    run_without_extension("""
        import copy, torch
        from cmkernels.ops import ema_update_, ema_update_ref_
        params = [torch.randn(5, 3), torch.randn(7).bfloat16()]
        emas = [[torch.randn(p.shape) for p in params] for _ in range(2)]
        want = copy.deepcopy(emas)
        ema_update_(params, emas, [0.9, 0.5])
        ema_update_ref_(params, want, [0.9, 0.5])
        assert all(torch.equal(a, b) for ka, kb in zip(emas, want) for a, b in zip(ka, kb))
        print("ok")
    """)


def _bad(kind):
    params = _params([torch.float32], shapes=[(4, 3), (5,)])
    emas = _copies(params, 2)
    rates = [0.9, 0.99]
    if kind == "length":
        emas = [emas[0], emas[1][:1]]
    elif kind == "flat_length":
        return params, _flat(emas)[:-1], rates, ValueError, r"expected 2 x 2 = 4 EMA tensors"
    elif kind == "shape":
        emas[1][0] = torch.randn(3, 4)
    elif kind == "ema_dtype":
        emas[0][1] = emas[0][1].bfloat16()
    elif kind == "param_dtype":
        params[1] = params[1].double()
    elif kind == "rate_high":
        rates = [0.9, 1.5]
    elif kind == "rate_low":
        rates = [-0.1, 0.9]
    elif kind == "rate_nan":
        rates = [float("nan"), 0.9]
    elif kind == "too_many_rates":
        rates = [0.5] * 9
        emas = _copies(params, 9)
    elif kind == "no_rates":
        rates, emas = [], []
    elif kind == "device":
        emas[1][1] = emas[1][1].to("meta")
    elif kind == "not_dense":
        emas[0][0] = torch.randn(4, 6)[:, ::2]
    elif kind == "strides_differ":
        emas[1][0] = torch.randn(3, 4).t()  # dense, but laid out unlike copy 0
    errors = {
        "length": (ValueError, "emas\\[1\\] has 1 tensors for 2 params"),
        "shape": (ValueError, r"copy 1 of params\[0\] has shape"),
        "ema_dtype": (TypeError, "EMA copies must be float32"),
        "param_dtype": (TypeError, r"params\[1\] must be float32, bfloat16 or float16"),
        "rate_high": (ValueError, r"rates must lie in \[0, 1\]"),
        "rate_low": (ValueError, r"rates must lie in \[0, 1\]"),
        "rate_nan": (ValueError, r"rates must lie in \[0, 1\]"),
        "too_many_rates": (ValueError, "at most 8 rates"),
        "no_rates": (ValueError, "rates must not be empty"),
        "device": (ValueError, "is on meta"),
        "not_dense": (ValueError, "must be a dense tensor"),
        "strides_differ": (ValueError, "must share one memory layout"),
    }
    return (params, emas, rates) + errors[kind]


BAD = ["length", "flat_length", "shape", "ema_dtype", "param_dtype", "rate_high", "rate_low",
       "rate_nan", "too_many_rates", "no_rates", "device", "not_dense",
       "strides_differ"]  # fmt: skip
# The public entry point takes per-rate lists (a short one is "length"), the op the flat list
# ("flat_length").
CASES = (
    [("public", k) for k in BAD if k != "flat_length"]
    + [("kernel", k) for k in BAD if k != "length"]
    + [("fallback", k) for k in BAD if k != "length"]
)


@pytest.mark.parametrize("entry, kind", CASES)
def test_bad_input_raises_clear_error(entry, kind):
    params, emas, rates, error, match = _bad(kind)
    if entry == "public":
        fn = lambda: ema_update_(params, emas, rates)
    else:
        flat = emas if kind == "flat_length" else _flat(emas)
        fn = lambda: IMPLS[entry](params, flat, rates)
    with pytest.raises(error, match=match):
        fn()


@pytest.mark.parametrize("kind", [k for k in BAD if k != "length"])
@pytest.mark.parametrize("path", ["public", "kernel", "fallback", "meta"])
def test_every_path_raises_the_same_error(path, kind):
    # The op's checks (check_inputs), the C++ kernel (the registered op on CPU tensors), the
    # fallback, the public function and the fake kernel (the op on meta tensors) raise one error,
    # type and text, for the same bad input.
    if path == "kernel" and not cmkernels.HAS_EXTENSION:
        pytest.skip("needs the compiled extension")
    if path == "meta" and kind == "device":
        pytest.skip("on meta every tensor is on one device")
    if path == "public" and kind == "flat_length":
        pytest.skip("the public function takes one list per rate")
    params, emas, rates, error, _ = _bad(kind)
    flat = emas if kind == "flat_length" else _flat(emas)
    if path == "meta":
        # empty_strided: .to("meta") would give a non-dense copy dense strides
        meta = lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        params, flat = [meta(p) for p in params], [meta(e) for e in flat]
        emas = [flat[k * len(params) : (k + 1) * len(params)] for k in range(len(emas))]
    want = raised(lambda: check_inputs(params, flat, rates))
    assert want[0] is error
    if path == "public":
        assert_same_error(want, lambda: ema_update_(params, emas, rates))
    else:
        fn = ema_update_fallback_ if path == "fallback" else OP
        assert_same_error(want, lambda: fn(params, flat, rates))


# ------------------------------------------------------------------------------------------------
# The EMA helper.


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.lin = nn.Linear(8, 5)
        self.register_buffer("steps", torch.zeros(()))


def test_ema_helper_update_copy_and_state_dict():
    torch.manual_seed(0)
    model = _Net()
    ema = EMA(model, rates=[0.9, 0.5])
    assert ema.names == [n for n, _ in model.named_parameters()]
    assert all(e.dtype == torch.float32 for e in _flat(ema.copies))
    # The copies keep the parameters' layout (no per-call layout copy in the kernel).
    assert ema.copies[0][0].is_contiguous(memory_format=torch.channels_last)
    ref = [[p.detach().double().clone() for p in model.parameters()] for _ in range(2)]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        ema_update_ref_([p.double() for p in model.parameters()], ref, [0.9, 0.5])
    for got, want in zip(_flat(ema.copies), _flat(ref)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)

    # Warm-up rates for one call, without changing the EMA's own.
    before = [e.clone() for e in ema.copies[1]]
    ema.update(rates=[0.0, 1.0])
    assert all(torch.equal(e, p.float()) for e, p in zip(ema.copies[0], model.parameters()))
    assert all(torch.equal(e, b) for e, b in zip(ema.copies[1], before))
    assert ema.rates == [0.9, 0.5]

    # state_dict round trip through torch.save / torch.load(weights_only=True).
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMA(_Net(), rates=[0.9, 0.5])
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(_flat(other.copies), _flat(ema.copies)))
    with pytest.raises(ValueError, match="rates"):
        EMA(_Net(), rates=[0.9]).load_state_dict(ema.state_dict())

    # The k-th average into a model: by name, or as a state_dict.
    target = _Net()
    ema.copy_to(target, 1)
    assert all(torch.equal(p, e) for p, e in zip(target.parameters(), ema.copies[1]))
    target2 = _Net()
    missing, unexpected = target2.load_state_dict(ema.averaged_state_dict(1), strict=False)
    assert missing == ["steps"] and not unexpected
    assert all(torch.equal(p, e) for p, e in zip(target2.parameters(), ema.copies[1]))


def test_ema_helper_bf16_params_and_param_list():
    params = [torch.randn(6, 4, dtype=torch.bfloat16), torch.randn(3, dtype=torch.bfloat16)]
    ema = EMA(params, rates=[0.99])
    assert ema.names == ["0", "1"]
    start = params[0].float()
    params[0].add_(1.0)
    ema.update()
    want = 0.99 * start + 0.01 * params[0].float()
    torch.testing.assert_close(ema.copies[0][0], want, rtol=1e-6, atol=1e-6)
    out = [torch.empty_like(p) for p in params]
    ema.copy_to(out, 0)
    assert out[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"rates must lie in \[0, 1\]"):
        EMA(params, rates=[1.1])


# ------------------------------------------------------------------------------------------------
# GPU.


def _many_cuda_params():
    """~300 tensors: many small ones, sizes that are no multiple of 4, chunk-crossing ones,
    misaligned views (the scalar path), mixed dtypes."""
    shapes = [(i % 13 + 1, 3) for i in range(200)] + [(97,), (1025,), (16384,), (16385,), (100003,)]
    shapes += [(64, 64, 3, 3)] * 20 + [(0,)]
    params = _params([torch.float32, torch.bfloat16, torch.float16], shapes, device="cuda")
    # Storage offsets that break 16-byte alignment (the scalar path): fp32 and bf16 views.
    params.append(torch.randn(4001, device="cuda")[1:])
    params.append(torch.randn(1003, device="cuda").bfloat16()[3:])
    return params


@requires_cuda
@pytest.mark.parametrize("K", [1, 3, 8])
def test_cuda_kernel_matches_float64(K):
    params = _many_cuda_params()
    emas = _copies(params, K)
    emas[-1][-2] = torch.randn(4001, device="cuda")[1:]  # a dense but misaligned copy
    _check_steps(lambda p, e, r: ema_update_(p, e, r), params, emas, RATES[K])
    # CPU and CUDA kernels agree.
    cpu_emas = [[e.cpu() for e in copies] for copies in emas]
    ema_update_(params, emas, RATES[K])
    ema_update_([p.cpu() for p in params], cpu_emas, RATES[K])
    for a, b in zip(_flat(emas), _flat(cpu_emas)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)


def _replay_and_check(graph, params, emas, ref, step):
    """Three replays of a captured ema_update_ at RATES[3], the parameters moved by `step` before
    each; then the copies against the reference applied as many times."""
    for _ in range(3):
        for p in params:
            p.add_(step)
        graph.replay()
        ema_update_ref_(params, ref, RATES[3])
    torch.cuda.synchronize()
    for a, b in zip(_flat(emas), _flat(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_cuda_table_cache_and_graph_capture():
    params = _many_cuda_params()
    emas = _copies(params, 3)
    ref = copy.deepcopy(emas)
    # Same tensors twice (cached table), then other tensors (a new table), then back.
    other_params = _params([torch.float32], [(33,), (4, 4)], device="cuda")
    other_emas = _copies(other_params, 3)
    other_ref = copy.deepcopy(other_emas)
    for p, e, r in [(params, emas, ref), (params, emas, ref), (other_params, other_emas, other_ref),
                    (params, emas, ref)]:  # fmt: skip
        ema_update_(p, e, RATES[3])
        ema_update_ref_(p, r, RATES[3])
    for a, b in zip(_flat(emas) + _flat(other_emas), _flat(ref) + _flat(other_ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    # CUDA graph: captured once, replayed after the parameters change; then an eager call with
    # other tensors must not disturb the captured table.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ema_update_(params, emas, RATES[3])
        ema_update_ref_(params, ref, RATES[3])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(params, emas, RATES[3])
    ema_update_(other_params, other_emas, RATES[3])
    _replay_and_check(graph, params, emas, ref, step=1.0)
    torch.library.opcheck(OP, (params[:20], _flat([c[:20] for c in emas]), RATES[3]))


@requires_cuda
def test_cuda_graph_capture_of_a_table_never_seen():
    # A capture whose tensors miss the table cache uploads the table inside the capture (no
    # warm-up call): the copy becomes part of the graph and every replay is right.
    params = _params([torch.float32, torch.bfloat16], [(37,), (5, 7), (1000,)], device="cuda")
    emas = _copies(params, 3)
    ref = copy.deepcopy(emas)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema_update_(params, emas, RATES[3])
    _replay_and_check(graph, params, emas, ref, step=0.5)
