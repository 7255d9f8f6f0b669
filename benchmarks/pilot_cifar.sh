#!/usr/bin/env bash
# Issue 21's crop pilot (README, "Proxy design"): Inception at the CIFAR-10 profile's scale (32 px, width 1/4,
# batch 128, compression 2.0e-4: 6,200 steps), the crop's smallest area at 0.08, 0.25, 0.5 and 1.0; one seed each.
# Run folders under OUT (default results/pilot/cifar10-crops). Skips a run whose summary exists.
set -euo pipefail
DATA=${DATA:-../shared/data/cifar10}
OUT=${OUT:-results/pilot/cifar10-crops}
for area in 0.08 0.25 0.5 1.0; do
  name="inception-crop$area"
  if ls "$OUT/$name"/imagenet/*/summary.json >/dev/null 2>&1; then echo "done: $name"; continue; fi
  rm -rf "${OUT:?}/$name"
  echo "run: $name"
  bnrepro imagenet --recipe inception --profile cpu --dataset-dir "$DATA" --out "$OUT/$name" --no-progress \
    --steps 6200 --set "data.crop_min_area=$area" --set profiles.cpu.compression=2.0e-4 \
    --set profiles.cpu.train_examples=50000 --set profiles.cpu.eval_every=620 --set profiles.cpu.checkpoint_every=3100
done
