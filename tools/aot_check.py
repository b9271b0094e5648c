"""Compile every Triton kernel of cmkernels for GPUs this machine need not have (sm_90, sm_80), in
exactly the specialisations the JIT builds on such a GPU, and check registers, spills and shared
memory against the hardware limits.

One file of some 1,200 lines on purpose: a standalone script run from the checkout (CI, the GPU
proof), not part of the installed package, whose five sections (the package's kernels, recording,
workloads, compiling, rows and tables, command line) serve only each other; they are marked below.

How it works:
1. Record. The package's own launchers (attention_triton, attention_backward_triton,
   attention_bhtd_triton, attention_bhtd_backward_triton, groupnorm_silu_triton,
   groupnorm_silu_backward_triton) run on fake CUDA tensors (torch's FakeTensorMode: shapes,
   strides and storage offsets, no memory, no GPU) at the shapes of the tests, the benchmarks and
   the UNet presets, for every dtype, with CMKERNELS_AUTOTUNE=1 and =0. Triton's JIT binds each
   launch as it would on the GPU (pointer alignment and divisibility-by-16 attributes, ints equal
   to 1, constexprs, options) under a stand-in driver for the target, and hands the result to
   ``triton.knobs.runtime.jit_cache_hook``, which records it and skips the compile and the launch.
   The autotuners prune and "benchmark" every config as usual (the stand-in benchmarker runs each
   config's launch once, so all of them are recorded). Two torch.cuda calls that need a driver
   are stubbed for the duration: ``torch.cuda.device`` (the launchers' device guard) and
   ``torch.cuda.get_device_properties`` (the SM count, which the groupnorm launcher's split
   depends on: 132 for sm_90 (H100 SXM / H200), 108 for sm_80 (A100)).
2. Select. A specialisation is what triton.compile gets; JIT cache keys that differ only in how
   the options were spelled share one. By default one specialisation per launch configuration
   (kernel, argument types, the kernel's constexprs, warps, stages) is compiled: the UNet's or a
   benchmark's launch where there is one, else the best-aligned variant; left out are the
   configurations only the autotuners reach at the tests' attention shapes (head dims 8..128 at
   small T; their configs at head dims 32 and 64 come from the UNet and the benchmarks, and the
   heuristic's configs at every head dim are compiled). ``--full`` compiles every recorded
   specialisation (about 4700 on triton 3.8, some 30 minutes on 2 cores).
3. Compile in worker processes (a throw-away TRITON_CACHE_DIR): ``triton.compile`` for
   GPUTarget("cuda", arch, 32); ptxas's own -v log (TRITON_DUMP_PTXAS_LOG) gives registers and
   spills, the compiled metadata the shared memory. A compiler abort becomes an error row.
4. Check. Shared memory per block (sm_90: 232448 B, sm_80: 166912 B), registers per thread (255)
   and per block (65536, allocated per warp in units of 256), threads per block (1024), grid
   (x < 2^31, y and z <= 65535) for the grids the recorded launches used. Spills are reported,
   not failed.

    python tools/aot_check.py            # -> benchmarks/results/aot-sm90-sm80.md, .json.gz
    python tools/aot_check.py --arch 90 -j 2 --out /tmp/aot
    python tools/aot_check.py --quick    # bf16; the benchmarks' shapes, imagenet64 and gray32 UNets
    python tools/aot_check.py --full     # every specialisation (files named ...-full)

Exit status 1 on a compile error, a limit violation, or a package kernel that no recorded
workload launches (add its launcher below). Needs triton's compiled JIT: TRITON_INTERPRET must be
unset.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import resource
import shutil
import sys
import tempfile
import time
import types
from multiprocessing import connection as mp_connection
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results"
ARCHS = (90, 80)
# Per compute capability: SMs of the GPU the recording pretends to be, the largest shared memory
# a block may opt into, and the shared memory of one SM (for the occupancy estimate).
GPUS = {
    90: dict(name="H100 SXM / H200", sms=132, max_shared=232448, sm_shared=233472),
    80: dict(name="A100", sms=108, max_shared=166912, sm_shared=167936),
}
MAX_REGS_THREAD = 255
MAX_REGS_BLOCK = 65536
MAX_REGS_SM = 65536
MAX_THREADS_BLOCK = 1024
MAX_THREADS_SM = 2048
MAX_BLOCKS_SM = 32
SHARED_RESERVED = 1024  # per block, taken by the driver
MAX_GRID = (2**31 - 1, 65535, 65535)
_BASE_ADDRESS = 1 << 32  # of every fake allocation; the caching allocator aligns to 512 B
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _module(name: str) -> types.ModuleType:
    # importlib, not `import cmkernels.ops.attention`: cmkernels.ops re-exports a function of
    # that name, which shadows the submodule as an attribute.
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------------
# The package's kernels.


def _op_modules() -> list[types.ModuleType]:
    """Every module of cmkernels.ops, the op packages' submodules included."""
    ops = _module("cmkernels.ops")
    return [ops] + [
        _module(info.name) for info in pkgutil.walk_packages(ops.__path__, prefix="cmkernels.ops.")
    ]


def package_kernels() -> dict[str, JITFunction]:
    """Every @triton.jit function of cmkernels.ops that is launched, by "module:name". Device
    functions (called by name from another jitted function, such as _mma or _load_tile) are
    compiled as part of their callers and left out."""
    found = {}
    for mod in _op_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                found[f"{mod.__name__}:{name}"] = obj
    sources = {k: f.src for k, f in found.items()}
    return {
        k: f
        for k, f in found.items()
        if not any(re.search(rf"\b{f.__name__}\s*\(", s) for k2, s in sources.items() if k2 != k)
    }


