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


def register_batch_folding_vmap(
    name: str, batch_args: Iterable[int], instance_args: Iterable[int] = ()
) -> None:
    """A vmap rule for ``cmkernels::<name>`` that folds the vmapped dimension into the op's own
    batch dimension: one kernel call for all instances, instead of PyTorch's fallback of one call
    per instance.

    batch_args:    positions of the tensor arguments that lead with the op's batch dimension
                   (and so do all its outputs); an unbatched one is broadcast to every instance.
    instance_args: positions of tensors shared by the whole batch (GroupNorm's weight, bias).
                   Where one of them is vmapped the instances differ in it, no fold applies, and
                   the rule calls the op once per instance.
    """
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    batch_args, instance_args = tuple(batch_args), tuple(instance_args)

    def rule(info, in_dims, *args):
        V = info.batch_size
        if any(in_dims[i] is not None for i in instance_args):
            outs = [
                op(*(a if d is None else a.select(d, j) for a, d in zip(args, in_dims)))
                for j in range(V)
            ]
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        folded, B = list(args), None
        for i in batch_args:
            a, d = args[i], in_dims[i]
            if a is None:
                continue
            a = a.movedim(d, 0) if d is not None else a.expand(V, *a.shape)
            B = a.shape[1]
            folded[i] = a.reshape(V * B, *a.shape[2:])
        outs = op(*folded)
        return tuple(o.unflatten(0, (V, B)) for o in outs), (0,) * len(outs)

    torch.library.register_vmap(f"{NAMESPACE}::{name}", rule)
