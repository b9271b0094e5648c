"""Fused operators. Each module holds the kernels, the launcher, the torch.library registration and
the pure-PyTorch reference ``<op>_ref`` of one op."""

from cmkernels.ops.attention import (
    attention,
    attention_bhtd,
    attention_bhtd_ref,
    attention_ref,
)
from cmkernels.ops.groupnorm_silu import groupnorm_silu, groupnorm_silu_ref

__all__ = [
    "groupnorm_silu",
    "groupnorm_silu_ref",
    "attention",
    "attention_ref",
    "attention_bhtd",
    "attention_bhtd_ref",
]