def _resolve(kernel: str) -> JITFunction:
    mod, name = kernel.split(":")
    return getattr(_module(mod), name)


# ------------------------------------------------------------------------------------------------
# Recording: the launchers on fake CUDA tensors, the JIT under a stand-in driver.


@dataclasses.dataclass
class Spec:
    """One specialisation of one kernel for one target: what triton.compile gets (signature with
    its attributes, constexprs, options). JIT cache keys that differ only in how the options were
    spelled (an autotune config passes num_ctas=1, a plain launch does not) share one Spec."""

    kernel: str  # "module:name"
    arch: int
    data: str  # triton's specialization_data (JSON) without the JIT key
    keys: set = dataclasses.field(default_factory=set)  # the JIT cache keys
    launches: int = 0
    grid: list = dataclasses.field(default_factory=lambda: [0, 0, 0])  # largest per axis
    sources: set = dataclasses.field(default_factory=set)  # workload labels
    variants: int = 1  # recorded specs of the same configuration (set by select)

    def config(self) -> tuple:
        """The launch configuration: kernel, argument types (an int the JIT specialises to 1
        drops out of them: T = 1 or a unit stride compiles to other code), the kernel's own
        constexpr parameters, options; everything but the alignment / divisibility attributes."""
        d = json.loads(self.data)
        declared = {p.num for p in _resolve(self.kernel).params if p.is_constexpr}
        types_ = [t for t in d["signature"].values() if t != "constexpr"]
        consts = [
            (k, v) for k, v in zip(d["constant_keys"], d["constant_vals"]) if k[0] in declared
        ]
        return self.kernel, json.dumps(types_), json.dumps(consts), json.dumps(d["options"])

    def dtype(self) -> str:
        """The element type of the kernel's first pointer argument (x, or q)."""
        sig = json.loads(self.data)["signature"]
        return next((str(t)[1:] for t in sig.values() if str(t).startswith("*")), "?")

    def production(self) -> bool:
        return any(s.startswith(("unet:", "bench:")) for s in self.sources)

    def in_default(self) -> bool:
        """Compiled without --full: launched by anything but the autotuners at the tests'
        attention shapes (their configs at head dims 32 and 64 come from the UNet and the
        benchmarks; at the tests' other head dims the heuristic's configs are compiled)."""
        return any(s != "tests:attention" for s in self.sources)


class _DevicePointer:
    """What triton's binder reads of a tensor argument: dtype and address (for the 16-byte
    alignment attribute). Fresh allocations are aligned; a view adds its storage offset."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = _BASE_ADDRESS + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


class _StandInDriver:
    """The parts of a triton driver the JIT and the autotuner call, for one target. The device
    index is the compute capability, so each target keeps its own JIT caches."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cuda", 0)

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()  # records the config's launch; every config "takes" the same time
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench


