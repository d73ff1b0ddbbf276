#!/bin/bash
# The MT10 runs of benchmarks/results/mt10.md (2026-12-02, session 20), from the repository root.
# One process per method, the seeds vmapped inside it; XLA single-threaded.
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
PY=${PY:-/work/venv_rl/bin/python}
OUT=benchmarks/results/mt10_logs
COMMON="--steps-per-task ${STEPS:-50000} --eval-every 5000 --eval-episodes 1 --log-every 500 --out $OUT $EXTRA"
nice -n 10 $PY benchmarks/mt10_sac.py --method mean   --seeds 0 1 2 $COMMON > $OUT/mean.out 2>&1 &
echo "mean $!"
nice -n 10 $PY benchmarks/mt10_sac.py --method pcgrad --seeds 0 1 2 $COMMON > $OUT/pcgrad.out 2>&1 &
echo "pcgrad $!"
nice -n 10 $PY benchmarks/mt10_sac.py --method cagrad --seeds 0 $COMMON > $OUT/cagrad.out 2>&1 &
echo "cagrad $!"
nice -n 10 $PY benchmarks/mt10_sac.py --method famo   --seeds 0 $COMMON > $OUT/famo.out 2>&1 &
echo "famo $!"
