"""heun_step1 / heun_step2 (and "step", both: the elementwise work of one EDM Heun step around its
two network calls) at 64x3x64x64, one benchmark group per (stage, dtypes). Providers:

- eager:               the Heun arithmetic as plain PyTorch (NVlabs/edm's sampler lines, with
                       per-sample t, t_next), in the dtypes type promotion gives (fp32 with the
                       fp32 times), results cast to x's dtype as the fused op returns them;
- torch.compile:       that code compiled for this case alone (fullgraph, static shapes; the timed
                       rounds fail on a recompile);
- cmkernels:           `cmkernels.ops.heun_step1` / `heun_step2` (CUDA on GPU, C++ on the CPU);
- cmkernels+compile:   a function calling them, compiled the same way;
- cmkernels+cudagraph: the cmkernels calls captured in a CUDA graph and replayed (CUDA only).

dtypes "x/D": the sampler state's dtype and the network output's. GB/s counts each tensor read or
written once (the fused minimum).
"""

import pytest
import torch
from conftest import DEVICE, ON_GPU, compile_case, cuda_graph, skip_unavailable, timed

from cmkernels.ops import heun_step1, heun_step2

SHAPE = (64, 3, 64, 64)
if ON_GPU:
    DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
              (torch.bfloat16, torch.bfloat16)]  # fmt: skip
else:
    DTYPES = [(torch.float32, torch.float32)]
PROVIDERS = ["eager", "torch.compile", "cmkernels", "cmkernels+compile", "cmkernels+cudagraph"]


def eager_step1(x, denoised, t, t_next):
    t, t_next = t.view(-1, 1, 1, 1), t_next.view(-1, 1, 1, 1)
    d = (x - denoised) / t  # Euler step.
    return (x + (t_next - t) * d).to(x.dtype), d.to(x.dtype)


def eager_step2(x, d, x1, denoised1, t, t_next):
    t, t_next = t.view(-1, 1, 1, 1), t_next.view(-1, 1, 1, 1)
    d_prime = (x1 - denoised1) / t_next  # Apply 2nd order correction.
    return (x + (t_next - t) * (0.5 * d + 0.5 * d_prime)).to(x.dtype)


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


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stage", ["stage1", "stage2", "step"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{_name(d[0])}-{_name(d[1])}")
def test_heun_step(benchmark, provider, stage, dtypes):
    skip_unavailable(provider)
    plain = provider in ("eager", "torch.compile")
    step1, step2 = (eager_step1, eager_step2) if plain else (heun_step1, heun_step2)
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
    compiled = provider in ("torch.compile", "cmkernels+compile")
    if compiled:
        fn = compile_case(fn)
    elif provider == "cmkernels+cudagraph":
        fn = cuda_graph(fn)
    group = f"heun_step-{stage}-{_name(dtypes[0])}/{_name(dtypes[1])}-" + "x".join(map(str, SHAPE))
    with torch.no_grad():
        timed(benchmark, fn, group=group, provider=provider, bytes_moved=nbytes,
              compiled=compiled)  # fmt: skip
