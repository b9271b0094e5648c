"""End to end: training images/sec of one optimisation step (edm, cd, ct) and one-/two-step
sampling latency and throughput, for eager PyTorch with the reference ops, cmkernels' fused ops,
torch.compile and CUDA graphs, side by side per (task, preset, batch).

On a CPU the sizes are scaled down and the GPU-only providers (bf16 autocast, torch.compile,
CUDA graphs) are skipped with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, ON_GPU, timed

from cmkernels import ops
from cmkernels.diffusion import Denoiser, karras_sigmas
from cmkernels.graph_sampler import GraphedConsistencySampler, consistency_chain
from cmkernels.losses import ConsistencyLoss, EDMLoss
from cmkernels.unet import UNet, get_preset

# (preset, training batch, sampling batches)
if ON_GPU:
    CASES = [("gray32", 256, (1, 64, 256)), ("imagenet64", 32, (1, 64, 256))]
else:
    CASES = [("gray32", 16, (1, 16))]
TRAIN_PROVIDERS = ["eager-fp32", "eager-bf16", "cmkernels", "cmkernels+compile", "torch.compile"]
SAMPLE_PROVIDERS = TRAIN_PROVIDERS + ["cmkernels+cudagraph"]
GPU_ONLY = {"eager-bf16", "cmkernels+compile", "torch.compile", "cmkernels+cudagraph"}


def _setting(provider: str) -> tuple[str, bool, bool]:
    """(ops, bf16 autocast, torch.compile) of a provider."""
    ops_kind = "kernels" if provider.startswith("cmkernels") else "reference"
    bf16 = ON_GPU and provider != "eager-fp32"
    return ops_kind, bf16, provider in ("cmkernels+compile", "torch.compile")


def _model(preset: str, parameterization: str, ops_kind: str) -> Denoiser:
    cfg = get_preset(preset, ops=ops_kind, dropout=0.0)
    torch.manual_seed(0)
    net = UNet(cfg)
    for p in net.parameters():  # no zero-initialised layers: real work everywhere
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    # channels_last everywhere, as the trainer does by default (faster convolutions on the CPU too)
    return Denoiser(net, parameterization).to(DEVICE, memory_format=torch.channels_last)


def _images(preset: str, batch: int, gen_seed: int = 0) -> torch.Tensor:
    cfg = get_preset(preset)
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return x.clamp(-1, 1).to(DEVICE).contiguous(memory_format=torch.channels_last)


def _labels(preset: str, batch: int):
    n = get_preset(preset).num_classes
    return torch.randint(0, n, (batch,), device=DEVICE) if n else None


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("mode", ["edm", "cd", "ct"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_train_step(benchmark, case, mode, provider):
    if provider in GPU_ONLY and not ON_GPU:
        pytest.skip(f"{provider} is a GPU provider")
    preset, batch, _ = case
    ops_kind, bf16, compiled = _setting(provider)
    model = _model(preset, "edm" if mode == "edm" else "cm", ops_kind)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    target = copy.deepcopy(model).requires_grad_(False) if mode != "edm" else None
    teacher = _model(preset, "edm", ops_kind).requires_grad_(False) if mode == "cd" else None
    emas = [[p.detach().clone().float() for p in params]]
    fwd = torch.compile(model) if compiled else model
    loss_fn = EDMLoss() if mode == "edm" else ConsistencyLoss()
    x, labels = _images(preset, batch), _labels(preset, batch)
    gen = torch.Generator().manual_seed(0)

    def step():
        noise = torch.randn_like(x)
        draws = loss_fn.draw(batch, gen, 18)
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
            if mode == "edm":
                per_sample, _ = loss_fn(fwd, x, noise, draws, labels)
            else:
                per_sample, _ = loss_fn(fwd, target, x, noise, draws, teacher, labels)
        per_sample.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        copies = ([[p.data for p in target.parameters()]] if target is not None else []) + emas
        with torch.no_grad():
            ops.ema_update_(
                [p.detach() for p in params], copies, [0.95] * (len(copies) - 1) + [0.9999]
            )

    group = f"train-{mode}-{preset}-b{batch}"
    timed(benchmark, step, group=group, provider=provider, warmup=3 if compiled else 1,
          rounds=None if ON_GPU else 5)  # fmt: skip
    median = benchmark.stats.stats.median
    benchmark.extra_info["img/s"] = round(batch / median, 1)


@pytest.mark.parametrize("provider", SAMPLE_PROVIDERS)
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize(
    "case", [(p, b) for p, _, bs in CASES for b in bs], ids=lambda c: f"{c[0]}-b{c[1]}"
)
def test_sample(benchmark, case, steps, provider):
    if provider in GPU_ONLY and not ON_GPU:
        pytest.skip(f"{provider} is a GPU provider")
    preset, batch = case
    ops_kind, bf16, compiled = _setting(provider)
    model = _model(preset, "cm", ops_kind).eval()
    sigmas = [80.0] if steps == 1 else [80.0, float(karras_sigmas(40)[22])]
    z = _images(preset, batch, 1)
    noises = [torch.randn_like(z) for _ in sigmas[1:]]
    labels = _labels(preset, batch)

    def den(x, s, y):
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
            return model(x, s, y)

    if provider == "cmkernels+cudagraph":
        sampler = GraphedConsistencySampler(den, tuple(z.shape[1:]), sigmas)
        run = lambda: sampler(z, noises, labels)
    else:
        fn = torch.compile(den, mode="max-autotune") if compiled else den
        run = lambda: consistency_chain(fn, z, noises, sigmas, 0.002, labels)
    group = f"sample-{steps}step-{preset}-b{batch}"
    with torch.no_grad():
        timed(benchmark, run, group=group, provider=provider, warmup=3 if compiled else 2,
              rounds=None if ON_GPU else 5)  # fmt: skip
    benchmark.extra_info["img/s"] = round(batch / benchmark.stats.stats.median, 1)
