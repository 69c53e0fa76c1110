#!/usr/bin/env bash
# Every GPU-only test and benchmark of this repository in one call, inside 10 minutes on one
# H200, with every result under one folder:
#
#   bash benchmarks/gpu_suite.sh [OUTDIR]
#
# OUTDIR defaults to $OUT/gpu_suite when $OUT is set (the device tool's output folder), else
# runs/gpu_suite. Each item runs under its own `timeout`; the limits add up to 555 s, so
# the suite ends inside the device tool's 600 s per command even if an item hangs. What
# lands in OUTDIR:
#   env.txt, nvidia-smi.txt          torch/CUDA versions and the device
#   summary.txt, summary.jsonl       per item: exit code and seconds (124 = hit its limit)
#   pytest_gpu.log/.xml              every @pytest.mark.gpu test (tests/)
#   seven_b_cuda.json/.log           benchmarks/seven_b.py --device cuda --cap 24GiB
#   step_speed_cuda.json/.log        benchmarks/step_speed.py --device cuda (step, first)
#   step_speed_lowp_cuda.json/.log   the same, --parts lowp (low-precision state: compiled kernel and reference)
#   tight_memory_gpu.json/.log       benchmarks/tight_memory.py --part gpu --uncapped
#   table1_profile_cuda.json/.log    benchmarks/table1_profile.py --device cuda (gpt2-xl)
# Exit code: 0 when every item exited 0, else 1; 3 when there is no CUDA device.
set -u
cd "$(dirname "$0")/.."
OUTDIR="${1:-}"
if [ -z "$OUTDIR" ]; then
    if [ -n "${OUT:-}" ]; then OUTDIR="$OUT/gpu_suite"; else OUTDIR="runs/gpu_suite"; fi
fi
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
PY="${PYTHON:-python}"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_suite: no CUDA device (torch.cuda.is_available() is False); nothing was run" | tee "$OUTDIR/summary.txt"
    exit 3
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    > "$OUTDIR/env.txt" 2>&1
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1 || true
: > "$OUTDIR/summary.txt"
: > "$OUTDIR/summary.jsonl"
FAILED=0

item() {  # item NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    echo "$name rc=$rc ${dt}s" | tee -a "$OUTDIR/summary.txt"
    printf '{"item": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" "$dt" "$limit" >> "$OUTDIR/summary.jsonl"
    [ "$rc" -eq 0 ] || FAILED=1
}

item pytest_gpu 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUTDIR/pytest_gpu.xml" tests
item seven_b 160 "$PY" benchmarks/seven_b.py --device cuda --cap 24GiB --steps 5 --out "$OUTDIR/seven_b_cuda.json"
item step_speed 60 "$PY" benchmarks/step_speed.py --device cuda --parts step,first --repeats 5 \
    --write "$OUTDIR/step_speed_cuda.json"
item step_speed_lowp 60 "$PY" benchmarks/step_speed.py --device cuda --parts lowp --repeats 5 \
    --write "$OUTDIR/step_speed_lowp_cuda.json"
item tight_memory 110 "$PY" benchmarks/tight_memory.py --part gpu --steps 2 --uncapped --timeout 100 \
    --out "$OUTDIR/tight_memory_gpu.json"
item table1_profile 45 "$PY" benchmarks/table1_profile.py --device cuda --model gpt2-xl --steps 2 \
    --out "$OUTDIR/table1_profile_cuda.json"

echo "gpu_suite: results in $OUTDIR" | tee -a "$OUTDIR/summary.txt"
exit $FAILED
