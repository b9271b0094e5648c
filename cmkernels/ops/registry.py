"""Operator declaration shared by every fused op: ``define_op`` and ``schema_of``.

The schemas are declared once, in C++ (``csrc/ops.cpp``, ``TORCH_LIBRARY(cmkernels, m)``). Each op
module also states its schema in Python so that, when the compiled extension is missing, the op
can be declared from Python with the *same* schema and served by its pure-PyTorch reference; a
test checks that both texts agree, so they cannot drift.
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
    fallback: Callable | None = None,
    fallback_devices: Iterable[str] = ("cpu",),
    kernels: dict[str, Callable] | None = None,
):
    """Return ``torch.ops.cmkernels.<name>.default``, declaring it when the extension is absent.

    name:             the op's name in the ``cmkernels`` namespace.
    schema:           its schema without the name, e.g. ``"(Tensor x) -> Tensor"``.
    fallback:         implementation used when the compiled kernels are missing.
    fallback_devices: device types the fallback serves in that case.
    kernels:          Python kernels registered in every case ({device type: function}), for
                      devices the compiled extension does not serve (e.g. the Triton launchers).

    Each (op, device type) gets exactly one Python kernel: torch 2.11 refuses a second
    registration of the same pair, so a device may not appear both in ``kernels`` and among the
    fallback devices that are used.
    """
    kernels = dict(kernels or {})
    use_fallback = fallback is not None and not (HAS_EXTENSION and _op_exists(name))
    if not _op_exists(name):
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        lib.define(name + schema)
        _LIBRARIES.append(lib)
    if use_fallback:
        for device in fallback_devices:
            if device in kernels:
                raise ValueError(f"{name}: {device} has both a kernel and a fallback")
            kernels[device] = fallback
    for device, fn in kernels.items():
        torch.library.register_kernel(f"{NAMESPACE}::{name}", device, fn)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def schema_of(name: str) -> str:
    """The registered schema of ``cmkernels::<name>`` as text (for the drift test)."""
    return str(getattr(getattr(torch.ops, NAMESPACE), name).default._schema)
