#!/usr/bin/env bash
# Issue 21's crop pilot (README, "Proxy design"): Inception at the CIFAR-10 profile's scale (32 px, width 1/4,
# batch 128), the crop's smallest area at 0.08, 0.25, 0.5 and 1.0; one seed each. The budget: compression C and
# Inception's steps (31.0e6 x C), 10 evaluations. The first pilot ran with C=2.0e-4 STEPS=6200
# OUT=results/pilot/cifar10-crops, the second with C=3.0e-4 STEPS=9300 OUT=results/pilot/cifar10-crops-c3e-4 (the
# area set as data.crop_min_area; the profile has its own since, set here), the third with C=4.5e-4 STEPS=13950
# OUT=results/pilot/cifar10-crops-c4.5e-4; the budget rule raised C each time.
# JOBS runs at once, each on CPUS / JOBS threads (two 1-thread runs train 1.4x the images/s of one 2-thread run on
# a 2-core CPU). Run folders under OUT. Skips a run whose summary exists; resumes one interrupted after a checkpoint.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10}
C=${C:-6.75e-4}
STEPS=${STEPS:-20925}
OUT=${OUT:-results/pilot/cifar10-crops-c6.75e-4}
JOBS=${JOBS:-2}
THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))
one() {
  local area=$1 name="inception-crop$1" run
  if ls "$OUT/$name"/imagenet/*/summary.json >/dev/null 2>&1; then echo "done: $name"; return; fi
  run=$(ls -d "$OUT/$name"/imagenet/*/ 2>/dev/null | tail -1 || true)
  if [ -n "$run" ] && [ -f "$run/checkpoint.pt" ]; then
    echo "resume: $name"
    OMP_NUM_THREADS=$THREADS bnrepro imagenet --resume "$run" --dataset-dir "$DATA" --no-progress \
      >> "$OUT/$name.log" 2>&1
  else
    rm -rf "${OUT:?}/$name"
    echo "run: $name"
    OMP_NUM_THREADS=$THREADS bnrepro imagenet --recipe inception --profile cpu --dataset-dir "$DATA" \
      --out "$OUT/$name" --no-progress --steps "$STEPS" --set "profiles.cpu.crop_min_area=$area" \
      --set "profiles.cpu.compression=$C" --set profiles.cpu.train_examples=50000 \
      --set "profiles.cpu.eval_every=$((STEPS / 10))" --set "profiles.cpu.checkpoint_every=$((STEPS / 10))" \
      > "$OUT/$name.log" 2>&1
  fi
  echo "finished: $name"
}
mkdir -p "$OUT"
running=0
for area in 1.0 0.5 0.25 0.08; do
  one "$area" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
