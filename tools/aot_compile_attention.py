"""Compile the attention Triton kernels for a GPU architecture without a GPU, and report shared
memory, registers and spills (triton's bundled ptxas -v). This catches GPU compile errors that the
interpreter cannot see, and is where the block-size heuristic of cmkernels/ops/attention.py comes
from. Slow on 2 cores (seconds per kernel; fp32 ones longer).

    python tools/aot_compile_attention.py --arch 90 --dtypes fp16 bf16 --head-dims 64 128
    python tools/aot_compile_attention.py --autotune   # every autotune config instead

Run without TRITON_INTERPRET (the kernels must be JIT functions).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

A = importlib.import_module("cmkernels.ops.attention")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
POINTER = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")
KERNELS = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}
TUNED = {"fwd": "_attn_fwd_tuned", "dkdv": "_attn_bwd_dkdv_tuned", "dq": "_attn_bwd_dq_tuned"}


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in TENSORS:
            sig[name] = POINTER[dtype]
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_report(fn, dtype: str, constexprs: dict, warps: int, stages: int, arch: int) -> str:
    src = triton.compiler.ASTSource(
        fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs
    )
    target = GPUTarget("cuda", arch, 32)
    kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run(
            [PTXAS, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return (
        f"smem {kernel.metadata.shared // 1024} KB, regs {regs[0] if regs else '?'}, "
        f"spill stores {spills[0] if spills else '?'} B"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90, 80")
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[16, 64, 128, 8])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS))
    parser.add_argument("--autotune", action="store_true", help="every autotune config")
    args = parser.parse_args()
    if A._INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: the kernels are interpreted functions")
    torch_dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
    for dtype in args.dtypes:
        for d in args.head_dims:
            block_d = max(16, A._next_pow2(d))
            flags = dict(
                HEAD_DIM=d,
                BLOCK_D=block_d,
                PAD_D=block_d != d,
                PRECISION="ieee" if dtype == "fp32" else "tf32",
                INTERP_BF16=False,
            )
            for name in args.kernels:
                fn = getattr(A, KERNELS[name])
                if args.autotune:
                    configs = [
                        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                        for c in getattr(A, TUNED[name]).configs
                    ]
                else:
                    dt = getattr(A.torch, torch_dtype[dtype])
                    c = A._heuristic(name, 1 << 20, d, dt)
                    configs = [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])]
                for bm, bn, warps, stages in configs:
                    consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn)
                    try:
                        report = compile_report(fn, dtype, consts, warps, stages, args.arch)
                    except Exception as exc:  # report and go on: one config may not fit
                        report = f"FAILED {type(exc).__name__}: {str(exc)[-300:]}"
                    print(
                        f"sm_{args.arch} {dtype} d={d:3d} {name:4s} {bm:3d}x{bn:<3d} "
                        f"w{warps} s{stages}: {report}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
