#!/usr/bin/env bash
# The GPU run: step and aggregation benchmarks at GPU sizes, in < 10 min.
#
#   bash benchmarks/gpu.sh                  # on a GPU machine: writes
#                                           # benchmarks/results/gpu/*.md
#   GPU_SH_SMOKE=1 bash benchmarks/gpu.sh   # tiny sizes on any machine
#                                           # (< 1 min), into a temp dir
#
# Needs only this repository and a Python with jax (CUDA), optax and flax
# (PYTHON=..., default python3); nothing is downloaded. The package is
# imported from this checkout (PYTHONPATH), not installed.
#
# Parts (each under its own time limit; a part that fails or times out is
# recorded in summary.md and the next one runs; every part writes its table
# row by row, so a stopped part keeps what it measured):
#   env        env.md         the device (jax.devices()[0].device_kind),
#                             its memory, the versions
#   aggregate  aggregate.md   one aggregation step, P = 10M and 100M,
#                             T = 2, 8, 32, 128
#   step       step.md        one training step of bench_step.py's MLP with
#                             a 10M and a 100M trunk, T = 2, 8, 32, 128
# Limits (seconds): GPU_SH_LIMIT_ENV, GPU_SH_LIMIT_AGGREGATE,
# GPU_SH_LIMIT_STEP (defaults 60, 230, 290: 580 s in all); each Python
# part also stops starting new cells a little before its limit.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Let XLA grow its GPU memory as needed (cells of very different sizes).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

if [ "${GPU_SH_SMOKE:-0}" = "1" ]; then
  OUT=${GPU_SH_OUT:-$(mktemp -d -t gpu_sh_smoke.XXXXXX)}
  SMOKE=--smoke
  L_ENV=${GPU_SH_LIMIT_ENV:-30}
  L_AGG=${GPU_SH_LIMIT_AGGREGATE:-60}
  L_STEP=${GPU_SH_LIMIT_STEP:-90}
  B_AGG=$((L_AGG / 2)) B_STEP=$((L_STEP / 2))
else
  OUT=${GPU_SH_OUT:-$ROOT/benchmarks/results/gpu}
  SMOKE=
  L_ENV=${GPU_SH_LIMIT_ENV:-60}
  L_AGG=${GPU_SH_LIMIT_AGGREGATE:-230}
  L_STEP=${GPU_SH_LIMIT_STEP:-290}
  # Stop starting cells this long before the kill (the largest cell's
  # compile and rounds fit in the margin).
  B_AGG=$((L_AGG - 60)) B_STEP=$((L_STEP - 80))
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
{
  echo "# benchmarks/gpu.sh"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M') UTC, $(hostname), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)${SMOKE:+, smoke sizes}."
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -5
    echo '```'
  fi
  echo
  echo "| part | exit | seconds | limit | log |"
  echo "|---|---|---|---|---|"
} > "$SUMMARY"

# part NAME LIMIT CMD...: runs CMD under LIMIT seconds, logs to NAME.log.
part() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=$rc
  [ $rc -eq 124 ] && note="124 (time limit)"
  echo "| $name | $note | $((SECONDS - t0)) | $limit | $name.log |" >> "$SUMMARY"
  echo "   exit $note after $((SECONDS - t0)) s"
  tail -3 "$OUT/$name.log"
}

part env "$L_ENV" "$PY" benchmarks/bench_gpu.py env --out "$OUT"
part aggregate "$L_AGG" "$PY" benchmarks/bench_gpu.py aggregate $SMOKE \
  --out "$OUT/aggregate.md" --budget "$B_AGG"
part step "$L_STEP" "$PY" benchmarks/bench_gpu.py step $SMOKE \
  --out "$OUT/step.md" --budget "$B_STEP"

echo "wrote $OUT:"
ls "$OUT"
cat "$SUMMARY"
