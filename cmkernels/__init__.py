"""cmkernels: fused kernels, a trainer and a sampler for consistency models."""

from cmkernels import ops
from cmkernels._extension import HAS_EXTENSION, build_info

__version__ = "0.1.0"

__all__ = ["HAS_EXTENSION", "build_info", "ops", "__version__"]
