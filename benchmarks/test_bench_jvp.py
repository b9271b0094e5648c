"""Continuous-time consistency models: one forward-mode JVP of the whole consistency function
(f(x, t), df/dt along (v, 1): what every CD-infinity / CT-infinity step computes on the target
network) in time AND peak memory, and the continuous-time training step against the discrete one.

JVP providers, the same network with the same weights, under torch.no_grad():

- eager:         torch.func.jvp of the model a user writes: F.group_norm + F.silu in the activation
                 dtype and attention as softmax(q k^T / sqrt(d)) v in plain PyTorch (math
                 attention: SDPA has no forward-mode AD, pytorch issues 128971 and 154226);
- torch.compile: that torch.func.jvp compiled for this case alone (fullgraph, static shapes);
                 where it does not compile (torch 2.14: dynamo fails on F.group_norm under
                 torch.func.jvp) the row is skipped with the error, never timed eagerly;
- cmkernels:     Denoiser.jvp of the ops="kernels" network: the fused ops' one-launch primal +
                 tangent kernels (GroupNorm+SiLU JVP, flash attention JVP with no T x T matrix).

Peak memory (extra_info["peak_mem_mb"]) is the high-water mark of the tensor memory allocated
during one call above what was allocated before it: on CUDA from the caching allocator's
statistics, on the CPU from the profiler's allocation events (every tensor allocation and free).

Training providers (cd and ct, the gray32 network): "cmkernels-discrete" (the l2 ConsistencyLoss
on the N = 18 grid), "cmkernels-continuous" (ContinuousConsistencyLoss with target stopgrad(theta),
the trainer's default: one online forward that carries the tangent, and its backward) and
"cmkernels-continuous-ema-target" (a separate target network: the online forward, a target JVP,
the backward), img/s side by side.

On the CPU the cases are scaled down (fp32; imagenet64 at batch 1 for its 32 x 32 = 1,024-token
attention, no compiled imagenet64 case: Inductor on 2 cores takes many minutes for it).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DEVICE, ON_GPU, compile_case, keeps_dispatch_state, timed

from cmkernels import losses, unet
from cmkernels.diffusion import Denoiser
from cmkernels.unet import OpSet, UNet, get_preset, groupnorm_silu_eager

if ON_GPU:
    JVP_CASES = [("gray32", 64), ("imagenet64", 8)]
    PRECISIONS = ["bf16", "fp32"]
    TRAIN_BATCH = 256
else:
    JVP_CASES = [("gray32", 8), ("imagenet64", 1)]
    PRECISIONS = ["fp32"]
    TRAIN_BATCH = 16
JVP_PROVIDERS = ["eager", "torch.compile", "cmkernels"]


def attention_math(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What a user writes for attention when SDPA refuses forward-mode AD: packed qkv
    [B, 3*H*d, T] -> [B, H*d, T], softmax in the input dtype."""
    B, C3, T = qkv.shape
    d = C3 // (3 * num_heads)
    q, k, v = qkv.reshape(B, 3, num_heads, d, T).transpose(-1, -2).unbind(1)  # (B, H, T, d)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (p @ v).transpose(-1, -2).reshape(B, num_heads * d, T)


def _model(preset: str, ops_kind: str, parameterization: str = "cm") -> Denoiser:
    torch.manual_seed(0)
    net = UNet(get_preset(preset, ops=ops_kind, dropout=0.0))
    for p in net.parameters():  # no zero-initialised layers: real work everywhere
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    den = Denoiser(net, parameterization).to(DEVICE, memory_format=torch.channels_last)
    return den.requires_grad_(False)


def _inputs(preset: str, batch: int):
    cfg = get_preset(preset)
    g = torch.Generator().manual_seed(0)
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = (torch.randn(shape, generator=g) * 2.0).to(DEVICE)
    v = torch.randn(shape, generator=g).to(DEVICE)
    x, v = (t.contiguous(memory_format=torch.channels_last) for t in (x, v))
    sigma = torch.full((batch,), 2.0, device=DEVICE)
    labels = None
    if cfg.num_classes:
        labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(DEVICE)
    return x, sigma, v, labels


