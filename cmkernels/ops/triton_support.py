"""What every Triton launcher of the package shares: whether triton is importable (``HAS_TRITON``),
whether its kernels are interpreted (``INTERPRET``: ``TRITON_INTERPRET=1`` set before triton was
imported, CPU tensors then), ``next_pow2`` for block sizes, the device and dtype check of a launch
(``check_launch``), the device guard (``device_guard``), and one interpreter fix for triton 3.6.

The interpreter fix: triton < 3.7 stores a scalar kernel argument as a one-element NumPy array
and converts it to a Python int with ``int(array)``, which NumPy >= 2.3 refuses for arrays of
rank 1; a loop such as ``for i in range(0, T, BLOCK)`` then fails with "only 0-dimensional arrays
can be converted to Python scalars". Triton 3.8 reads the element instead. Under the interpreter
of an older triton we install the same conversion (the interpreter patches ``tl.tensor`` for the
duration of each interpreted launch; we add one attribute to that patch). Compiled kernels, and
everything on a GPU, are untouched.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None
    tl = None
    HAS_TRITON = False


def _interpreting() -> bool:
    if not HAS_TRITON:
        return False

    @triton.jit
    def _probe():
        pass

    return not isinstance(_probe, triton.runtime.JITFunction)


INTERPRET = _interpreting()


def _version() -> tuple[int, ...]:
    parts = []
    for piece in triton.__version__.split("+")[0].split(".")[:2]:
        parts.append(int("".join(ch for ch in piece if ch.isdigit()) or 0))
    return tuple(parts)


def _patch_interpreter_index() -> None:
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_cmkernels_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._cmkernels_index_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRET and _version() < (3, 7):
    _patch_interpreter_index()


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << max(0, (v - 1).bit_length())


def check_launch(op: str, x: Tensor, dtypes: tuple[torch.dtype, ...], *others: Tensor) -> None:
    """The checks of a Triton launch: triton present, x on CUDA (or on the CPU under the
    interpreter), x's dtype among ``dtypes``, and every other tensor on x's device."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not installed")
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        raise ValueError(
            f"{op}: the Triton kernels take CUDA tensors (CPU tensors only under "
            f"TRITON_INTERPRET=1, set before triton is imported), got a tensor on {x.device}"
        )
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        hint = " (float64 is served by the CPU kernels only)" if x.dtype == torch.float64 else ""
        raise TypeError(f"{op}: the Triton kernels take {names}, got {x.dtype}{hint}")
    for t in others:
        if t is not None and t.device != x.device:
            raise ValueError(
                f"{op}: all tensors must be on one device; got {t.device} and {x.device}"
            )


def device_guard(x: Tensor):
    """Launch on x's device, whichever device is current (a cuda:1 tensor runs on cuda:1)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
