#!/usr/bin/env bash
# Why `bnrepro reproduce --jobs 2`: one 2-thread training process against two 1-thread processes at once, on the
# laptop profile (Inception at profile cpu, --synthetic: the training step alone, no data, no run folder). Run it
# with nothing else on the machine; the summed images/s of the two together over the 2-thread rate is the speed-up.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-150}
step() { bnrepro imagenet --recipe inception --profile cpu --synthetic --steps "$STEPS" --no-progress 2>&1 | tail -1; }
echo "== one process, $(nproc) threads"; step
echo "== one process, 1 thread"; OMP_NUM_THREADS=1 step
echo "== two processes, 1 thread each, at once"
OMP_NUM_THREADS=1 step > /tmp/bench_jobs.a & OMP_NUM_THREADS=1 step > /tmp/bench_jobs.b; wait
cat /tmp/bench_jobs.a /tmp/bench_jobs.b
