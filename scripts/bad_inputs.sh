#!/usr/bin/env bash
# Bad input for the three command lines (issue 13): every case must end with a non-zero exit
# status and one line on stderr (`<prog>: error: ...`), never a traceback. Prints each command
# and the line it printed; exits 1 if any case misbehaves.
#
#   scripts/bad_inputs.sh            # about 40 commands; a few minutes on 2 CPU cores
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
W=$(mktemp -d /tmp/cmkernels-bad.XXXXXX)
HOLDER=""
trap '[ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null; rm -rf "$W"' EXIT
TEACHER=cmkernels/assets/teacher_mnist_edm.pt
export PYTHONWARNINGS=ignore

# Fixtures: broken files, odd folders, and run directories in various states.
mkdir -p "$W/empty_dir" "$W/mixed" "$W/corrupt_png" "$W/owned" "$W/wide" "$W/locked" "$W/broken"
: >"$W/empty.pt"
touch "$W/a_file"
printf 'not a png' >"$W/corrupt_png/a.png"
cp "$TEACHER" "$W/owned/last.pt"
printf 'not a zip' >"$W/bad.npz"
"$PY" - "$W" "$TEACHER" <<'EOF'
import argparse, sys
import numpy as np, torch
from PIL import Image
from cmkernels.checkpoint import load_file, save_checkpoint
w, teacher = sys.argv[1:]
Image.new("L", (32, 32)).save(f"{w}/mixed/a.png")
Image.new("L", (28, 28)).save(f"{w}/mixed/b.png")
torch.save({"args": argparse.Namespace(lr=1)}, f"{w}/pickle.pt")
state = load_file(teacher)
torch.save(state["model"], f"{w}/plain_gray32.pt")
path = save_checkpoint(state, f"{w}/broken/last.pt")
raw = bytearray(path.read_bytes())
at = raw.find(state["model"]["input_blocks.0.0.bias"].numpy().tobytes())
raw[at + 32:at + 96] = bytes(64)
path.write_bytes(bytes(raw))
np.savez(f"{w}/samples.npz", images=np.zeros((8, 32, 32, 1), np.uint8))
# A training checkpoint of an EDM run (the teacher's weights as its model and EMA).
import dataclasses
from cmkernels import train
run = dict(state, optimizer={"state": {}, "param_groups": []}, step=5, target=None,
           emas={"0.999": state["model"]}, rng={"torch": torch.get_rng_state()},
           config=dataclasses.asdict(train.parse_args(["--mode", "edm"])))
save_checkpoint(run, f"{w}/wide/last.pt")
EOF
flock "$W/locked/.lock" sleep 600 &
HOLDER=$!

failures=0
check() {  # check PROG ARGS...: expect a non-zero exit and one line, no traceback
    local err status lines
    err=$("$PY" -m "$@" 2>&1 >/dev/null </dev/null)
    status=$?
    lines=$(printf '%s' "$err" | grep -c '')
    if [ "$status" -eq 0 ] || [ "$lines" -ne 1 ] || printf '%s' "$err" | grep -q Traceback; then
        failures=$((failures + 1))
        printf 'FAIL (exit %s, %s lines): %s\n%s\n\n' "$status" "$lines" "$*" "$err"
    else
        printf '[exit %s] %s\n    %s\n' "$status" "${*#cmkernels.}" "$err"
    fi
}
T="cmkernels.train --no-progress"
S="cmkernels.sample --device cpu"
X="cmkernels.export"
E="cmkernels.evaluate"

echo "== train"
check $T --preset gray64
check $T --mode xyz
check $T --bogus-flag
check $T --lr nan
check $T --lr -1
check $T --batch-size -4
check $T --batch-size 0
check $T --ema-rates 1.5
check $T --mode cd --ict
check $T --data "$W/nope" --out "$W/r1"
check $T --data "$W/empty_dir" --out "$W/r2"
check $T --data "$W/mixed" --out "$W/r3"
check $T --data "$W/corrupt_png" --out "$W/r4"
check $T --mode ct --resume --out "$W/r5"
check $T --mode ct --resume --out "$W/broken"
check $T --teacher "$W/nope.pt" --out "$W/r6"
check $T --teacher "$W/empty.pt" --out "$W/r7"
check $T --teacher "$W/pickle.pt" --out "$W/r8"
check $T --mode ct --init-from "$W/nope.pt" --out "$W/r9"
check $T --mode ct --init-from "$TEACHER" --model-channels 64 --out "$W/r10"
check $T --mode edm --out "$W/owned"
check $T --mode edm --resume --model-channels 64 --out "$W/wide"
check $T --mode ct --resume --out "$W/wide"
check $T --mode ct --out "$W/locked"
check $T --mode ct --out "$W/a_file/run"

echo "== sample"
check $S --checkpoint "$W/nope.pt" --out "$W/s"
check $S --checkpoint "$W/empty.pt" --out "$W/s"
check $S --checkpoint "$W/pickle.pt" --out "$W/s"
check $S --checkpoint "$W/broken/last.pt" --out "$W/s"
check $S --checkpoint "$W/plain_gray32.pt" --out "$W/s"
check $S --checkpoint "$TEACHER" --weights 0.5 --out "$W/s"
check $S --checkpoint "$TEACHER" --preset gray99 --out "$W/s"
check $S --checkpoint "$TEACHER" --sampler multistep --ts , --out "$W/s"
check $S --checkpoint "$TEACHER" --sampler multistep --ts -1,22 --out "$W/s"
check $S --checkpoint "$TEACHER" --sampler multistep --ts=-1,22 --out "$W/s"
check $S --checkpoint "$TEACHER" --parameterization cm --steps 40 --out "$W/s"
check $S --checkpoint "$TEACHER" --sampler euler --sigmas nan,1 --out "$W/s"
check $S --checkpoint "$TEACHER" --task colorize --image "$W/mixed/a.png" --out "$W/s"
check $S --checkpoint "$TEACHER" --class-label 3 --out "$W/s"
check $S --checkpoint "$TEACHER" --out "$W/a_file/out"
check $S --checkpoint "$TEACHER" --dtype fp64 --out "$W/s"

echo "== export"
check $X "$TEACHER"
check $X "$W/nope.pt" --official "$W/x.pt"
check $X "$W/pickle.pt" --official "$W/x.pt"
check $X "$TEACHER" --unet-only --official "$W/x.pt"
check $X "$TEACHER" --dtype fp64 --official "$W/x.pt"
check $X "$TEACHER" --diffusers "$W/d"
check $X "$TEACHER" --parameterization cm --diffusers "$W/d" --steps 1
check $X "$TEACHER" --official "$W/a_file/x.pt"

echo "== evaluate"
check $E --generated "$W/nope.npz" --reference mnist
check $E --generated "$W/bad.npz" --reference mnist
check $E --generated "$W/samples.npz" --reference "$W/nope"
check $E --generated "$W/samples.npz" --reference mnist --batch-size 0
check $E --generated "$W/samples.npz" --reference mnist --features inception
check $E --generated "$W/samples.npz" --reference mnist --json "$W/a_file/fd.json"
check $E --generated "$W/samples.npz"

echo
if [ "$failures" -ne 0 ]; then
    echo "$failures case(s) misbehaved"
    exit 1
fi
echo "every case: one line, non-zero exit, no traceback"
