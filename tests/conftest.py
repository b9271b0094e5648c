"""Test set-up: without a GPU, Triton kernels run on CPU tensors under the interpreter, which
must be switched on before triton is first imported.

Markers (select with -m): ``gpu`` for tests that need a CUDA device (skipped without one),
``triton`` for tests that run a Triton launcher directly (on the GPU where there is one, else on
CPU tensors under the interpreter). ``-m "gpu or triton"`` is every test of the GPU kernels.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cmkernels.ops._triton import HAS_TRITON, INTERPRET  # noqa: E402

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


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs per test, reproducible per test.
    torch.manual_seed(1234)
