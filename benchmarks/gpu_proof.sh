#!/usr/bin/env bash
# The GPU proof: ONE command for a lent GPU window (at most ~9 minutes on the H200 machine, from a
# fresh copy of the tree), which proves every GPU kernel correct and measures the headline numbers.
#
#   OUT=/path/to/results benchmarks/gpu_proof.sh      # $OUT: the device tool's output folder
#
# Stages, each with its own deadline, each stopped with SIGINT (pytest then still writes its
# --junitxml / --benchmark-json with what finished), so a slow stage never costs the later ones:
#   1. facts      nvidia-smi, versions, which optional packages are missing
#   2. build      the extension for sm_90 only, MAX_JOBS=16 (on failure the tests still run: the
#                 Triton kernels do not need it, and the report says the build failed)
#   3. tests      every GPU test (-m "gpu or triton"), in parallel processes split by kernel and
#                 dtype; autotuning off (CMKERNELS_AUTOTUNE=0) except the bf16 autotune cases
#   4. benchmarks copy bandwidth; each op in bf16, cmkernels against eager (SDPA, F.group_norm +
#                 F.silu, ...) and with CUDA graphs; the imagenet64 headline rows (one-step
#                 latency at batch 1, cd training img/s); one default-mode torch.compile row
#                 end to end if the time budget (GPU_PROOF_BUDGET, 540 s) allows
#   5. report     Markdown (+ PNG where matplotlib exists) from the benchmark JSON
# Everything lands in $OUT as few files: summary.md (read this first), report.md, report.png (if
# any) and proof.tar.gz (every log, junit XML and benchmark JSON).
#
# On a machine without a GPU the same script dry-runs: the GPU tests skip, the Triton tests run
# under the interpreter, the benchmarks run their CPU rows, and an existing build is reused.
# Deadlines scale with GPU_PROOF_SCALE (e.g. 0.3 for a quick dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cmkernels-gpu-proof}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/cmkernels-proof.XXXXXX)
PY=${PYTHON:-python3}
SCALE=${GPU_PROOF_SCALE:-1}
T0=$(date +%s)
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -v '^??' | wc -l)
SUMMARY=$WORK/summary.md

deadline() { "$PY" -c "import sys; print(max(5, int(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$SCALE"; }
elapsed() { echo $(($(date +%s) - T0)); }
note() { echo "$*" | tee -a "$SUMMARY"; }
# run_stage NAME SECONDS CMD...: runs CMD with a SIGINT deadline (SIGKILL 15 s later), logs to
# $WORK/NAME.txt, returns its exit status (124: the deadline hit).
run_stage() {
    local name=$1 secs=$2
    shift 2
    timeout -s INT -k 15 "$secs" "$@" >"$WORK/$name.txt" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "(stopped at its ${secs}s deadline)" >>"$WORK/$name.txt"
    return $rc
}

GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
    echo "# GPU proof"
    echo
    echo "- commit: $commit (uncommitted changes to tracked files: $dirty)"
    echo "- started: $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname), GPU present: $GPU"
} >"$SUMMARY"

# 1. facts ----------------------------------------------------------------------------------------
{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo
    nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not found"
    "$PY" - <<'PYEOF'
import importlib, platform, os
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"sm_{p.major}{p.minor}")
print("cpu cores:", os.cpu_count())
missing = [m for m in ("pytest", "pytest_benchmark", "numpy", "ninja", "pybind11", "tqdm",
                       "matplotlib", "PIL", "mlxtend", "torchmetrics", "safetensors")
           if importlib.util.find_spec(m) is None]
print("missing packages:", ", ".join(missing) or "none")
PYEOF
} >"$WORK/facts.txt" 2>&1
note "- facts: $(grep -E '^(python|device|missing)' "$WORK/facts.txt" | tr '\n' ';' | sed 's/;/; /g')"

# 2. build ----------------------------------------------------------------------------------------
build_cmd=(env MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
           "$PY" setup.py build_ext --inplace)
if [ "$GPU" = 1 ] || ! "$PY" -c "import cmkernels._C" >/dev/null 2>&1; then
    run_stage build "$(deadline 170)" "${build_cmd[@]}"
    rc=$?