def peak_memory_bytes(fn) -> int:
    """The high-water mark of tensor memory allocated by one call of fn, above what was allocated
    when it started."""
    if ON_GPU:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.autograd.profiler import MEMORY_EVENT_NAME

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == MEMORY_EVENT_NAME
              and e.device_type() == torch.autograd.DeviceType.CPU]  # fmt: skip
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("provider", JVP_PROVIDERS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("preset, batch", JVP_CASES, ids=[f"{p}-b{b}" for p, b in JVP_CASES])
def test_consistency_function_jvp(benchmark, monkeypatch, preset, batch, precision, provider):
    if provider == "torch.compile" and not ON_GPU and preset == "imagenet64":
        pytest.skip("torch.compile of the imagenet64 JVP: many minutes of Inductor on 2 CPU cores")
    if provider != "cmkernels":  # the user's model: math attention (SDPA has no forward AD)
        monkeypatch.setitem(unet.OP_SETS, "eager", OpSet(groupnorm_silu_eager, attention_math))
    model = _model(preset, "kernels" if provider == "cmkernels" else "eager")
    x, sigma, v, labels = _inputs(preset, batch)
    bf16 = precision == "bf16"

    def user_jvp(x, sigma, v):
        return torch.func.jvp(lambda x_, s_: model(x_, s_, labels), (x, sigma),
                              (v, torch.ones_like(sigma)))  # fmt: skip

    if provider == "cmkernels":

        def jvp(x, sigma, v):
            return model.jvp(x, sigma, v, labels)
    elif provider == "torch.compile":
        jvp = compile_case(user_jvp)
        failure = None
        with keeps_dispatch_state():
            try:
                with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
                    jvp(x, sigma, v)
            except Exception as exc:  # not a silent eager fallback: the row is absent, with why
                reason = str(exc).strip().splitlines()[0][:160]
                failure = f"{type(exc).__name__}: {reason}"
        if failure is not None:
            pytest.skip(
                f"torch.compile cannot compile torch.func.jvp of this model "
                f"(torch {torch.__version__}): {failure}"
            )
    else:
        jvp = user_jvp

    def call():
        with torch.no_grad(), torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
            return jvp(x, sigma, v)

    compiled = provider == "torch.compile"
    timed(benchmark, call, group=f"jvp-{preset}-b{batch}-{precision}", provider=provider,
          warmup=3 if compiled else 1, compiled=compiled,
          rounds=None if ON_GPU else 3)  # fmt: skip
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_bytes(call) / 2**20, 1)


@pytest.mark.parametrize(
    "provider", ["cmkernels-discrete", "cmkernels-continuous", "cmkernels-continuous-ema-target"]
)
@pytest.mark.parametrize("mode", ["cd", "ct"])
def test_train_step_continuous_vs_discrete(benchmark, mode, provider):
    preset, batch = "gray32", TRAIN_BATCH
    model = _model(preset, "kernels").requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    target = copy.deepcopy(model).requires_grad_(False)
    teacher = _model(preset, "kernels", "edm") if mode == "cd" else None
    if provider == "cmkernels-discrete":
        loss_fn = losses.ConsistencyLoss()
    else:
        loss_fn = losses.ContinuousConsistencyLoss(target_is_model=provider.endswith("continuous"))
    x, _, _, _ = _inputs(preset, batch)
    x = x.clamp(-1, 1)
    gen = torch.Generator().manual_seed(0)
    bf16 = ON_GPU

    def step():
        noise = torch.randn_like(x)
        draws = loss_fn.draw(batch, gen, 18)
        with torch.autocast(DEVICE.type, torch.bfloat16, enabled=bf16):
            per_sample, _ = loss_fn(model, target, x, noise, draws, teacher)
        per_sample.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    precision = "bf16" if bf16 else "fp32"
    group = f"train-{mode}-continuous-vs-discrete-{preset}-b{batch}-{precision}"
    median = timed(benchmark, step, group=group,
                   provider=provider, warmup=1, rounds=None if ON_GPU else 5)  # fmt: skip
    benchmark.extra_info["img/s"] = round(batch / median, 1)


ATTN_JVP_SHAPES = [(16, 6, 1024, 64), (64, 8, 256, 64)] if ON_GPU else [(4, 6, 1024, 64)]


@pytest.mark.parametrize("provider", ["cmkernels-forward", "cmkernels-jvp", "eager-math-jvp"])
@pytest.mark.parametrize(
    "B, H, T, d", ATTN_JVP_SHAPES, ids=[f"B{b}-H{h}-T{t}-d{d}" for b, h, t, d in ATTN_JVP_SHAPES]
)
def test_attention_jvp_op(benchmark, B, H, T, d, provider):
    """The attention JVP alone on the packed layout. TFLOP/s counts the forward's matmul work
    (4 B H T^2 d) times 3 for the JVP rows: an ideal JVP costs about three forwards, so a JVP row
    at the forward's TFLOP/s is at the ideal (rCM's FlashAttention-JVP accounting)."""
    from cmkernels.ops import attention, attention_with_tangent

    dtype = torch.bfloat16 if ON_GPU else torch.float32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, 3 * H * d, T, generator=g).to(DEVICE, dtype)
    tqkv = torch.randn(B, 3 * H * d, T, generator=g).to(DEVICE, dtype)
    flops = 4 * B * H * T * T * d
    if provider == "cmkernels-forward":
        fn = lambda: attention(qkv, H)  # noqa: E731
    elif provider == "cmkernels-jvp":
        fn = lambda: attention_with_tangent(qkv, tqkv, H)  # noqa: E731
        flops *= 3
    else:
        fn = lambda: torch.func.jvp(lambda x: attention_math(x, H), (qkv,), (tqkv,))  # noqa: E731
        flops *= 3

    def call():
        with torch.no_grad():
            return fn()

    timed(benchmark, call, group=f"attention-jvp-B{B}-H{H}-T{T}-d{d}-{str(dtype)[6:]}",
          provider=provider, flops=flops, rounds=None if ON_GPU else 5)  # fmt: skip
    benchmark.extra_info["peak_mem_mb"] = round(peak_memory_bytes(call) / 2**20, 1)
