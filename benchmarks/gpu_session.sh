#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages that each fit one 10-minute device call:
#
#   benchmarks/gpu_session.sh build   # compile the extension (sm_80, sm_90), record build_info + nvidia-smi
#   benchmarks/gpu_session.sh test    # the whole test suite (GPU tests run, Triton compiled for real)
#   benchmarks/gpu_session.sh ops     # per-op benchmarks + copy bandwidth -> ops.json, ops.md, ops.png
#   benchmarks/gpu_session.sh e2e     # training step and sampling benchmarks -> e2e.json, e2e.md, e2e.png
#
# Everything is written under $OUT (the device tool's output folder; /tmp/cmkernels-gpu otherwise).
# Commit the .md/.png/.json files under benchmarks/results/<device>-<date>/ with the commit measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cmkernels-gpu}
mkdir -p "$OUT"
stage=${1:?usage: gpu_session.sh build|test|ops|e2e}
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)

case "$stage" in
build)
    MAX_JOBS=${MAX_JOBS:-8} pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
    rc=$?
    tail -n 5 "$OUT/build.log"
    nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    python -c "import cmkernels, json, torch, triton; i = cmkernels.build_info(); \
i.update(device=torch.cuda.get_device_name(), triton=triton.__version__, commit='$commit'); \
print(json.dumps(i, indent=2))" | tee "$OUT/build_info.json"
    exit $rc
    ;;
test)
    python -m pytest -q -rs --durations=15 --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.txt"
    exit "${PIPESTATUS[0]}"
    ;;
ops | e2e)
    if [ "$stage" = ops ]; then
        files=(benchmarks/test_bench_copy.py benchmarks/test_bench_groupnorm_silu.py
               benchmarks/test_bench_attention.py benchmarks/test_bench_heun_step.py
               benchmarks/test_bench_ema.py)
    else
        files=(benchmarks/test_bench_copy.py benchmarks/test_bench_e2e.py)
    fi
    python -m pytest "${files[@]}" --benchmark-only -q --benchmark-json="$OUT/$stage.json" \
        --benchmark-columns=median,min,iqr,rounds 2>&1 | tail -n 40 | tee "$OUT/$stage.txt"
    rc=${PIPESTATUS[0]}
    python -m cmkernels.bench_report "$OUT/$stage.json" --out "$OUT/$stage"
    echo "commit measured: $commit" >>"$OUT/$stage.md"
    exit "$rc"
    ;;
*)
    echo "unknown stage $stage (build|test|ops|e2e)" >&2
    exit 2
    ;;
esac
