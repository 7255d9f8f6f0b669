#!/usr/bin/env bash
# Issue 21's crop pilot (README, "Proxy design"): Inception at the CIFAR-10 profile's scale (32 px, width 1/4,
# batch 128), the crop's smallest area at 0.08, 0.25, 0.5 and 1.0; one seed each. The budget: compression C and
# Inception's steps (31.0e6 x C), 10 evaluations. The first pilot ran with C=2.0e-4 STEPS=6200
# OUT=results/pilot/cifar10-crops; the budget rule then raised C to 3.0e-4 (the defaults).
# Run folders under OUT. Skips a run whose summary exists.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10}
C=${C:-3.0e-4}
STEPS=${STEPS:-9300}
OUT=${OUT:-results/pilot/cifar10-crops-c3e-4}
for area in 0.08 0.25 0.5 1.0; do
  name="inception-crop$area"
  if ls "$OUT/$name"/imagenet/*/summary.json >/dev/null 2>&1; then echo "done: $name"; continue; fi
  rm -rf "${OUT:?}/$name"
  echo "run: $name"
  bnrepro imagenet --recipe inception --profile cpu --dataset-dir "$DATA" --out "$OUT/$name" --no-progress \
    --steps "$STEPS" --set "data.crop_min_area=$area" --set "profiles.cpu.compression=$C" \
    --set profiles.cpu.train_examples=50000 --set "profiles.cpu.eval_every=$((STEPS / 10))" \
    --set "profiles.cpu.checkpoint_every=$((STEPS / 2))"
done
