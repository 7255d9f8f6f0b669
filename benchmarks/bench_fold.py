"""Inference speed of BN-Inception before and after folding BN into the convolutions (Alg. 2, step 11).

    python benchmarks/bench_fold.py --resolution 224 --batch 8 --device cpu

Both networks compute the same function (tests/test_inception.py checks it); the folded one skips the
per-channel scale and shift after every convolution.
"""

from __future__ import annotations

import argparse
import time

import torch

from bnrepro.models.batchnorm import estimate_population, use_statistics
from bnrepro.models.inception import Inception, InceptionConfig, fold, switches


def images_per_second(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return repeats * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Inception(InceptionConfig(switches(batch_norm=True, stem="plain"))).to(args.device)
    with torch.no_grad():  # Alg. 2's population statistics, which fold merges into the convolutions
        estimate_population(model, lambda: model(torch.randn(16, 3, args.resolution, args.resolution,
                                                             device=args.device)))
    model.eval()
    use_statistics(model, "population")  # the BN network that the folded one equals
    folded = fold(model)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=args.device)
    with torch.inference_mode():
        error = (model(x) - folded(x)).abs().max().item()
    bn, plain = images_per_second(model, x, args.repeats), images_per_second(folded, x, args.repeats)
    print(f"{args.device}, {args.resolution} px, batch {args.batch}: BN network {bn:.1f} img/s, folded "
          f"{plain:.1f} img/s, speed-up {plain / bn:.2f}x (max |difference| {error:.1e})")


if __name__ == "__main__":
    main()
