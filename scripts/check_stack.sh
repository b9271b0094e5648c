#!/usr/bin/env bash
# Builds and tests the project on a second software stack: by default torch 2.11.0 / triton 3.6.0,
# what the lent GPU machine runs (CI's main stack is newer). The tree is copied to a temporary
# folder (its build and the compiled module must not mix with the main stack's), the extension is
# built there (C++ and CUDA for sm_90, as on the GPU machine), and the tests whose behaviour
# differs between versions runs there (see below; STACK_TESTS=all for the whole suite).
#
#   scripts/check_stack.sh                       # fresh venv with torch==2.11.0 triton==3.6.0
#   STACK_VENV=/path/venv scripts/check_stack.sh # reuse a venv that already has that torch
#   STACK_TORCH=2.11.0 STACK_TRITON=3.6.0 ...    # another pair
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TORCH_V=${STACK_TORCH:-2.11.0}
TRITON_V=${STACK_TRITON:-3.6.0}
WORK=$(mktemp -d /tmp/cmkernels-stack.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ -n "${STACK_VENV:-}" ]; then
    VENV=$STACK_VENV
else
    VENV=$WORK/venv
    echo "== venv with torch==$TORCH_V triton==$TRITON_V: $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==$TORCH_V" "triton==$TRITON_V" numpy ninja pybind11 \
        setuptools wheel
fi
PY=$VENV/bin/python
"$PY" -c "import torch, triton; print('stack: torch', torch.__version__, 'triton', triton.__version__)"

echo "== copy of the tree: $WORK/tree"
mkdir -p "$WORK/tree"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$WORK/tree"
# The official-network reference data sits beside the checkout (../shared) or inside it.
[ -d "$ROOT/../shared" ] && ln -s "$(cd "$ROOT/../shared" && pwd)" "$WORK/shared"
cd "$WORK/tree"

echo "== build (MAX_JOBS=${MAX_JOBS:-2}, sm_90)"
LOG=$WORK/build.log
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
    "$VENV/bin/pip" install --no-build-isolation -e ".[test]" "torch==$TORCH_V" "triton==$TRITON_V" \
    >"$LOG" 2>&1; then
    tail -n 60 "$LOG"
    echo "build on torch $TORCH_V failed"
    exit 1
fi
"$PY" -c "import cmkernels, json; print(json.dumps(cmkernels.build_info()))"

# By default the tests whose behaviour depends on the torch/triton versions: the Triton kernels
# under the interpreter, op registration (schemas, opcheck, autograd, torch.compile), the
# no-extension import, the model, the samplers and the diffusers format. STACK_TESTS=all runs the
# whole suite (about 11 minutes more on 2 cores: the trainer and data tests).
if [ "${STACK_TESTS:-ops}" = all ]; then
    tests=()
else
    tests=(tests/test_attention.py tests/test_groupnorm_silu.py tests/test_heun_step.py
           tests/test_ema.py tests/test_cpu_baseline.py tests/test_unet.py tests/test_samplers.py
           tests/test_graph_sampler.py tests/test_editing.py tests/test_diffusers.py
           tests/test_aot_check.py tests/test_groupnorm_silu_jvp.py tests/test_attention_jvp.py
           tests/test_continuous.py tests/test_unet_jvp.py tests/test_vmap.py)
fi
echo "== tests (${tests[*]:-the whole suite}) on torch $TORCH_V / triton $TRITON_V"
"$PY" -m pytest -q -p no:cacheprovider "${tests[@]}"
echo "== stack torch $TORCH_V / triton $TRITON_V: OK (tree of $ROOT)"
