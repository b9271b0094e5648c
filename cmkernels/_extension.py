"""Loading of the compiled extension ``cmkernels._C``.

The extension holds the operator schemas (``TORCH_LIBRARY(cmkernels, ...)``), the CPU kernels and
the CUDA kernels. When it is missing (a source checkout that was never built, a failed build),
``import cmkernels`` still works: the operators are then declared from Python with the same
schemas, their CPU kernels are the pure-PyTorch references and the Triton kernels still serve CUDA
tensors. A single warning says so.
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from cmkernels import _C  # type: ignore[attr-defined]

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "cmkernels: the compiled extension cmkernels._C could not be imported "
        f"({EXTENSION_ERROR}). The C++/CUDA kernels are unavailable; CPU tensors use the "
        "pure-PyTorch reference kernels and CUDA tensors the Triton kernels only. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_EXTENSION = _C is not None


def build_info() -> dict:
    """How the extension was built: CUDA compiled or not, CUDA version, architectures, torch,
    OpenMP, and whether the CPU kernels run their AVX2 variants on this machine."""
    if _C is None:
        return {
            "extension": False,
            "error": EXTENSION_ERROR,
            "cuda_compiled": False,
            "torch_runtime": torch.__version__,
        }
    info = dict(_C.build_info())
    info["extension"] = True
    info["torch_runtime"] = torch.__version__
    return info
