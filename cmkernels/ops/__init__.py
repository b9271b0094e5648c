"""Fused operators. Each module holds the kernels, the launcher, the torch.library registration and
the pure-PyTorch reference ``<op>_ref`` of one op."""

from cmkernels.ops.attention import (
    attention,
    attention_bhtd,
    attention_bhtd_ref,
    attention_ref,
)
from cmkernels.ops.ema import EMA, ema_update_, ema_update_ref_
from cmkernels.ops.groupnorm_silu import groupnorm_silu, groupnorm_silu_ref
from cmkernels.ops.heun_step import heun_step1, heun_step1_ref, heun_step2, heun_step2_ref

__all__ = [
    "groupnorm_silu",
    "groupnorm_silu_ref",
    "attention",
    "attention_ref",
    "attention_bhtd",
    "attention_bhtd_ref",
    "heun_step1",
    "heun_step2",
    "heun_step1_ref",
    "heun_step2_ref",
    "ema_update_",
    "ema_update_ref_",
    "EMA",
]
