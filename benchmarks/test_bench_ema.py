"""ema_update_ with 3 rates over a whole model's parameter list: cmkernels (one fused op) vs three
``torch._foreach_lerp_`` calls (one per rate) vs a Python loop of ``mul_`` + ``add_``, side by side.

Models: the ImageNet-64 consistency model (541 tensors, 296M parameters, shapes from the official
checkpoint layout; on the CPU every tensor is scaled down so the total is ~15M, the tensor count
kept) and a small model (the first 200 of those tensors scaled to ~1.5M parameters). GB/s is the
fused op's minimal traffic (4 + 8K bytes a parameter) over each provider's time, so the column
compares like with like.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, ON_GPU, timed

from cmkernels.ops import ema_update_

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():  # a checkout with shared/ inside it
    DATA = Path(__file__).resolve().parents[1] / "shared" / "data"
LAYOUTS = DATA / "official_unet_layouts.json"

RATES = [0.999, 0.9999, 0.99995]


def _scaled(numels: list[int], total: float) -> list[int]:
    f = sum(numels) / total
    return [max(1, round(n / f)) for n in numels]


def param_sizes(model: str) -> list:
    """Shapes (GPU, imagenet64) or flat sizes (scaled) of the benchmark's parameter list."""
    if not LAYOUTS.exists():
        pytest.skip(f"no official layouts at {LAYOUTS}")
    shapes = list(json.loads(LAYOUTS.read_text())["imagenet64"]["tensors"].values())
    numels = [math.prod(s) for s in shapes]
    if model == "imagenet64":
        return shapes if ON_GPU else _scaled(numels, 15e6)
    return _scaled(numels[:200], 1.5e6)


def run_fused(params, emas):
    ema_update_(params, emas, RATES)


def run_foreach_lerp(params, emas):
    for copies, r in zip(emas, RATES):
        torch._foreach_lerp_(copies, params, 1.0 - r)


def run_loop(params, emas):
    for copies, r in zip(emas, RATES):
        for p, e in zip(params, copies):
            e.mul_(r).add_(p, alpha=1.0 - r)


PROVIDERS = {"cmkernels": run_fused, "foreach_lerp": run_foreach_lerp, "loop": run_loop}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("model", ["imagenet64", "small"])
def test_ema_update(benchmark, provider, model):
    sizes = param_sizes(model)
    params = [torch.randn(s, device=DEVICE) for s in sizes]
    emas = [[p.clone() for p in params] for _ in RATES]
    n = sum(p.numel() for p in params)
    fn = PROVIDERS[provider]
    group = f"ema_update_-K3-fp32-{model}-{len(params)}tensors-{n / 1e6:.1f}M"
    benchmark.extra_info.update(tensors=len(params), params=n)
    with torch.no_grad():
        timed(
            benchmark,
            lambda: fn(params, emas),
            group=group,
            provider=provider,
            bytes_moved=n * (4 + 8 * len(RATES)),
        )
