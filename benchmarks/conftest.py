"""Shared set-up of the benchmark suite (pytest-benchmark).

Conventions:

- one benchmark group per (op, mode, dtype, shape), the providers side by side; every group has
  `eager` (what a careful user writes in plain PyTorch), `torch.compile` (that code compiled) and
  `cmkernels` (our ops); `extra_info["provider"]` names the row.
- `timed(benchmark, fn, ...)` runs the warm-up (compilation, autotuning, graph capture) outside the
  timed rounds and records its duration, then times fn:
  * on the CPU with pytest-benchmark's own timer (one call per measurement, synchronous);
  * on CUDA with CUDA events around N back-to-back calls, N chosen so one measurement takes
    >= ~1 ms: no host synchronisation per call, so microsecond kernels are not measured as
    launch + sync latency. pytest-benchmark's statistics are then those of the N-call batch;
    the per-call figures are in `extra_info` (`per_call_median_s`, `per_call_min_s`,
    `calls_per_round`), and `cmkernels.bench_report` uses them.
- `compile_case(fn)` compiles for ONE benchmark case (one shape, dtype and mode): it resets
  dynamo first, so caches and the recompile limit never carry over from another case, and uses
  `fullgraph=True`, so a graph break is an error. `timed(..., compiled=True)` runs the timed
  rounds under `torch.compiler.set_stance("fail_on_recompile")`: a guard failure after warm-up
  fails the benchmark instead of silently timing a recompile or an eager fallback.
- `cuda_graph(fn)` captures fn() in a `torch.cuda.CUDAGraph` after a warm-up on a side stream and
  returns a function that replays it.
- on CUDA too, --benchmark-max-time bounds each benchmark's timed rounds (at least 5 rounds), so
  a GPU run of the headline rows (`-m headline`, or `-k` on provider, dtype, preset in the test
  ids) fits a few minutes; compilation and warm-up come on top.
"""

from __future__ import annotations

import gc
import math
import platform
import statistics
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# GPU: bounds on the number of timed rounds; their total time is bounded by --benchmark-max-time
# (read in pytest_configure), as pytest-benchmark's own calibration bounds it on the CPU.
MAX_TIME_S = 1.0
MIN_ROUNDS, MAX_ROUNDS = 5, 50
GPU_ROUND_S = 1e-3  # one CUDA-event measurement covers at least this long


def pytest_configure(config):
    global MAX_TIME_S
    MAX_TIME_S = float(config.getoption("benchmark_max_time", MAX_TIME_S))
    config.addinivalue_line(
        "markers", "headline: the end-to-end rows of the GPU proof (imagenet64 one-step latency "
        "at batch 1, training step img/s)"
    )  # fmt: skip


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


def skip_unavailable(provider: str) -> None:
    """Skip, with the reason, a provider this machine cannot run (CUDA graphs without CUDA)."""
    if provider.endswith("cudagraph") and not ON_GPU:
        pytest.skip(f"{provider}: CUDA graphs need a CUDA device")


def _runtime_dispatch_keys() -> list:
    keys = []
    for name in dir(torch._C.DispatchKey):
        key = getattr(torch._C.DispatchKey, name)
        if isinstance(key, torch._C.DispatchKey) and not torch._C._dispatch_is_alias_key(key):
            keys.append(key)
    return keys


@contextmanager
def keeps_dispatch_state():
    """Restores the dispatcher's thread-local include and exclude sets after the block (a garbage
    collection first). A torch.compile of torch.func.jvp that fails to trace (torch 2.14) leaves
    objects whose finalisers, whenever the collector gets to them, restore the key sets of a frame
    deep inside the transform (autograd and functorch excluded): every later test in the process
    then builds no autograd graph ("element 0 of tensors does not require grad"), at a point that
    depends on the collector's timing."""
    keys = _runtime_dispatch_keys()
    saved = [
        (k, torch._C._dispatch_tls_is_dispatch_key_excluded(k),
         torch._C._dispatch_tls_is_dispatch_key_included(k))
        for k in keys
    ]  # fmt: skip
    try:
        yield
    finally:
        gc.collect()
        for k, excluded, included in saved:
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, excluded)
            torch._C._dispatch_tls_set_dispatch_key_included(k, included)


def compile_case(fn, *, reset: bool = True, **options):
    """torch.compile(fn) for one benchmark case: static shapes, one graph or an error, and (unless
    reset=False, for the second and later functions of the same case) dynamo's state reset first,
    so no cache entry or recompile count carries over from another case."""
    if reset:
        torch.compiler.reset()
    return torch.compile(fn, fullgraph=True, dynamic=False, **options)


def cuda_graph(fn, warmup: int = 3):
    """Capture fn() in a CUDA graph (after `warmup` calls on a side stream, which run lazy
    initialisation, Triton compilation and cuBLAS workspace allocation outside the capture) and
    return replay(), which replays it and returns the captured outputs (overwritten in place)."""
    skip_unavailable("cudagraph")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    sync()

    def replay():
        graph.replay()
        return out

    return replay


def _event_seconds(fn, calls: int) -> float:
    """Seconds per call of `calls` back-to-back calls of fn, timed by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def _time_gpu(benchmark, fn, rounds: int | None, max_time_s: float):
    """CUDA-event timing: N calls per round, N such that a round takes >= GPU_ROUND_S."""
    sync()
    probe = min(_event_seconds(fn, 1) for _ in range(3))
    calls = max(1, min(10_000, math.ceil(GPU_ROUND_S / max(probe, 1e-7))))
    if rounds is None:
        rounds = int(max_time_s / (calls * probe))
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, rounds))
    per_call: list[float] = []
    benchmark.pedantic(lambda: per_call.append(_event_seconds(fn, calls)),
                       rounds=rounds, iterations=1, warmup_rounds=0)  # fmt: skip
    q = statistics.quantiles(per_call, n=4) if len(per_call) > 1 else per_call * 3
    benchmark.extra_info.update(
        timer="cuda-events",
        calls_per_round=calls,
        per_call_median_s=statistics.median(per_call),
        per_call_min_s=min(per_call),
        per_call_iqr_s=q[2] - q[0],
    )
    return benchmark.extra_info["per_call_median_s"]


def _time_cpu(benchmark, fn, rounds: int | None):
    """pytest-benchmark's timer; without `rounds` it calibrates rounds and iterations itself
    (bounded by --benchmark-max-time)."""
    if rounds is None:
        benchmark(fn)
    else:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["timer"] = "pytest-benchmark"
    return benchmark.stats.stats.median if benchmark.stats else None


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
    compiled: bool = False,
    max_time_s: float | None = None,
):
    """Benchmark fn() under `group` after `warmup` untimed calls; `compiled`: fn runs
    torch.compile'd code, and the timed rounds fail on any recompilation."""
    benchmark.group = group
    info = benchmark.extra_info
    info.update(provider=provider, device=device_name(), **versions())
    if compiled:
        warmup = max(warmup, 2)  # compile, then one call of the compiled code
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    info["warmup_s"] = round(time.perf_counter() - t0, 3)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    no_recompile = torch.compiler.set_stance("fail_on_recompile") if compiled else nullcontext()
    with no_recompile:
        if ON_GPU:
            median = _time_gpu(benchmark, fn, rounds, max_time_s or MAX_TIME_S)
        else:
            median = _time_cpu(benchmark, fn, rounds)
    if ON_GPU:
        info["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if median:
        info["per_call_s"] = median
        if bytes_moved:
            info["GB/s"] = round(bytes_moved / median / 1e9, 2)
        if flops:
            info["TFLOP/s"] = round(flops / median / 1e12, 4)
    return median
