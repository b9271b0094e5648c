"""ema_update_ with 3 rates over a whole model's parameter list, one benchmark group per model.
Providers (all update three fp32 EMA copies in place, ema <- r ema + (1 - r) p):

- eager:               three `torch._foreach_lerp_(copies, params, 1 - r)`, one per rate (what a
                       careful user writes; a Python loop of mul_/add_ is far slower);
- torch.compile:       those three calls compiled for this case alone (fullgraph; the timed rounds
                       fail on a recompile);
- cmkernels:           `cmkernels.ops.ema_update_`: one fused op, each parameter read once for all
                       rates (one multi-tensor launch on CUDA, C++ on the CPU);
- cmkernels+compile:   a function calling it, compiled the same way;
- cmkernels+cudagraph: the cmkernels call captured in a CUDA graph and replayed (CUDA only).

Models (GPU): the ImageNet-64 consistency model (541 tensors, 296M parameters, shapes from the
official checkpoint layout) and a small model (its first 200 tensors scaled to ~1.5M parameters).
CPU: the small model only, from the first 64 tensors (see MODELS). GB/s is the fused op's minimal
traffic (4 + 8K bytes a parameter) over each provider's time, so the column compares like with
like.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, ON_GPU, compile_case, cuda_graph, skip_unavailable, timed

from cmkernels.ops import ema_update_

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():  # a checkout with shared/ inside it
    DATA = Path(__file__).resolve().parents[1] / "shared" / "data"
LAYOUTS = DATA / "official_unet_layouts.json"

RATES = [0.999, 0.9999, 0.99995]
PROVIDERS = ["eager", "torch.compile", "cmkernels", "cmkernels+compile", "cmkernels+cudagraph"]
# The CPU runs a small model only, of 64 tensors: Inductor's C++ build time grows with the tensor
# count (a cold compile of the 200-tensor update took ~85 s on 2 shared cores), and the per-tensor
# overhead the fused op removes is visible at 64 tensors already.
MODELS = ["imagenet64", "small"] if ON_GPU else ["small"]
SMALL_TENSORS = 200 if ON_GPU else 64


def _scaled(numels: list[int], total: float) -> list[int]:
    f = sum(numels) / total
    return [max(1, round(n / f)) for n in numels]


def param_sizes(model: str) -> list:
    """Shapes (imagenet64) or flat sizes (small, scaled) of the benchmark's parameter list."""
    if not LAYOUTS.exists():
        pytest.skip(f"no official layouts at {LAYOUTS}")
    shapes = list(json.loads(LAYOUTS.read_text())["imagenet64"]["tensors"].values())
    numels = [math.prod(s) for s in shapes]
    if model == "imagenet64":
        return shapes
    return _scaled(numels[:SMALL_TENSORS], 1.5e6)


def run_fused(params, emas):
    ema_update_(params, emas, RATES)


def run_foreach_lerp(params, emas):
    for copies, r in zip(emas, RATES):
        torch._foreach_lerp_(copies, params, 1.0 - r)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model", MODELS)
def test_ema_update(benchmark, provider, model):
    skip_unavailable(provider)
    sizes = param_sizes(model)
    params = [torch.randn(s, device=DEVICE) for s in sizes]
    emas = [[p.clone() for p in params] for _ in RATES]
    n = sum(p.numel() for p in params)
    fn = run_foreach_lerp if provider in ("eager", "torch.compile") else run_fused
    compiled = provider in ("torch.compile", "cmkernels+compile")
    if compiled:
        fn = compile_case(fn)
    run = lambda: fn(params, emas)
    if provider == "cmkernels+cudagraph":
        run = cuda_graph(run)
    group = f"ema_update_-K3-fp32-{model}-{len(params)}tensors-{n / 1e6:.1f}M"
    benchmark.extra_info.update(tensors=len(params), params=n)
    with torch.no_grad():
        timed(benchmark, run, group=group, provider=provider,
              bytes_moved=n * (4 + 8 * len(RATES)), compiled=compiled)  # fmt: skip
