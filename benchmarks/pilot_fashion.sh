#!/usr/bin/env bash
# Issue 21's test of the Fashion-MNIST explanation (README, "Proxy design"): Inception and BN-x5 at the cpu profile,
# crops of 8-100% (the recipes') or 100% of the area, at the recipe's budget or 3x (compression x3, steps x3).
# One seed each; run folders under OUT (default results/pilot/fashion-mnist). Skips a run whose folder exists.
set -euo pipefail
DATA=${DATA:-../shared/data/fashion-mnist/raw}
OUT=${OUT:-results/pilot/fashion-mnist}
COMPRESSION=1.2903226e-4   # the cpu profile's (recipes/imagenet/inception.yaml)
for recipe in bn-x5 inception; do
  base=$(python -c "from bnrepro import recipes; print(recipes.load('$recipe').profiles['cpu'].steps)")
  for crop in 0.08 1.0; do
    for scale in 1 3; do
      name="$recipe-crop$crop-budget${scale}x"
      if ls "$OUT/$name"/imagenet/*/summary.json >/dev/null 2>&1; then echo "done: $name"; continue; fi
      rm -rf "${OUT:?}/$name"
      comp=$(python -c "print(f'{$COMPRESSION * $scale:.8g}')")
      echo "run: $name ($((base * scale)) steps)"
      bnrepro imagenet --recipe "$recipe" --profile cpu --dataset-dir "$DATA" --out "$OUT/$name" --no-progress \
        --steps $((base * scale)) --set "data.crop_min_area=$crop" --set "profiles.cpu.compression=$comp"
    done
  done
done