else
    echo "dry run without a GPU: the existing build is reused" >"$WORK/build.txt"
    rc=0
fi
"$PY" -c "import cmkernels, json; print(json.dumps(cmkernels.build_info()))" \
    >"$WORK/build_info.json" 2>>"$WORK/build.txt"
note "- build: exit $rc after $(elapsed)s; $(cat "$WORK/build_info.json" 2>/dev/null | head -c 300)"
[ $rc -ne 0 ] && tail -n 30 "$WORK/build.txt" | sed 's/^/    /' >>"$SUMMARY"

# 3. tests ----------------------------------------------------------------------------------------
# Parallel pytest processes (one GPU is shared; the CPU cores compile the Triton kernels), split
# by kernel and dtype so that no process holds most of the compile work. Autotuning is off
# (CMKERNELS_AUTOTUNE=0), except where a test sets it: the autotune cases of test_gpu_packed_large
# run for bf16 at T = 1024 and 4096 only (id suffix "-1]" = autotune on).
TEST_SECS=$(deadline 170)
pids=()
split_tests() {
    local name=$1
    shift
    CMKERNELS_AUTOTUNE=0 run_stage "tests-$name" "$TEST_SECS" "$PY" -m pytest -q -rfE \
        -p no:cacheprovider --continue-on-collection-errors -m "gpu or triton" \
        --junitxml="$WORK/tests-$name.xml" "$@" &
    pids+=($!)
}
split_tests attn-fp32 tests/test_attention.py -k "float32 and not float32-1]"
split_tests attn-fp16 tests/test_attention.py -k "float16 and not float16-1]"
split_tests attn-bf16 tests/test_attention.py -k "bfloat16 and not bfloat16-1]"
split_tests attn-bf16-autotune tests/test_attention.py \
    -k "1024-64-torch.bfloat16-1] or 4096-64-torch.bfloat16-1]"
split_tests attn-other tests/test_attention.py -k "not float32 and not float16 and not bfloat16"
split_tests groupnorm tests/test_groupnorm_silu.py
split_tests heun-ema tests/test_heun_step.py tests/test_ema.py
split_tests jvp tests/test_groupnorm_silu_jvp.py tests/test_attention_jvp.py tests/test_continuous.py \
    tests/test_unet_jvp.py tests/test_vmap.py
split_tests model tests/test_graph_sampler.py tests/test_unet.py tests/test_samplers.py \
    tests/test_editing.py tests/test_train.py
for pid in "${pids[@]}"; do wait "$pid"; done
"$PY" - "$WORK" <<'PYEOF' | tee -a "$SUMMARY"
import glob, os, sys
import xml.etree.ElementTree as ET
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
rows, failed = [], []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "tests-*.xml"))):
    name = os.path.basename(path)[6:-4]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        rows.append(f"| {name} | (no junit XML: killed) | | | |")
        continue
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in tot}
    for k in tot:
        tot[k] += n[k]
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    rows.append(f"| {name} | {passed} | {n['failures'] + n['errors']} | {n['skipped']} | "
                f"{float(suite.get('time', 0)):.0f}s |")
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"\n## Tests (-m 'gpu or triton'): {passed} passed, {tot['failures'] + tot['errors']} failed, "
      f"{tot['skipped']} skipped\n")
print("| split | passed | failed | skipped | time |\n| --- | --- | --- | --- | --- |")
print("\n".join(rows))
if failed:
    print("\nFailed:\n" + "\n".join(f"- {f}" for f in failed[:60]))
PYEOF
grep -h "stopped at its" "$WORK"/tests-*.txt >/dev/null 2>&1 && note "- some test splits hit the deadline (see proof.tar.gz)"
note ""
note "- tests done after $(elapsed)s"

