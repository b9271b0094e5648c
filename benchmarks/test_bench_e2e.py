"""End to end: images/sec of one training step (edm, cd, ct) and one-/two-step sampling latency and
throughput, one benchmark group per (task, preset, batch, precision). Providers, all the same
network with the same weights (UNetConfig.ops picks the GroupNorm+SiLU and attention code):

- eager:                   ops="eager": SDPA attention, F.group_norm + F.silu in the activation
                           dtype; plain-PyTorch Heun arithmetic in the CD loss and three
                           `_foreach_lerp_` for the target/EMA update (what a user writes);
- eager-official:          ops="reference": the official code's computation (fp32 GroupNorm, T x T
                           einsum attention), with the same plain Heun arithmetic and lerps;
- torch.compile:           the `eager` networks, each compiled for this case alone (fullgraph,
                           static shapes; the timed rounds fail on a recompile); the optimizer, the
                           loss's small elementwise tail, the Heun arithmetic and the EMA stay eager
                           (as for every provider);
- torch.compile+cudagraph: (sampling, CUDA) the same with mode="reduce-overhead" (CUDA graphs);
- cmkernels:               ops="kernels": our fused ops in the network, the fused Heun step in the
                           CD loss and one `ema_update_` for the target and EMA copies;
- cmkernels+compile:       the cmkernels networks compiled like torch.compile;
- cmkernels+cudagraph:     (sampling, CUDA) the cmkernels sampler captured in a CUDA graph per batch
                           size and replayed (`GraphedConsistencySampler`).

No CUDA-graph provider for the training step: the loss draws its noise levels on the host every
step and reads one back (`.item()`), and Adam would need capturable state; capturing it would time
a different program. Precision: "bf16" = bf16 autocast (CUDA), "fp32" = no autocast. On the CPU
the cases are scaled down (gray32, fp32; the cd training step and one-step sampling only, since
each compiled case costs tens of seconds of Inductor time on 2 cores).

Headline rows of the GPU proof carry the `headline` mark (`-m headline`): imagenet64 bf16, the cd
training step at batch 32 and one-step sampling at batch 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, ON_GPU, compile_case, skip_unavailable, timed
from test_bench_heun_step import eager_step1, eager_step2

from cmkernels import losses, ops
from cmkernels.diffusion import Denoiser
from cmkernels.noise_schedule import karras_sigmas
from cmkernels.sampling import GraphedConsistencySampler, sample_multistep_given_noises
from cmkernels.unet import UNet, get_preset

# (preset, training batch, sampling batches)
if ON_GPU:
    CASES = [("gray32", 256, (1, 64, 256)), ("imagenet64", 32, (1, 64, 256))]
    PRECISIONS, TRAIN_MODES, SAMPLE_STEPS = ["bf16", "fp32"], ["edm", "cd", "ct"], [1, 2]
else:
    CASES = [("gray32", 16, (1, 16))]
    PRECISIONS, TRAIN_MODES, SAMPLE_STEPS = ["fp32"], ["cd"], [1]
HEADLINE = "imagenet64"
TRAIN_PROVIDERS = ["eager", "eager-official", "torch.compile", "cmkernels", "cmkernels+compile"]
SAMPLE_PROVIDERS = ["eager", "eager-official", "torch.compile", "torch.compile+cudagraph",
                    "cmkernels", "cmkernels+compile", "cmkernels+cudagraph"]  # fmt: skip


def _ops_kind(provider: str) -> str:
    if provider.startswith("cmkernels"):
        return "kernels"
    return "reference" if provider == "eager-official" else "eager"


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


def _case(*values, id: str, headline: bool):
    return pytest.param(*values, id=id, marks=[pytest.mark.headline] if headline else [])


def _train_cases():
    for preset, batch, _ in CASES:
        for mode in TRAIN_MODES:
            for prec in PRECISIONS:
                headline = preset == HEADLINE and mode == "cd" and prec == "bf16"
                yield _case(preset, batch, mode, prec, id=f"{preset}-b{batch}-{mode}-{prec}",
                            headline=headline)  # fmt: skip


def _sample_cases():
    for preset, _, batches in CASES:
        for batch in batches:
            for steps in SAMPLE_STEPS:
                for prec in PRECISIONS:
                    headline = (preset, batch, steps, prec) == (HEADLINE, 1, 1, "bf16")
                    name = f"{preset}-b{batch}-{steps}step-{prec}"
                    yield _case(preset, batch, steps, prec, id=name, headline=headline)


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
@pytest.mark.parametrize("preset, batch, mode, precision", list(_train_cases()))
def test_train_step(benchmark, monkeypatch, preset, batch, mode, precision, provider):
    ops_kind = _ops_kind(provider)
    bf16 = precision == "bf16"
    compiled = provider.endswith("compile")
    if ops_kind != "kernels":  # the CD loss's teacher Heun step in plain PyTorch
        monkeypatch.setattr(losses, "heun_step1", eager_step1)
        monkeypatch.setattr(losses, "heun_step2", eager_step2)
    model = _model(preset, "edm" if mode == "edm" else "cm", ops_kind)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    target = copy.deepcopy(model).requires_grad_(False) if mode != "edm" else None
    teacher = _model(preset, "edm", ops_kind).requires_grad_(False) if mode == "cd" else None
    emas = [[p.detach().clone().float() for p in params]]
    copies = ([[p.data for p in target.parameters()]] if target is not None else []) + emas
    rates = [0.95] * (len(copies) - 1) + [0.9999]
    nets = [n for n in (model, target, teacher) if n is not None]
    if compiled:
        nets = [compile_case(net, reset=i == 0) for i, net in enumerate(nets)]
    fwd, target_fwd, teacher_fwd = nets + [None] * (3 - len(nets))
    loss_fn = losses.EDMLoss() if mode == "edm" else losses.ConsistencyLoss()
    x, labels = _images(preset, batch), _labels(preset, batch)
    gen = torch.Generator().manual_seed(0)
    detached = [p.detach() for p in params]

    def update_copies():
        with torch.no_grad():
            if ops_kind == "kernels":
                ops.ema_update_(detached, copies, rates)
            else:
                for dst, r in zip(copies, rates):
                    torch._foreach_lerp_(dst, detached, 1.0 - r)

    def step():
        noise = torch.randn_like(x)
        draws = loss_fn.draw(batch, gen, 18)
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
            if mode == "edm":
                per_sample, _ = loss_fn(fwd, x, noise, draws, labels)
            else:
                per_sample, _ = loss_fn(fwd, target_fwd, x, noise, draws, teacher_fwd, labels)
        per_sample.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_copies()

    median = timed(benchmark, step, group=f"train-{mode}-{preset}-b{batch}-{precision}",
                   provider=provider, warmup=3 if compiled else 1, compiled=compiled,
                   rounds=None if ON_GPU else 5)  # fmt: skip
    benchmark.extra_info["img/s"] = round(batch / median, 1)


@pytest.mark.parametrize("provider", SAMPLE_PROVIDERS)
@pytest.mark.parametrize("preset, batch, steps, precision", list(_sample_cases()))
def test_sample(benchmark, preset, batch, steps, precision, provider):
    skip_unavailable(provider)
    bf16 = precision == "bf16"
    compiled = "compile" in provider
    model = _model(preset, "cm", _ops_kind(provider)).eval()
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
    elif provider == "torch.compile+cudagraph":
        fn = compile_case(den, mode="reduce-overhead")

        def run():
            torch.compiler.cudagraph_mark_step_begin()  # a new sample: earlier outputs are free
            return sample_multistep_given_noises(fn, z, noises, sigmas, 0.002, labels)

    else:
        fn = compile_case(den) if compiled else den
        run = lambda: sample_multistep_given_noises(fn, z, noises, sigmas, 0.002, labels)
    with torch.no_grad():
        median = timed(benchmark, run, group=f"sample-{steps}step-{preset}-b{batch}-{precision}",
                       provider=provider, warmup=3 if compiled else 2, compiled=compiled,
                       rounds=None if ON_GPU else 5)  # fmt: skip
    benchmark.extra_info["img/s"] = round(batch / median, 1)
