"""cmkernels: fused kernels, a trainer and a sampler for consistency models.

The package itself imports nothing heavy: `ops`, `build_info` and `HAS_EXTENSION` load torch, the
Triton kernels and the compiled extension on first access (PEP 562), so that tools such as
`python -m cmkernels.bench_report` run without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["HAS_EXTENSION", "build_info", "ops", "__version__"]

# Lazy attribute -> the module that holds it (None: the attribute is that module itself).
_LAZY = {"ops": ("cmkernels.ops", None),
         "build_info": ("cmkernels._extension", "build_info"),
         "HAS_EXTENSION": ("cmkernels._extension", "HAS_EXTENSION")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cmkernels' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
