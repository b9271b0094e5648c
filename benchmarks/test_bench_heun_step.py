"""heun_step1 / heun_step2 (and both: the elementwise work of one Heun step) at 64x3x64x64:
cmkernels vs the eager composition (the references) and, on a GPU, torch.compile of it, side by
side per (stage, dtypes).

dtypes "x/D": the sampler state's dtype and the network output's. GB/s counts each tensor read or
written once (the fused minimum).
"""

import pytest
import torch
from conftest import DEVICE, ON_GPU, timed

from cmkernels.ops import heun_step1, heun_step1_ref, heun_step2, heun_step2_ref

SHAPE = (64, 3, 64, 64)
if ON_GPU:
    DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
              (torch.bfloat16, torch.bfloat16)]  # fmt: skip
else:
    DTYPES = [(torch.float32, torch.float32)]

PROVIDERS = {
    "cmkernels": lambda: (heun_step1, heun_step2),
    "eager": lambda: (heun_step1_ref, heun_step2_ref),
}
_compiled = {}


def compiled_eager():
    if not _compiled:
        _compiled["fns"] = tuple(torch.compile(f, dynamic=False) for f in PROVIDERS["eager"]())
    return _compiled["fns"]


if ON_GPU:  # Inductor's CPU code generation would dominate the CPU suite's run time.
    PROVIDERS["torch.compile"] = compiled_eager


def make_inputs(dtype, d_dtype):
    B = SHAPE[0]
    t = 0.5 + 79.5 * torch.rand(B, device=DEVICE)
    tn = t * 0.7
    x = (torch.randn(SHAPE, device=DEVICE) * t.view(-1, 1, 1, 1)).to(dtype)
    D = torch.randn(SHAPE, device=DEVICE, dtype=d_dtype)
    D1 = torch.randn(SHAPE, device=DEVICE, dtype=d_dtype)
    return x, D, D1, t, tn


def _name(dt):
    return str(dt).split(".")[-1]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("stage", ["stage1", "stage2", "step"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{_name(d[0])}-{_name(d[1])}")
def test_heun_step(benchmark, provider, stage, dtypes):
    step1, step2 = PROVIDERS[provider]()
    x, D, D1, t, tn = make_inputs(*dtypes)
    x1, d = step1(x, D, t, tn)
    xs, ds = x.numel() * x.element_size(), D.numel() * D.element_size()
    if stage == "stage1":
        fn, nbytes = (lambda: step1(x, D, t, tn)), 3 * xs + ds  # read x, D; write x1, d
    elif stage == "stage2":
        fn, nbytes = (lambda: step2(x, d, x1, D1, t, tn)), 4 * xs + ds  # read x, d, x1, D1; write
    else:

        def fn():
            x1, d = step1(x, D, t, tn)
            return step2(x, d, x1, D1, t, tn)

        nbytes = 7 * xs + 2 * ds
    group = f"heun_step-{stage}-{_name(dtypes[0])}/{_name(dtypes[1])}-" + "x".join(map(str, SHAPE))
    with torch.no_grad():
        timed(benchmark, fn, group=group, provider=provider, bytes_moved=nbytes)
