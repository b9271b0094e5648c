"""Operator declaration shared by every fused op.

The schemas are declared once, in C++ (``csrc/ops.cpp``, ``TORCH_LIBRARY(cmkernels, m)``). Each op
module also states its schema here so that, when the compiled extension is missing, the op can be
declared from Python with the *same* schema and served by its pure-PyTorch reference; a test checks
that both texts agree, so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from cmkernels._extension import HAS_EXTENSION

NAMESPACE = "cmkernels"

# Keeps the Python-side Library objects alive (a dropped Library deregisters its ops).
_LIBRARIES: list[torch.library.Library] = []


def _op_exists(name: str) -> bool:
    return hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), name)


def define_op(
    name: str,
    schema: str,
    fallback: Callable,
    fallback_devices: Iterable[str] = ("cpu",),
):
    """Return ``torch.ops.cmkernels.<name>.default``, declaring it when the extension is absent.

    name:             the op's name in the ``cmkernels`` namespace.
    schema:           its schema without the name, e.g. ``"(Tensor x) -> Tensor"``.
    fallback:         implementation used when the compiled kernels are missing.
    fallback_devices: device types the fallback serves in that case.
    """
    if not (HAS_EXTENSION and _op_exists(name)):
        if not _op_exists(name):
            lib = torch.library.Library(NAMESPACE, "FRAGMENT")
            lib.define(name + schema)
            _LIBRARIES.append(lib)
        for device in fallback_devices:
            torch.library.register_kernel(f"{NAMESPACE}::{name}", device, fallback)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def schema_of(name: str) -> str:
    """The registered schema of ``cmkernels::<name>`` as text (for the drift test)."""
    return str(getattr(getattr(torch.ops, NAMESPACE), name).default._schema)
