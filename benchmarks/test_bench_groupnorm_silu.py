"""groupnorm_silu, silu(GN(x) * (1 + scale) + shift) with per-sample scale/shift: forward,
backward and forward+backward ("full"), one benchmark group per (mode, dtype, shape). Providers:

- eager:               `cmkernels.unet.groupnorm_silu_eager`: F.group_norm + scale/shift + F.silu
                       in the input dtype (GroupNorm weight and bias in that dtype too, as in a
                       model cast to it); what a user writes, and the UNet's ops="eager";
- eager-official:      the official code's order: GroupNorm in fp32, cast back, scale/shift, SiLU
                       (low-precision dtypes only: in fp32 it is `eager`);
- torch.compile:       `eager` compiled for this case alone (fullgraph, static shapes; the timed
                       rounds fail on a recompile);
- cmkernels:           `cmkernels.ops.groupnorm_silu` (Triton on CUDA, C++ on the CPU);
- cmkernels+compile:   a function calling it, compiled the same way;
- cmkernels+cudagraph: the cmkernels call captured in a CUDA graph and replayed (CUDA only).

"backward" times the gradient of a fixed forward (retain_graph); "full" a forward and its
backward. GB/s counts the fused minimum: x read and y written (forward), x, dy read and dx
written (backward).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, compile_case, cuda_graph, skip_unavailable, timed

from cmkernels.ops import groupnorm_silu
from cmkernels.unet import groupnorm_silu_eager

# (batch, channels, resolution): ImageNet-64 UNet widths (192..768) and smaller UNets (64..512).
if ON_GPU:
    SHAPES = [(1, 192, 64), (32, 192, 64), (256, 192, 64), (64, 384, 32), (256, 576, 16),
              (256, 768, 8), (16, 512, 32), (128, 64, 64)]  # fmt: skip
    DTYPES = [torch.bfloat16, torch.float16, torch.float32]
else:
    SHAPES = [(16, 128, 32), (4, 192, 64)]
    DTYPES = [torch.float32]
GROUPS = 32
PROVIDERS = ["eager", "eager-official", "torch.compile", "cmkernels", "cmkernels+compile",
             "cmkernels+cudagraph"]  # fmt: skip


def eager(x, w, b, scale, shift):
    return groupnorm_silu_eager(x, w, b, scale, shift, groups=GROUPS)


def eager_official(x, w, b, scale, shift):
    """The official UNet's order: GroupNorm in fp32 (GroupNorm32), then scale-shift and SiLU."""
    h = F.group_norm(x.float(), GROUPS, w, b, 1e-5).to(x.dtype)
    h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


def fused(x, w, b, scale, shift):
    return groupnorm_silu(x, w, b, scale, shift, groups=GROUPS)


def make_inputs(shape, dtype, weight_dtype, requires_grad):
    n, c, r = shape
    x = torch.randn(n, c, r, r, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    w = (1 + 0.1 * torch.randn(c, device=DEVICE)).to(weight_dtype)
    b = (0.1 * torch.randn(c, device=DEVICE)).to(weight_dtype)
    scale = 0.1 * torch.randn(n, c, device=DEVICE, dtype=dtype)
    shift = 0.1 * torch.randn(n, c, device=DEVICE, dtype=dtype)
    args = [x, w, b, scale, shift]
    if requires_grad:
        for t in args:
            t.requires_grad_(True)
    return args


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}x{s[2]}")
def test_groupnorm_silu(benchmark, provider, mode, dtype, shape):
    if provider == "eager-official" and dtype == torch.float32:
        pytest.skip("in fp32 the official order is the eager computation")
    skip_unavailable(provider)
    compiled = provider in ("torch.compile", "cmkernels+compile")
    fn = {"eager": eager, "eager-official": eager_official, "torch.compile": eager}.get(
        provider, fused
    )
    if compiled:
        fn = compile_case(fn)
    # Our op takes fp32 affine parameters with any activation dtype; plain F.group_norm wants
    # them in the activation dtype (the official code upcasts x instead).
    weight_dtype = dtype if provider in ("eager", "torch.compile") else torch.float32
    args = make_inputs(shape, dtype, weight_dtype, requires_grad=mode != "forward")
    x = args[0]
    elems = x.numel() * x.element_size()
    n, c, r = shape
    group = f"groupnorm_silu-{mode}-{str(dtype).split('.')[-1]}-{n}x{c}x{r}x{r}"
    if mode == "forward":

        def run():
            with torch.no_grad():
                return fn(*args)

        nbytes = 2 * elems
    elif mode == "backward":
        y = fn(*args)
        g = torch.randn_like(y)
        run = lambda: torch.autograd.grad(y, args, g, retain_graph=True)
        nbytes = 3 * elems
    else:
        g = torch.randn_like(x)
        run = lambda: torch.autograd.grad(fn(*args), args, g)
        nbytes = 5 * elems
    if provider == "cmkernels+cudagraph":
        run = cuda_graph(run)
    timed(benchmark, run, group=group, provider=provider, bytes_moved=nbytes, compiled=compiled)
