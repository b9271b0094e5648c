"""Fused operators: the public API of the package's ops.

One op per module or package: ``attention/`` and ``groupnorm_silu/`` (packages, one file per job:
reference, checks, Triton kernels, launch, CPU path, registration in ``__init__``),
``heun_step.py`` and ``ema.py`` (single modules, their kernels are C++/CUDA). Shared by all:
``registry.py`` (op declaration), ``triton_support.py`` (Triton availability, interpreter, launch
checks), ``common.py`` (accumulation dtype, layout rule, message formatting)."""

from cmkernels.ops.attention import (
    attention,
    attention_bhtd,
    attention_bhtd_ref,
    attention_bhtd_with_tangent,
    attention_ref,
    attention_with_tangent,
)
from cmkernels.ops.ema import EMA, ema_update_, ema_update_ref_
from cmkernels.ops.groupnorm_silu import (
    groupnorm_silu,
    groupnorm_silu_ref,
    groupnorm_silu_with_tangent,
)
from cmkernels.ops.heun_step import heun_step1, heun_step1_ref, heun_step2, heun_step2_ref

__all__ = [
    "groupnorm_silu",
    "groupnorm_silu_ref",
    "groupnorm_silu_with_tangent",
    "attention",
    "attention_ref",
    "attention_bhtd",
    "attention_bhtd_ref",
    "attention_with_tangent",
    "attention_bhtd_with_tangent",
    "heun_step1",
    "heun_step2",
    "heun_step1_ref",
    "heun_step2_ref",
    "ema_update_",
    "ema_update_ref_",
    "EMA",
]
