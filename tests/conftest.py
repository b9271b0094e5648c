"""Test set-up: without a GPU, Triton kernels run on CPU tensors under the interpreter, which
must be switched on before triton is first imported.

Markers (select with -m): ``gpu`` for tests that need a CUDA device (skipped without one),
``triton`` for tests that run a Triton launcher directly (on the GPU where there is one, else on
CPU tensors under the interpreter). ``-m "gpu or triton"`` is every test of the GPU kernels.
"""

import os
import subprocess
import sys
import textwrap

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The GPU tests hold float32 results to float32 rounding against float64 references; cuDNN's
    # default TF32 convolutions (10-bit mantissa) would miss that by orders of magnitude.
    torch.backends.cudnn.allow_tf32 = False

import pytest  # noqa: E402

from cmkernels.ops.triton_support import HAS_TRITON, INTERPRET  # noqa: E402

# Where the Triton launchers run: the GPU, or CPU tensors under the interpreter (None: nowhere).
TRITON_DEVICE = "cuda" if CUDA and HAS_TRITON else ("cpu" if INTERPRET else None)


def requires_cuda(test):
    """A GPU test: marked ``gpu`` and skipped without a CUDA device."""
    test = pytest.mark.gpu(test)
    return pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test)


# Marks of a test of a Triton launcher (runs on TRITON_DEVICE); usable in pytest.param(marks=...).
TRITON_MARKS = [
    pytest.mark.triton,
    pytest.mark.skipif(
        TRITON_DEVICE is None,
        reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before triton is imported",
    ),
]


def needs_triton(test):
    """Decorator form of TRITON_MARKS."""
    for mark in TRITON_MARKS:
        test = mark(test)
    return test


def raised(fn) -> tuple[type, str]:
    """(type, message) of the exception fn() raises; fails the test where it raises none."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to catch whatever it raises
        return type(exc), str(exc)
    pytest.fail("expected an exception, none was raised")


def assert_same_error(expected: tuple[type, str], fn) -> None:
    """fn() raises exactly the expected (type, message): what every path of an op must do for the
    same bad input (the Python checks, the fake kernel, the C++ kernel, the Triton launcher)."""
    got = raised(fn)
    assert got == expected, f"raised {got[0].__name__}: {got[1]!r}, expected {expected[1]!r}"


def run_without_extension(code: str) -> None:
    """Runs code in a fresh interpreter in which cmkernels._C cannot be imported, so that the ops
    are declared from Python and served by their fallbacks; the code must print "ok"."""
    prelude = textwrap.dedent("""
        import sys, warnings
        sys.modules["cmkernels._C"] = None
        with warnings.catch_warnings(record=True):
            import cmkernels
        assert not cmkernels.HAS_EXTENSION
    """)
    run = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs per test, reproducible per test.
    torch.manual_seed(1234)


def forward_ad_jvp(fn, primals, tangents, mode="func"):
    """(output, tangent) of fn(*primals) along tangents (None: that argument carries none), by
    torch.func.jvp (mode "func") or by torch.autograd.forward_ad dual tensors (mode "dual")."""
    active = [i for i, t in enumerate(tangents) if t is not None]

    def f(*xs):
        args = list(primals)
        for i, x in zip(active, xs, strict=True):
            args[i] = x
        return fn(*args)

    if mode == "func":
        xs, ts = (tuple(seq[i] for i in active) for seq in (primals, tangents))
        return torch.func.jvp(f, xs, ts)
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():
        out = fwad.unpack_dual(f(*(fwad.make_dual(primals[i], tangents[i]) for i in active)))
        assert out.tangent is not None, "the output carries no tangent"
        return out.primal, out.tangent
