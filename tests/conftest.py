"""Test set-up: without a GPU, Triton kernels run on CPU tensors under the interpreter, which
must be switched on before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    # Fresh random inputs per test, reproducible per test.
    torch.manual_seed(1234)
