"""tools/aot_check.py on a few specialisations: record the launchers' launches for sm_90 without a
GPU, compile them ahead of time, check the numbers.

Needs triton's compiled JIT, so it is skipped under the interpreter, which tests/conftest.py
switches on where there is no GPU; on a CPU machine run it as
``TRITON_INTERPRET=0 pytest tests/test_aot_check.py``.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from cmkernels.ops.triton_support import INTERPRET  # noqa: E402

needs_jit = pytest.mark.skipif(
    INTERPRET or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="TRITON_INTERPRET=1: the kernels are interpreted, there is nothing to compile",
)

TOOL = Path(__file__).resolve().parents[1] / "tools" / "aot_check.py"


@pytest.fixture(scope="module")
def aot():
    spec = importlib.util.spec_from_file_location("aot_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


def _record(aot, monkeypatch, fn):
    monkeypatch.setenv("CMKERNELS_AUTOTUNE", "0")  # the heuristic: one config per kernel
    cuda_device = torch.cuda.device
    with aot.Recorder(90) as rec:
        rec.label = "test"
        fn()
    assert torch.cuda.device is cuda_device  # the stubs are gone again
    return rec.specs.values()


@needs_jit
def test_attention_forward_bf16_d64(aot, monkeypatch):
    B, H, T, d = 2, 6, 1024, 64
    case = lambda: aot.attention_case("packed", B, H, T, d, torch.bfloat16, backward=False)  # noqa: E731
    (spec,) = _record(aot, monkeypatch, case)
    assert spec.kernel.endswith(":_attn_fwd_kernel") and spec.launches == 1
    data = json.loads(spec.data)
    names = list(data["signature"])
    attrs = {names[k[0]]: v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    consts = {names[k[0]]: v for k, v in zip(data["constant_keys"], data["constant_vals"])}
    # What the JIT adds and a hand-written signature lacks: 16-byte-aligned pointers, ints
    # divisible by 16, and the unit token stride of the packed layout as a constant.
    assert ["tt.divisibility", 16] in attrs["Q"] and ["tt.divisibility", 16] in attrs["T"]
    assert consts["stride_qt"] == 1 and consts["HEAD_DIM"] == d
    assert spec.grid == [triton.cdiv(T, consts["BLOCK_M"]) * B * H, 1, 1]

    row = aot.make_row(spec, aot.compile_spec(spec.kernel, spec.arch, spec.data))
    assert "error" not in row, row.get("error")
    assert 0 < row["regs"] <= 255 and row["shared"] > 0
    assert row["spill_stores"] == 0 and row["problems"] == []
    assert row["dtype"] == "bf16" and row["num_warps"] == data["options"]["num_warps"]


@needs_jit
def test_groupnorm_fused_forward(aot, monkeypatch):
    # 8 x 32 groups >= 132 SMs and 2 x 256 elements per group: the one-pass kernel.
    case = lambda: aot.groupnorm_case((8, 64, 16, 16), 32, torch.bfloat16, "channels_last")  # noqa: E731
    specs = {s.kernel.split(":")[1]: s for s in _record(aot, monkeypatch, case)}
    assert {"_gn_fused_fwd_kernel", "_gn_bwd_sums_kernel", "_gn_bwd_dx_kernel"} <= set(specs)
    spec = specs["_gn_fused_fwd_kernel"]
    row = aot.make_row(spec, aot.compile_spec(spec.kernel, spec.arch, spec.data))
    assert "error" not in row, row.get("error")
    assert 0 < row["regs"] <= 255 and row["problems"] == []
    assert row["constexprs"]["CPG"] == 2 and row["constexprs"]["BLOCK_HW"] == 256
    assert row["grid"] == [8 * 32, 1, 1]


def test_limits_flag_violations(aot):  # no compile: runs under the interpreter too
    row = dict(arch=80, num_warps=16, regs=200, shared=200_000, grid=[1, 70_000, 1])
    problems = aot.limit_problems(row)
    assert any("shared memory" in p for p in problems)
    assert any("registers/block" in p for p in problems)
    assert any("grid y" in p for p in problems)
    ok = dict(arch=90, num_warps=4, regs=217, shared=65536, grid=[96, 1, 1])
    assert aot.limit_problems(ok) == []
