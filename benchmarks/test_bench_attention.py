"""Attention at the UNet's shapes: forward, backward and forward+backward, one benchmark group per
(mode, dtype, shape). Providers (all read the packed qkv [B, 3*H*d, T] and return [B, H*d, T]):

- eager:               `cmkernels.unet.attention_eager`: F.scaled_dot_product_attention on strided
                       (B, H, T, d) views of qkv, and the reshape back to [B, C, T] (what a user
                       writes, and the UNet's ops="eager");
- eager-official:      the official QKVAttention: T x T einsum in the input dtype, fp32 softmax (the
                       computation of `attention_ref`; the UNet's ops="reference");
- torch.compile:       `eager` compiled for this case alone (fullgraph, static shapes; the timed
                       rounds fail on a recompile);
- cmkernels:           `cmkernels.ops.attention` (Triton on CUDA; on the CPU the op's CPU kernel:
                       SDPA on contiguous q, k, v + logsumexp, blockwise backward);
- cmkernels+compile:   a function calling `cmkernels.ops.attention`, compiled the same way;
- cmkernels+cudagraph: the cmkernels call captured in a CUDA graph and replayed (CUDA only).

Modes: "forward" under no_grad; "backward": the gradient of a fixed forward (retain_graph);
"forward+backward": both per call. TFLOP/s counts 4 B H T^2 d for the forward and 2.5x that for
the backward (flash-attention's convention: the backward recomputes P).
Run: ``pytest benchmarks/test_bench_attention.py --benchmark-only``.
"""

import math

import pytest
import torch
from conftest import DEVICE, ON_GPU, compile_case, cuda_graph, skip_unavailable, timed

from cmkernels.ops import attention
from cmkernels.unet import attention_eager

D = 64  # head dim of the official ImageNet-64 / LSUN-256 configurations

# (T, channels) of the attention layers: 64x64 at 192 channels, 32x32 at 384, 16x16 at 576, 8x8 at
# 768 (ImageNet-64 widths); batches per T on CUDA (the official batch 256 where eager fits) and a
# few small cases on the CPU, where every compiled provider costs seconds of Inductor time.
SHAPES = [(4096, 192), (1024, 384), (256, 576), (64, 768)]
BATCHES = {
    "cuda": {4096: (1, 16), 1024: (1, 64), 256: (1, 256), 64: (1, 256)},
    "cpu": {4096: (), 1024: (1,), 256: (), 64: (4,)},
}
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]
MODES = ["forward", "backward", "forward+backward"] if ON_GPU else ["forward", "forward+backward"]


def eager_official(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The official QKVAttention: einsum in the input dtype, softmax in fp32."""
    B, C3, T = qkv.shape
    d = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, 3, num_heads, d, T).unbind(1)  # (B, H, d, T)
    w = torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(d)  # (B, H, T, T)
    w = torch.softmax(w.float(), dim=-1).to(qkv.dtype)
    return torch.einsum("bhts,bhds->bhdt", w, v).reshape(B, num_heads * d, T)


def fused(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    return attention(qkv, num_heads)


PROVIDERS = ["eager", "eager-official", "torch.compile", "cmkernels", "cmkernels+compile",
             "cmkernels+cudagraph"]  # fmt: skip


def _params():
    for T, C in SHAPES:
        for B in BATCHES[DEVICE.type][T]:
            for dtype in DTYPES:
                yield pytest.param(B, T, C, dtype, id=f"B{B}-T{T}-C{C}-{str(dtype)[6:]}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, T, C, dtype", list(_params()))
def test_attention(benchmark, B, T, C, dtype, mode, provider):
    skip_unavailable(provider)
    H = C // D
    gen = torch.Generator(DEVICE).manual_seed(0)
    qkv = torch.randn(B, 3 * C, T, device=DEVICE, dtype=dtype, generator=gen)
    grad = torch.randn(B, C, T, device=DEVICE, dtype=dtype, generator=gen)
    compiled = provider in ("torch.compile", "cmkernels+compile")
    fn = {"eager": attention_eager, "eager-official": eager_official,
          "torch.compile": attention_eager}.get(provider, fused)  # fmt: skip
    if compiled:
        fn = compile_case(fn)

    if mode == "forward":

        def step():
            with torch.no_grad():
                return fn(qkv, H)

    elif mode == "backward":
        x = qkv.clone().requires_grad_()
        out = fn(x, H)

        def step():
            return torch.autograd.grad(out, x, grad, retain_graph=True)

    else:
        x = qkv.clone().requires_grad_()

        def step():
            return torch.autograd.grad(fn(x, H), x, grad)

    if provider == "cmkernels+cudagraph":
        step = cuda_graph(step)
    flops = 4 * B * H * T * T * D * {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}[mode]
    benchmark.extra_info["shape"] = f"B={B} H={H} T={T} d={D}"
    timed(benchmark, step, group=f"attention {mode} {str(dtype)[6:]} B{B} T{T} C{C}",
          provider=provider, flops=flops, warmup=2 if ON_GPU else 1, compiled=compiled)  # fmt: skip
