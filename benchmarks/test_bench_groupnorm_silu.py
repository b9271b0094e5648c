"""groupnorm_silu: forward, backward and forward+backward; cmkernels vs eager PyTorch vs
torch.compile of the eager code, side by side per (mode, dtype, shape)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU, timed

from cmkernels.ops import groupnorm_silu

# (batch, channels, resolution): ImageNet-64 UNet widths (192..768) and smaller UNets (64..512).
if ON_GPU:
    SHAPES = [(1, 192, 64), (32, 192, 64), (256, 192, 64), (64, 384, 32), (256, 576, 16),
              (256, 768, 8), (16, 512, 32), (128, 64, 64)]  # fmt: skip
    DTYPES = [torch.bfloat16, torch.float16, torch.float32]
else:
    SHAPES = [(16, 128, 32), (4, 192, 64), (64, 256, 8)]
    DTYPES = [torch.float32]
GROUPS = 32


def eager(x, w, b, scale, shift):
    """What the official UNet does: GroupNorm in fp32, scale-shift, SiLU."""
    h = F.group_norm(x.float(), GROUPS, w, b, 1e-5).to(x.dtype)
    h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


def fused(x, w, b, scale, shift):
    return groupnorm_silu(x, w, b, scale, shift, groups=GROUPS)


_compiled = {}


def compiled_eager():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager, dynamic=False)
    return _compiled["fn"]


PROVIDERS = {"cmkernels": lambda: fused, "eager": lambda: eager, "torch.compile": compiled_eager}


def make_inputs(shape, dtype, requires_grad):
    n, c, r = shape
    x = torch.randn(n, c, r, r, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last)
    w = 1 + 0.1 * torch.randn(c, device=DEVICE)
    b = 0.1 * torch.randn(c, device=DEVICE)
    scale = 0.1 * torch.randn(n, c, device=DEVICE, dtype=dtype)
    shift = 0.1 * torch.randn(n, c, device=DEVICE, dtype=dtype)
    args = [x, w, b, scale, shift]
    if requires_grad:
        for t in args:
            t.requires_grad_(True)
    return args


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}x{s[2]}")
def test_groupnorm_silu(benchmark, provider, mode, dtype, shape):
    fn = PROVIDERS[provider]()
    args = make_inputs(shape, dtype, requires_grad=mode != "forward")
    x = args[0]
    elems = x.numel() * x.element_size()
    n, c, r = shape
    group = f"groupnorm_silu-{mode}-{str(dtype).split('.')[-1]}-{n}x{c}x{r}x{r}"
    if mode == "forward":
        with torch.no_grad():
            timed(
                benchmark, lambda: fn(*args), group=group, provider=provider, bytes_moved=2 * elems
            )
    elif mode == "backward":
        y = fn(*args)
        g = torch.randn_like(y)
        run = lambda: torch.autograd.grad(y, args, g, retain_graph=True)
        timed(benchmark, run, group=group, provider=provider, bytes_moved=3 * elems)
    else:
        g = torch.randn_like(x)
        run = lambda: torch.autograd.grad(fn(*args), args, g)
        timed(benchmark, run, group=group, provider=provider, bytes_moved=5 * elems)
