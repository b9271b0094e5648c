"""Shared set-up of the benchmark suite (pytest-benchmark).

Conventions: one benchmark group per (op, mode, dtype, shape) with the providers side by side;
`timed(benchmark, fn, ...)` synchronises CUDA inside the timed call, runs warm-up (compilation,
autotuning) outside the timed rounds and records it, and fills `extra_info` with the device,
versions and achieved bandwidth.
"""

from __future__ import annotations

import platform
import time

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(DEVICE)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def timed(
    benchmark,
    fn,
    *,
    group: str,
    provider: str,
    bytes_moved: float | None = None,
    flops: float | None = None,
    warmup: int = 2,
    rounds: int | None = None,
):
    """Benchmark fn() under `group`, after `warmup` untimed calls; returns fn's last result."""
    benchmark.group = group
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    warmup_s = time.perf_counter() - t0
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()

    def call():
        out = fn()
        sync()
        return out

    if rounds is None:
        out = benchmark(call)
    else:
        out = benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median if benchmark.stats else None  # robust on shared machines
    info = benchmark.extra_info
    info.update(provider=provider, device=device_name(), warmup_s=round(warmup_s, 3), **versions())
    if ON_GPU:
        info["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if median:
        if bytes_moved:
            info["GB/s"] = round(bytes_moved / median / 1e9, 2)
        if flops:
            info["TFLOP/s"] = round(flops / median / 1e12, 3)
    return out