class Recorder:
    """Context manager: while active, launches of the package's kernels are recorded for `arch`
    instead of compiled and run. `label` names the workload in the records."""

    def __init__(self, arch: int):
        self.arch = arch
        self.specs: dict[tuple[str, str], Spec] = {}
        self.label = ""
        self._last: Spec | None = None
        self._kernels = package_kernels()
        self._names = {id(f): k for k, f in self._kernels.items()}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Recorder:
        gpu = GPUS[self.arch]
        stack = self._stack
        # driver.active would create the real driver (and fail without a GPU): save the slot.
        stack.callback(setattr, driver, "_active", driver._active)
        driver.set_active(_StandInDriver(self.arch))
        stack.enter_context(knobs.runtime.scope())  # restores the knobs on exit
        knobs.runtime.jit_cache_hook = self._hook
        stack.enter_context(knobs.autotuning.scope())
        knobs.autotuning.cache = False  # a disk-cached tuning result would skip configs
        props = types.SimpleNamespace(
            name=gpu["name"],
            multi_processor_count=gpu["sms"],
            major=self.arch // 10,
            minor=self.arch % 10,
        )
        for name, stub in (
            ("device", lambda device=None: contextlib.nullcontext()),
            ("get_device_properties", lambda device=None: props),
        ):
            stack.callback(setattr, torch.cuda, name, getattr(torch.cuda, name))
            setattr(torch.cuda, name, stub)
        for tuner in self._autotuners():  # tune afresh for this target; restore afterwards
            stack.callback(setattr, tuner, "cache", tuner.cache)
            tuner.cache = {}
        for fn in self._kernels.values():
            stack.callback(self._unwrap, fn)
            self._wrap(fn)
        stack.enter_context(FakeTensorMode())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _autotuners(self) -> list[Autotuner]:
        # The autotuned kernels live beside the launchers, not always in the kernels' module.
        return [
            obj for m in _op_modules() for obj in vars(m).values() if isinstance(obj, Autotuner)
        ]

    def _wrap(self, fn: JITFunction) -> None:
        run = fn.run
        signature = inspect.signature(fn.fn)
        recorder = self

        def recording_run(*args, grid, warmup, **kwargs):
            args = tuple(_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {
                k: _DevicePointer(v) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()
            }
            recorder._last = None
            run(*args, grid=grid, warmup=warmup, **kwargs)
            spec = recorder._last
            if spec is None:
                raise RuntimeError(f"{fn.__name__}: the launch did not reach triton's compile hook")
            if callable(grid):
                params = {k: v for k, v in kwargs.items() if k in signature.parameters}
                bound = signature.bind(*args, **params)
                bound.apply_defaults()
                grid = grid(bound.arguments)
            grid = tuple(grid) + (1,) * (3 - len(grid))
            spec.grid = [max(a, int(b)) for a, b in zip(spec.grid, grid)]
            return None

        fn.run = recording_run

    def _unwrap(self, fn: JITFunction) -> None:
        fn.__dict__.pop("run", None)
        fn.device_caches.pop(self.arch, None)

    def _hook(self, *, key, fn, compile, **_) -> bool:
        name = self._names.get(id(fn.jit_function))
        if name is None:  # a JIT function outside the package: not ours to record
            return False
        data = json.loads(compile["specialization_data"])
        data.pop("key", None)
        data = json.dumps(data)  # signature order = argument order, as triton wrote it
        spec = self.specs.get((name, data))
        if spec is None:
            spec = self.specs[name, data] = Spec(name, self.arch, data)
        spec.keys.add(str(key))
        spec.launches += 1
        spec.sources.add(self.label)
        self._last = spec
        return True  # skip the compile; the launch is skipped with it


# ------------------------------------------------------------------------------------------------
# Workloads: what the tests, the benchmarks and the UNet presets launch. Every function below runs
# inside a Recorder (fake CUDA tensors) and calls the package's launchers only.


def _empty(*shape, dtype):
    return torch.empty(*shape, device="cuda", dtype=dtype)


def attention_case(layout: str, B: int, H: int, T: int, d: int, dtype, backward: bool = True):
    """Forward (and backward) and JVP of the attention launchers on one layout:
    packed    qkv [B, 3*H*d, T] contiguous (the UNet's layout);
    packed_tc qkv stored [B, T, 3*H*d] seen as [B, 3*H*d, T], grad_out strided in T;
    bhtd      q, k, v [B, H, T, d] contiguous;
    bthd      q, k, v stored [B, T, H, d]; bt3hd: views of one [B, T, 3, H, d]."""
    A = _module("cmkernels.ops.attention")
    if layout.startswith("packed"):
        C = H * d
        if layout == "packed":
            qkv, grad = _empty(B, 3 * C, T, dtype=dtype), _empty(B, C, T, dtype=dtype)
        else:
            qkv = _empty(B, T, 3 * C, dtype=dtype).transpose(1, 2)
            grad = _empty(B, C, 2 * T, dtype=dtype)[:, :, ::2]
        out, lse = A.attention_triton(qkv, H)
        if backward:
            A.attention_backward_triton(grad, qkv, out, lse, H)
        A.attention_jvp_triton(qkv, torch.empty_like(qkv), H)  # forward-mode AD (continuous time)
        return
    if layout == "bhtd":
        q, k, v = (_empty(B, H, T, d, dtype=dtype) for _ in range(3))
    elif layout == "bthd":
        q, k, v = (_empty(B, T, H, d, dtype=dtype).transpose(1, 2) for _ in range(3))
    elif layout == "bt3hd":
        q, k, v = _empty(B, T, 3, H, d, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        raise ValueError(f"unknown attention layout {layout!r}")
    out, lse = A.attention_bhtd_triton(q, k, v)
    if backward:
        A.attention_bhtd_backward_triton(_empty(B, H, T, d, dtype=dtype), q, k, v, out, lse)
    A.attention_bhtd_jvp_triton(q, k, v, *(torch.empty_like(q) for _ in range(3)))


def groupnorm_case(
    shape,
    groups,
    dtype,
    layout="contiguous",
    modulate=True,
    activation=True,
    param_dtype=torch.float32,
    scale_dtype=None,
):
    """Forward, backward and JVP of the groupnorm launchers; layout: contiguous, channels_last or
    strided (a view with a step of 2 in the last dimension)."""
    G = _module("cmkernels.ops.groupnorm_silu")
    N, C = shape[:2]
    if layout == "channels_last":
        x = _empty(*shape, dtype=dtype).to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = _empty(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    else:
        x = _empty(*shape, dtype=dtype)
    w, b = _empty(C, dtype=param_dtype), _empty(C, dtype=param_dtype)
    sdt = scale_dtype or param_dtype
    s, sh = (_empty(N, C, dtype=sdt), _empty(N, C, dtype=sdt)) if modulate else (None, None)
    y, mean, rstd = G.groupnorm_silu_triton(x, w, b, s, sh, groups, 1e-5, activation)
    G.groupnorm_silu_backward_triton(
        torch.empty_like(y), x, w, b, s, sh, mean, rstd, groups, activation
    )
    # Forward-mode AD (continuous-time CMs): x and the modulation carry tangents, as in the UNet.
    tx = torch.empty_like(x)
    ts, tsh = (torch.empty_like(s), torch.empty_like(sh)) if modulate else (None, None)
    G.groupnorm_silu_jvp_triton(x, tx, w, None, b, None, s, ts, sh, tsh, groups, 1e-5, activation)


def unet_sites(preset: str, batch: int) -> tuple[list, list]:
    """(groupnorm calls, attention calls) of one forward of a UNet preset, as argument records:
    ((shape, groups, modulate, activation), ...) and ((B, H, T, d), ...). The network runs on fake
    tensors with ops="reference"; its op hooks record the call and return the reference result."""
    unet = _module("cmkernels.unet")
    cfg = unet.get_preset(preset, ops="reference", dropout=0.0)
    gn_calls, attn_calls = [], []
    with FakeTensorMode(), torch.device("cuda"):
        model = unet.UNet(cfg)
        ops = model.ops
        gn, attn = ops.gn, ops.attention

        def record_gn(x, norm, scale=None, shift=None, activation=True):
            gn_calls.append((tuple(x.shape), norm.num_groups, scale is not None, activation))
            return gn(x, norm, scale, shift, activation)

        def record_attention(qkv, num_heads):
            B, C3, T = qkv.shape
            attn_calls.append((B, num_heads, T, C3 // (3 * num_heads)))
            return attn(qkv, num_heads)

        ops.gn, ops.attention = record_gn, record_attention
        x = torch.empty(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        labels = torch.zeros(batch, dtype=torch.long) if cfg.num_classes else None
        model(x, torch.empty(batch), labels)
    return sorted(set(gn_calls)), sorted(set(attn_calls))


# Attention shapes (label, layout, B, H, T, d, backward). tests/test_attention.py: the packed
# kernels at T 1..97 and d 16/32/64, other head dims (128; 8, 24, 40 zero-padded), a
# non-contiguous packed qkv, the split layouts, and the GPU-only sizes up to T = 4096;
# benchmarks/test_bench_attention.py: d = 64 at (T, C) = (4096, 192) ... (64, 768).
def _attention_shapes(quick: bool) -> list[tuple]:
    shapes = []
    if not quick:
        for d in (16, 32, 64):
            for T in (1, 7, 64, 97):
                shapes.append(("tests:attention", "packed", 2 if T < 64 else 1, 2, T, d, True))
        for d in (128, 8, 24, 40):
            shapes.append(("tests:attention", "packed", 1, 2, 33, d, True))
        shapes.append(("tests:attention", "packed_tc", 2, 2, 37, 16, True))
        for layout in ("bhtd", "bthd", "bt3hd"):
            shapes.append(("tests:attention", layout, 2, 2, 45, 32, True))
        for T, d in (
            (64, 64),
            (256, 64),
            (1024, 64),
            (1025, 64),
            (4096, 64),
            (1024, 128),
            (4096, 16),
        ):
            shapes.append(("tests:attention", "packed", 2, 2, T, d, True))
        shapes.append(("tests:attention", "bhtd", 4, 6, 1024, 64, False))
        shapes.append(("tests:attention", "packed", 4, 6, 1024, 64, False))
        shapes.append(("tests:attention", "packed", 2, 4, 256, 64, False))
    bench_batches = {4096: (1, 16), 1024: (1, 64), 256: (1, 256), 64: (1, 256)}
    for T, C in ((4096, 192), (1024, 384), (256, 576), (64, 768)):
        for B in bench_batches[T]:
            shapes.append(("bench:attention", "packed", B, C // 64, T, 64, True))
    return shapes


# Groupnorm shapes (label, shape, groups, layout, modulate, activation, param dtype, scale dtype;
# None = x's dtype). tests/test_groupnorm_silu.py: odd sizes and channels per group in every
# layout, half-precision parameters, the CUDA sizes; benchmarks/test_bench_groupnorm_silu.py:
# channels_last at the UNet widths with fp32 or x-dtype weights.
def _groupnorm_shapes(quick: bool) -> list[tuple]:
    shapes = []
    f32 = torch.float32
    if not quick:
        for shape, groups in (
            ((2, 12, 5, 7), 4),
            ((3, 48, 9, 11), 8),
            ((1, 192, 8, 8), 32),
            ((2, 8, 70, 70), 2),
            ((2, 32, 13), 8),
        ):
            for layout in ("contiguous", "channels_last", "strided"):
                if layout == "channels_last" and len(shape) != 4:
                    continue
                modulate, activation = shape[1] != 8, shape[1] != 12
                shapes.append(
                    ("tests:groupnorm", shape, groups, layout, modulate, activation, f32, f32)
                )
        shapes.append(("tests:groupnorm", (2, 16, 6, 5), 4, "contiguous", True, True, None, None))
        for shape in ((4, 192, 64, 64), (1, 384, 32, 32), (64, 576, 16, 16), (3, 96, 17, 5)):
            for layout in ("contiguous", "channels_last"):
                shapes.append(("tests:groupnorm", shape, 32, layout, True, True, f32, f32))
        shapes.append(
            ("tests:groupnorm", (8, 64, 16, 16), 32, "channels_last", True, True, f32, f32)
        )
    for n, c, r in (
        (1, 192, 64),
        (32, 192, 64),
        (256, 192, 64),
        (64, 384, 32),
        (256, 576, 16),
        (256, 768, 8),
        (16, 512, 32),
        (128, 64, 64),
    ):
        for param in (f32, None):
            shapes.append(
                ("bench:groupnorm", (n, c, r, r), 32, "channels_last", True, True, param, None)
            )
    return shapes


# UNet presets and batches: the e2e benchmark's (gray32 and imagenet64, batch 1 / 32 / 256) and the
# other presets at batch 1 and 32. Sites run with fp32 GroupNorm parameters and modulation and
# activations in the compute dtype (what bf16 autocast gives), contiguous NCHW.
def _unet_runs(quick: bool) -> list[tuple[str, int]]:
    runs = [
        ("imagenet64", 1),
        ("imagenet64", 32),
        ("imagenet64", 256),
        ("gray32", 1),
        ("gray32", 32),
        ("gray32", 256),
    ]
    if not quick:
        runs += [
            ("lsun256", 1),
            ("lsun256", 32),
            ("gray28", 1),
            ("gray28", 32),
            ("rgb32", 1),
            ("rgb32", 32),
        ]
    return runs


def workloads(quick: bool = False):
    """Yield (label, kind, dtype name, callable) for every recorded launch sequence; kind is
    "attention" (its launches depend on CMKERNELS_AUTOTUNE) or "groupnorm"."""
    dtypes = ["bf16"] if quick else list(_DTYPES)
    sites = {run: unet_sites(*run) for run in _unet_runs(quick)}
    for dt in dtypes:
        dtype = _DTYPES[dt]
        for label, layout, B, H, T, d, bwd in _attention_shapes(quick):
            case = lambda a=(layout, B, H, T, d, dtype, bwd): attention_case(*a)  # noqa: E731
            yield label, "attention", dt, case
        for label, shape, groups, layout, mod, act, pdt, sdt in _groupnorm_shapes(quick):
            kw = dict(
                layout=layout,
                modulate=mod,
                activation=act,
                param_dtype=pdt or dtype,
                scale_dtype=sdt or dtype,
            )
            case = lambda a=(shape, groups, dtype), kw=kw: groupnorm_case(*a, **kw)  # noqa: E731
            yield label, "groupnorm", dt, case
        for (preset, _), (gn_calls, attn_calls) in sites.items():
            label = f"unet:{preset}"
            for B, H, T, d in attn_calls:
                case = lambda a=("packed", B, H, T, d, dtype): attention_case(*a)  # noqa: E731
                yield label, "attention", dt, case
            for shape, groups, mod, act in gn_calls:
                kw = dict(modulate=mod, activation=act, scale_dtype=dtype)
                case = lambda a=(shape, groups, dtype), kw=kw: groupnorm_case(*a, **kw)  # noqa: E731
                yield label, "groupnorm", dt, case


HEURISTIC = " (CMKERNELS_AUTOTUNE=0)"  # label suffix of the launches with the fixed heuristic


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def record(arch: int, cases) -> Recorder:
    """Run the (label, kind, dtype, fn) cases for `arch`: all of them with the autotuners on
    (the default), then the attention ones again with CMKERNELS_AUTOTUNE=0."""
    cases = list(cases)
    with Recorder(arch) as rec:
        for autotune, suffix in (("1", ""), ("0", HEURISTIC)):
            with _env("CMKERNELS_AUTOTUNE", autotune):
                for label, kind, _, fn in cases:
                    if autotune == "1" or kind == "attention":
                        rec.label = label + suffix
                        fn()
    return rec


def check_coverage(rec: Recorder) -> list[str]:
    launched = {name for name, _ in rec.specs}
    return [
        f"{k}: never launched by the recorded workloads (add its launcher to tools/aot_check.py)"
        for k in rec._kernels
        if k not in launched
    ]


def _rank(spec: Spec) -> tuple:
    d = json.loads(spec.data)
    aligned = sum(bool(v) for v in d["attrs_vals"])
    return (not spec.production(), -aligned, min(spec.keys))


def select(specs: list[Spec], full: bool) -> list[Spec]:
    """The specs to compile: all of them (full), or of those Spec.in_default, one per launch
    configuration (Spec.config): a production launch (UNet presets, benchmarks) where there is
    one, else the best-aligned variant (most divisibility attributes: the one whose loads
    pipeline through shared memory). Sets each chosen spec's `variants`: the recorded specs of
    its configuration."""
    by_config: dict[tuple, list[Spec]] = {}
    for s in specs:
        by_config.setdefault(s.config(), []).append(s)
    chosen = []
    for group in by_config.values():
        for s in group:
            s.variants = len(group)
        if full:
            chosen += group
        elif any(s.in_default() for s in group):
            chosen.append(min((s for s in group if s.in_default()), key=_rank))
    return chosen


# ------------------------------------------------------------------------------------------------
# Compiling.


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _constant(value):
    # The inverse of triton's serialisation of a constexpr value (JITFunction.preload).
    import triton.language as tl

    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(_tuples(value["constexpr"]))
    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    return _tuples(value)


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spills": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def compile_spec(kernel: str, arch: int, data: str) -> dict:
    """Compile one recorded specialisation for GPUTarget("cuda", arch, 32); returns registers,
    spills (bytes stored + loaded), shared memory (bytes) and compile seconds, or an error."""
    spec = json.loads(data)
    fn = _resolve(kernel)
    signature = {k: _tuples(v) for k, v in spec["signature"].items()}
    constexprs = {
        tuple(k): _constant(v) for k, v in zip(spec["constant_keys"], spec["constant_vals"])
    }
    attrs = {tuple(k): v for k, v in zip(spec["attrs_keys"], spec["attrs_vals"])}
    options = {k: _tuples(v) for k, v in spec["options"].items()}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    start, cpu = time.perf_counter(), _cpu_seconds()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # ptxas runs with -v; print its log (to `log`)
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
            knobs.compilation.store_binary_only = True  # fewer files in the throw-away cache
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # reported as a failed row
        lines = [ln for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        return dict(
            error=" | ".join(lines[:6])[:600],
            seconds=time.perf_counter() - start,
            cpu_seconds=_cpu_seconds() - cpu,
        )
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    text = log.getvalue()
    entry = text.split(f"Function properties for {fn.__name__}")[-1]
    regs = _PTXAS["regs"].search(entry)
    if regs is None:
        return dict(
            error="ptxas -v log not found (no register count)", seconds=seconds, cpu_seconds=cpu
        )
    spills = _PTXAS["spills"].search(entry)
    stack = _PTXAS["stack"].search(entry)
    static_smem = _PTXAS["smem"].search(regs.string[regs.start() :].splitlines()[0])
    md = compiled.metadata
    return dict(
        regs=int(regs.group(1)),
        spill_stores=int(spills.group(1)) if spills else 0,
        spill_loads=int(spills.group(2)) if spills else 0,
        stack=int(stack.group(1)) if stack else 0,
        shared=int(md.shared) + (int(static_smem.group(1)) if static_smem else 0),
        seconds=seconds,
        cpu_seconds=cpu,
    )


def _worker(tasks, conn, cache_dir: str) -> None:
    # One compile process. Its pipe carries ("start", i) before and ("done", i, result) after each
    # task (sent synchronously), so the parent knows which task a crash belongs to: an LLVM or
    # ptxas abort kills the process rather than raising.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    err = os.open(_stderr_file(cache_dir, os.getpid()), os.O_WRONLY | os.O_CREAT, 0o644)
    os.dup2(err, 2)  # what an abort prints (LLVM ERROR: ...) goes where the parent can read it
    for i, task in iter(tasks.get, None):
        os.ftruncate(2, 0)
        os.lseek(2, 0, os.SEEK_SET)
        conn.send(("start", i))
        conn.send(("done", i, compile_spec(*task)))
    conn.close()


def _stderr_file(cache_dir: str, pid: int) -> str:
    return os.path.join(cache_dir, f"worker-{pid}.stderr")


def compile_all(
    specs: list[Spec], jobs: int, cache_dir: str, progress=None, timeout: float = 900.0
) -> list[dict]:
    """compile_spec for every spec in `jobs` worker processes. A worker that dies, or exceeds
    `timeout` seconds on one spec, turns that spec into an error row and is replaced. Slowest
    kinds first (attention, fp32 before fp16/bf16), so the pool does not end on one slow compile."""
    ctx = get_context("spawn")  # forking a process that holds torch/triton state is unsafe
    order = sorted(
        range(len(specs)),
        reverse=True,
        key=lambda i: ("attn" in specs[i].kernel, specs[i].dtype() == "fp32"),
    )
    tasks = ctx.Queue()
    for i in order:
        tasks.put((i, (specs[i].kernel, specs[i].arch, specs[i].data)))
    out: list[dict | None] = [None] * len(specs)
    workers: dict = {}  # pipe end -> [process, current task or None, its start time]
    finished = idle_deaths = 0

    def spawn() -> None:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(tasks, send, cache_dir), daemon=True)
        proc.start()
        send.close()
        workers[receive] = [proc, None, 0.0]

    def finish(i: int, result: dict) -> None:
        nonlocal finished
        out[i] = result
        finished += 1
        if progress:
            progress(finished, len(specs))

    def retire(conn, why: str | None) -> None:
        nonlocal idle_deaths
        proc, i, since = workers.pop(conn)
        proc.join(timeout=10)
        if i is None:  # died between tasks: it cannot start (import error, ...)
            idle_deaths += 1
            if idle_deaths >= 3:
                raise RuntimeError(
                    f"compile worker processes exit without compiling (exit code "
                    f"{proc.exitcode}; their error is printed above)"
                )
        elif out[i] is None:
            if why is None:
                with contextlib.suppress(OSError):
                    with open(_stderr_file(cache_dir, proc.pid)) as f:
                        why = " | ".join(ln for ln in f.read().splitlines()[-3:] if ln.strip())
                why = f"the compiler process died (exit code {proc.exitcode}): {why or '?'}"
            finish(i, dict(error=why, seconds=time.perf_counter() - since, cpu_seconds=0.0))
        busy = sum(w[1] is not None for w in workers.values())
        if finished + busy < len(specs) and len(workers) < jobs:
            spawn()

    for _ in range(max(1, min(jobs, len(specs)))):
        spawn()
    try:
        while finished < len(specs):
            for conn in mp_connection.wait(list(workers), timeout=1.0):
                try:
                    msg = conn.recv()
                except EOFError:  # the process is gone; its earlier messages were read
                    retire(conn, None)
                    continue
                if msg[0] == "start":
                    workers[conn][1:] = [msg[1], time.perf_counter()]
                else:
                    workers[conn][1] = None
                    finish(msg[1], msg[2])
            for conn, (proc, i, since) in list(workers.items()):
                if i is not None and time.perf_counter() - since > timeout:
                    proc.kill()
                    retire(conn, f"timed out after {timeout:.0f} s")
    finally:
        for _ in workers:
            tasks.put(None)
        for proc, _, _ in workers.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return out


# ------------------------------------------------------------------------------------------------
# Rows, limits, tables.

# Constexprs shown in the table, per kernel family (the others are in the JSON).
_SHOWN = (
    "HEAD_DIM",
    "BLOCK_D",
    "BLOCK_M",
    "BLOCK_N",
    "PAD_D",
    "PRECISION",
    "CPG",
    "BLOCK_C",
    "BLOCK_HW",
    "BLOCK_S",
    "HAS_SCALE",
    "HAS_SHIFT",
    "ACTIVATION",
)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def make_row(spec: Spec, result: dict) -> dict:
    data = json.loads(spec.data)
    names = list(data["signature"])
    consts = {
        names[k[0]]: v for k, v in zip(data["constant_keys"], data["constant_vals"]) if len(k) == 1
    }
    attrs = {names[k[0]]: v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    pointers = [n for n, t in data["signature"].items() if str(t).startswith("*")]
    ints = [n for n, t in data["signature"].items() if t in ("i32", "i64")]
    sig = data["signature"]
    first = str(sig[pointers[0]]).lstrip("*") if pointers else "?"
    dtype = first + "".join(
        f" {n[:-4]}:{str(sig[n]).lstrip('*')}"
        for n in ("w_ptr", "scale_ptr")
        if n in sig and str(sig[n]).lstrip("*") != first
    )
    row = dict(
        kernel=spec.kernel.split(":")[1],
        module=spec.kernel.split(":")[0],
        arch=spec.arch,
        dtype=dtype,
        constexprs={k: v for k, v in consts.items() if k in _SHOWN},
        ones=sorted(
            n
            for n, t in data["signature"].items()
            if t == "constexpr" and n not in _SHOWN and consts.get(n) == 1
        ),
        not_div16=[n for n in pointers + ints if not attrs.get(n)],
        num_warps=data["options"]["num_warps"],
        num_stages=data["options"]["num_stages"],
        launches=spec.launches,
        grid=spec.grid,
        sources=sorted(spec.sources),
        config=hashlib.sha1(json.dumps(spec.config()).encode()).hexdigest()[:12],
        variants=spec.variants,
        keys=sorted(spec.keys),
        **result,
    )
    row["problems"] = limit_problems(row)
    if "regs" in row:
        row["blocks_per_sm"] = blocks_per_sm(row)
    return row


def limit_problems(row: dict) -> list[str]:
    if "error" in row:
        return [f"compile error: {row['error']}"]
    gpu = GPUS[row["arch"]]
    warps = row["num_warps"]
    regs_block = _round_up(row["regs"] * 32, 256) * warps
    problems = []
    if row["shared"] > gpu["max_shared"]:
        problems.append(f"shared memory {row['shared']} B > {gpu['max_shared']} B")
    if row["regs"] > MAX_REGS_THREAD:
        problems.append(f"{row['regs']} registers/thread > {MAX_REGS_THREAD}")
    if regs_block > MAX_REGS_BLOCK:
        problems.append(f"{regs_block} registers/block > {MAX_REGS_BLOCK}")
    if warps * 32 > MAX_THREADS_BLOCK:
        problems.append(f"{warps * 32} threads/block > {MAX_THREADS_BLOCK}")
    for axis, (g, cap) in enumerate(zip(row["grid"], MAX_GRID)):
        if g > cap:
            problems.append(f"grid {'xyz'[axis]} = {g} > {cap}")
    return problems


def blocks_per_sm(row: dict) -> int:
    """Resident blocks per SM allowed by registers, shared memory and threads (an estimate)."""
    gpu = GPUS[row["arch"]]
    warps = row["num_warps"]
    by_regs = MAX_REGS_SM // max(1, _round_up(row["regs"] * 32, 256) * warps)
    by_smem = gpu["sm_shared"] // (row["shared"] + SHARED_RESERVED)
    by_threads = MAX_THREADS_SM // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, MAX_BLOCKS_SM))


def _consts_text(c: dict) -> str:
    short = {"HEAD_DIM": "d", "PRECISION": "prec", "ACTIVATION": "act"}
    return " ".join(
        f"{short.get(k, k)}={int(v) if isinstance(v, bool) else v}" for k, v in c.items()
    )


def _row_text(x: dict) -> str:
    return (
        f"sm_{x['arch']} {x['kernel']} {x['dtype']} {_consts_text(x['constexprs'])} "
        f"w{x['num_warps']} s{x['num_stages']}"
    )


def markdown(rows: list[dict], meta: dict) -> str:
    what = (
        "every recorded specialisation"
        if meta["full"]
        else "one specialisation per launch configuration (the UNet's or a benchmark's launch "
        "where there is one, else the best-aligned variant), leaving out the configurations "
        "only the autotuners reach at the tests' attention shapes (`--full` compiles those and "
        "every alignment variant)"
    )
    out = [
        f"# Triton kernels compiled ahead of time: {', '.join(f'sm_{a}' for a in meta['archs'])}",
        "",
        f"Written by `{meta['command']}` ({meta['date']}; triton {meta['triton']}, torch "
        f"{meta['torch']}; commit {meta['commit']}; {meta['wall_seconds']:.0f} s with "
        f"{meta['jobs']} workers). The package's launchers were run at the shapes of the tests, "
        "the benchmarks and the UNet presets"
        + (
            " (--quick: bf16 only; the benchmarks' shapes and the imagenet64 / gray32 UNets)"
            if meta["quick"]
            else ", for fp16/bf16/fp32"
        )
        + ", with CMKERNELS_AUTOTUNE on and off; triton's JIT specialised every launch as on "
        f"the GPU. Compiled: {what}. The raw rows (JIT keys, grids, workloads, attributes) are "
        "in the .json.gz next to this file.",
        "",
        "Limits checked: shared memory per block (sm_90 232448 B, sm_80 166912 B), 255 "
        "registers/thread, 65536 registers/block, 1024 threads/block, grid y/z <= 65535 and "
        "x < 2^31 for the recorded grids. Spills are reported, not failed. `blocks/SM`: "
        "resident blocks the registers, shared memory and threads allow.",
        "",
        "| arch | launches recorded | specialisations recorded | configurations | compiled "
        "| compile errors | limit violations | with spills |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arch in meta["archs"]:
        r = [x for x in rows if x["arch"] == arch]
        rec = meta["recorded"][str(arch)]
        out.append(
            f"| sm_{arch} | {rec['launches']} | {rec['specialisations']} "
            f"| {rec['configurations']} | {len(r)} | {sum('error' in x for x in r)} "
            f"| {sum(bool(x['problems']) and 'error' not in x for x in r)} "
            f"| {sum(x.get('spill_stores', 0) > 0 for x in r)} |"
        )
    bad = [x for x in rows if x["problems"]]
    out += ["", "## Errors and limit violations", ""]
    out += [f"- {_row_text(x)}: {'; '.join(x['problems'])}" for x in bad] or ["None."]
    out += [
        "",
        "## Per configuration",
        "",
        "A row groups the launch configurations with the constexprs shown (they can differ in "
        "argument types: ints equal to 1, which the JIT turns into constants, or the weights' "
        "dtype); `n`: specialisations compiled / recorded for them (the recorded ones differ "
        "further in alignment and divisibility attributes). Registers, spills, shared memory "
        "and blocks/SM give the range over the compiled ones.",
        "",
        "| kernel | arch | dtype | constexprs | warps | stages | n | regs | spills (B) "
        "| shared (B) | blocks/SM | problems |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for x in rows:
        k = (
            x["kernel"],
            x["arch"],
            x["dtype"],
            json.dumps(x["constexprs"]),
            x["num_warps"],
            x["num_stages"],
        )
        groups.setdefault(k, []).append(x)

    def span(vals) -> str:
        return (
            "-"
            if not vals
            else (f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}")
        )

    def order(k):
        c = json.loads(k[3])
        return (k[0], -k[1], k[2], c.get("HEAD_DIM", 0), c.get("CPG", 0), k[3], k[4], k[5])

    for k in sorted(groups, key=order):
        g = groups[k]
        ok = [x for x in g if "error" not in x]
        recorded = sum({x["config"]: x["variants"] for x in g}.values())
        problems = "; ".join(sorted({p for x in g for p in x["problems"]}))
        out.append(
            f"| {k[0]} | sm_{k[1]} | {k[2]} | {_consts_text(json.loads(k[3]))} | {k[4]} | {k[5]} "
            f"| {len(g)}/{recorded} | {span([x['regs'] for x in ok])} "
            f"| {span([x['spill_stores'] + x['spill_loads'] for x in ok])} "
            f"| {span([x['shared'] for x in ok])} | {span([x['blocks_per_sm'] for x in ok])} "
            f"| {problems[:200]} |"
        )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line.


def _scratch() -> str | None:
    """Memory-backed /dev/shm for the throw-away triton cache where it has room (thousands of
    small files: slow to write and delete on some disks), else the default temp directory."""
    shm = "/dev/shm"
    with contextlib.suppress(OSError):
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 << 30:
            return shm
    return None


def _commit() -> str:
    try:
        import subprocess

        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        nargs="+",
        type=int,
        default=list(ARCHS),
        choices=sorted(GPUS),
        help="compute capabilities (default: 90 80)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for the .md table and the .json.gz rows (default: %(default)s)",
    )
    parser.add_argument(
        "--name",
        help="file name stem (default: aot-sm<archs>, plus -quick / -full)",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="compile every recorded specialisation, not one per configuration",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="bf16 only; the benchmarks' shapes and the imagenet64 / gray32 UNets only",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="compile worker processes (default: the usable cores)",
    )
    args = parser.parse_args(argv)
    if knobs.runtime.interpret or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "aot_check: TRITON_INTERPRET is set; unset it (the tool compiles the kernels, the "
            "interpreter would replace them)",
            file=sys.stderr,
        )
        return 2
    if _module("cmkernels.ops.triton_support").INTERPRET:
        print("aot_check: cmkernels' kernels are interpreted functions", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    archs = list(dict.fromkeys(args.arch))
    cases = list(workloads(args.quick))
    specs, problems, recorded = [], [], {}
    for arch in archs:
        rec = record(arch, cases)
        problems += check_coverage(rec)
        arch_specs = list(rec.specs.values())
        chosen = select(arch_specs, args.full)
        recorded[str(arch)] = dict(
            launches=sum(s.launches for s in arch_specs),
            specialisations=len(arch_specs),
            configurations=len({s.config() for s in arch_specs}),
        )
        specs += chosen
        print(
            f"sm_{arch}: {recorded[str(arch)]['launches']} launches, "
            f"{len(arch_specs)} specialisations, {recorded[str(arch)]['configurations']} "
            f"configurations; compiling {len(chosen)}",
            flush=True,
        )
    t_record = time.perf_counter() - t0

    def progress(done, total):
        if done % 100 == 0 or done == total:
            print(f"  compiled {done}/{total} ({time.perf_counter() - t0:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="aot_check_", dir=_scratch()) as cache:
        results = compile_all(specs, args.jobs, cache, progress)
    rows = [make_row(s, r) for s, r in zip(specs, results)]
    wall = time.perf_counter() - t0

    name = args.name or "-".join(["aot", *(f"sm{a}" for a in archs)]) + (
        "-quick" if args.quick else "-full" if args.full else ""
    )
    meta = dict(
        archs=archs,
        command=" ".join(["python tools/aot_check.py", *(sys.argv[1:] if argv is None else argv)]),
        date=time.strftime("%Y-%m-%d"),
        triton=triton.__version__,
        torch=torch.__version__,
        commit=_commit(),
        quick=args.quick,
        full=args.full,
        jobs=args.jobs,
        recorded=recorded,
        record_seconds=round(t_record, 1),
        wall_seconds=round(wall, 1),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(markdown(rows, meta))
    with gzip.GzipFile(args.out / f"{name}.json.gz", "wb", mtime=0) as f:  # ~10x smaller
        f.write((json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n").encode())

    problems += [f"{_row_text(x)}: {p}" for x in rows for p in x["problems"]]
    spilled = sum(x.get("spill_stores", 0) > 0 for x in rows)
    print(
        f"{len(rows)} specialisations compiled in {wall:.0f} s ({t_record:.0f} s recording, "
        f"{args.jobs} workers); {spilled} with spills; tables: {args.out / name}.md, .json.gz"
    )
    if problems:
        print(f"aot_check: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
