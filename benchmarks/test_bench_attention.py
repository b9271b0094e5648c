"""Attention at the UNet's shapes: forward, backward and forward+backward, one benchmark group per
(mode, dtype, shape) with the providers side by side:

- cmkernels: ``cmkernels.ops.attention`` on the packed qkv (Triton on CUDA; on the CPU the op's
  CPU kernel, or plain SDPA for a forward without autograd; the Triton interpreter is never timed);
- eager:     the official einsum/softmax formulation (that of ``attention_ref``; fp32 softmax);
- sdpa:      ``F.scaled_dot_product_attention`` on (B, H, T, d) views of qkv, plus the copy back to
  the [B, C, T] layout the UNet uses.

Run: ``pytest benchmarks/test_bench_attention.py`` (CPU: scaled-down batches, well under a minute).
TFLOP/s counts 4 B H T^2 d for the forward and 2.5x that for the backward (flash-attention's
convention: the backward recomputes P).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import device_name, versions

from cmkernels.ops import attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
D = 64  # head dim of the official ImageNet-64 / LSUN-256 configurations

# (T, channels) of the attention layers: 64x64 at 192 channels, 32x32 at 384, 16x16 at 576, 8x8 at
# 768 (ImageNet-64 widths); batches per T on CUDA (the official batch 256 where eager fits) and CPU.
SHAPES = [(4096, 192), (1024, 384), (256, 576), (64, 768)]
BATCHES = {
    "cuda": {4096: (1, 16), 1024: (1, 64), 256: (1, 256), 64: (1, 256)},
    "cpu": {4096: (), 1024: (1,), 256: (2,), 64: (4,)},
}
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]
ROUNDS = 20 if CUDA else 9  # medians of 3 rounds were too noisy on shared CPUs


def eager(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The official QKVAttention: einsum in the input dtype, softmax in fp32."""
    B, C3, T = qkv.shape
    d = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, 3, num_heads, d, T).unbind(1)  # (B, H, d, T)
    w = torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d)  # (B, H, T, T)
    w = torch.softmax(w.float(), dim=-1).to(qkv.dtype)
    return torch.einsum("bhts,bhds->bhdt", w, v).reshape(B, num_heads * d, T)


def sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, C3, T = qkv.shape
    q, k, v = qkv.unflatten(1, (3 * num_heads, -1)).transpose(-1, -2).chunk(3, dim=1)
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)
    return out.transpose(-1, -2).reshape(B, C3 // 3, T)


PROVIDERS = {"cmkernels": attention, "eager": eager, "sdpa": sdpa}


def _params():
    for T, C in SHAPES:
        for B in BATCHES[DEVICE][T]:
            for dtype in DTYPES:
                yield pytest.param(B, T, C, dtype, id=f"B{B}-T{T}-C{C}-{str(dtype)[6:]}")


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", ["forward", "backward", "forward+backward"])
@pytest.mark.parametrize("B, T, C, dtype", list(_params()))
def test_attention(benchmark, B, T, C, dtype, mode, provider):
    fn = PROVIDERS[provider]
    H = C // D
    gen = torch.Generator(DEVICE).manual_seed(0)
    qkv = torch.randn(B, 3 * C, T, device=DEVICE, dtype=dtype, generator=gen)
    grad = torch.randn(B, C, T, device=DEVICE, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    if mode == "forward":

        def step():
            with torch.no_grad():
                fn(qkv, H)
            sync()

    elif mode == "backward":
        x = qkv.clone().requires_grad_()
        out = fn(x, H)

        def step():
            torch.autograd.grad(out, x, grad, retain_graph=True)
            sync()

    else:
        x = qkv.clone().requires_grad_()

        def step():
            torch.autograd.grad(fn(x, H), x, grad)
            sync()

    benchmark.group = f"attention {mode} {str(dtype)[6:]} B{B} T{T} C{C}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=2 if CUDA else 1)
    flops = 4 * B * H * T * T * D * {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}[mode]
    benchmark.extra_info.update(
        device=device_name(),
        provider=provider,
        shape=f"B={B} H={H} T={T} d={D}",
        **versions(),
    )
    benchmark.extra_info["TFLOP/s"] = round(flops / benchmark.stats.stats.median / 1e12, 4)