# 4. benchmarks -----------------------------------------------------------------------------------
# One pytest run per part, each with its own JSON, sequential (one GPU; no tests running now).
# Providers: eager (what a user writes: SDPA, F.group_norm + F.silu, plain Heun arithmetic, three
# _foreach_lerp_), eager-official (the official code's ops, end to end), cmkernels,
# cmkernels+cudagraph; torch.compile rows cost a compile each, so the per-op parts skip them and
# the last part runs ONE default-mode torch.compile row end to end with the time that is left.
BUDGET=$(deadline ${GPU_PROOF_BUDGET:-540})
bench() {
    local name=$1 secs=$2
    shift 2
    run_stage "bench-$name" "$secs" "$PY" -m pytest -q -p no:cacheprovider --benchmark-only \
        --benchmark-json="$WORK/bench-$name.json" --benchmark-max-time=0.3 \
        --benchmark-columns=median,min,iqr,rounds "$@"
    note "- benchmarks $name: exit $? after $(elapsed)s"
}
NOCOMPILE="not compile and not official"
if [ "$GPU" = 1 ]; then
    GN_K="bfloat16 and (forward or full) and $NOCOMPILE and (1x192x64x64 or 32x192x64x64 or 256x576x16x16)"
    ATTN_K="bfloat16 and forward and $NOCOMPILE and (B1-T1024 or B64-T1024 or B16-T4096 or B256-T256)"
    SMALL_K="$NOCOMPILE and (imagenet64 or float32-bfloat16)"
else  # the CPU rows (dry run)
    GN_K="forward and $NOCOMPILE"
    ATTN_K="forward and $NOCOMPILE"
    SMALL_K="$NOCOMPILE and step"
fi
bench copy "$(deadline 15)" benchmarks/test_bench_copy.py
bench groupnorm "$(deadline 45)" benchmarks/test_bench_groupnorm_silu.py -k "$GN_K"
bench attention "$(deadline 45)" benchmarks/test_bench_attention.py -k "$ATTN_K"
bench heun-ema "$(deadline 30)" benchmarks/test_bench_heun_step.py benchmarks/test_bench_ema.py \
    -k "$SMALL_K"
# Continuous time: the attention JVP op against its forward (TFLOP/s x 3 = the ideal) and one JVP
# of the whole consistency function (time, peak memory) against torch.func.jvp of the eager model.
if [ "$GPU" = 1 ]; then JVP_K="not compile"; else JVP_K="not compile and (gray32 or attention)"; fi
bench jvp "$(deadline 50)" benchmarks/test_bench_jvp.py -k "$JVP_K and not train_step"
# The headline rows (-m headline: imagenet64 bf16 cd training step, one-step sampling at batch 1;
# on the CPU they do not exist and gray32 rows stand in).
if [ "$GPU" = 1 ]; then E2E_M=headline E2E_K=""; else E2E_M="not headline" E2E_K="b1- and "; fi
bench e2e "$(deadline 75)" benchmarks/test_bench_e2e.py -m "$E2E_M" -k "${E2E_K}not compile"
left=$((BUDGET - $(elapsed) - 15))
if [ "$left" -ge 45 ]; then
    bench e2e-compile "$left" benchmarks/test_bench_e2e.py -m "$E2E_M" \
        -k "${E2E_K}test_sample and torch.compile and not cudagraph"
else
    note "- torch.compile end-to-end row skipped: ${left}s left"
fi

# 5. report ---------------------------------------------------------------------------------------
jsons=()
for f in "$WORK"/bench-*.json; do [ -s "$f" ] && jsons+=("$f"); done
if [ ${#jsons[@]} -gt 0 ]; then
    "$PY" -m cmkernels.bench_report "${jsons[@]}" --out "$WORK/report" >"$WORK/report.txt" 2>&1 \
        || note "- bench_report failed: $(tail -n 3 "$WORK/report.txt")"
    [ -f "$WORK/report.md" ] && { echo; echo "## Benchmarks"; echo; cat "$WORK/report.md"; } >>"$SUMMARY"
else
    note "- no benchmark JSON was written"
fi
note ""
note "- total: $(elapsed)s; commit measured: $commit"

cp "$SUMMARY" "$OUT/summary.md"
[ -f "$WORK/report.md" ] && cp "$WORK/report.md" "$OUT/report.md"
[ -f "$WORK/report.png" ] && cp "$WORK/report.png" "$OUT/report.png"
tar -czf "$OUT/proof.tar.gz" -C "$WORK" . 2>/dev/null
rm -rf "$WORK"
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
