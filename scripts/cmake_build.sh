#!/usr/bin/env bash
# Builds cmkernels._C with CMake + Ninja (the same sources and flags as setup.py) into
# build/cmake/cmkernels/, then checks in a fresh process that the module loads and registers the ops.
# Run inside the environment where torch is installed. Extra arguments go to the configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD=${CMKERNELS_CMAKE_BUILD:-build/cmake}
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-S . -B "$BUILD" -G Ninja -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPython3_EXECUTABLE="$(command -v "$PY")")
CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
if [ -x "$CUDA_ROOT/bin/nvcc" ] && $PY -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  # torch's CMake config looks for nvrtc in the toolkit; pip's CUDA torch ships it in site-packages.
  NVRTC=$($PY - <<'PYEOF'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
print(hits[0] if hits else "")
PYEOF
)
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc")
  [ -n "$NVRTC" ] && args+=(-DCUDA_nvrtc_LIBRARY="$NVRTC")
else
  args+=(-DCMKERNELS_NO_CUDA=ON)
fi
cmake "${args[@]}" "$@"
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
SO=$(ls "$BUILD"/cmkernels/_C*.so)
$PY - "$SO" <<'PYEOF'
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("cmkernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
info = mod.build_info()
assert hasattr(torch.ops.cmkernels, "groupnorm_silu"), "the CMake-built module registered no ops"
print("CMake build OK:", sys.argv[1], info)
PYEOF
