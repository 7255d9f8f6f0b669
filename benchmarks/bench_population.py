"""What Alg. 2 at every evaluation costs: one evaluation with the moving averages against one with population
statistics estimated afresh (the trainer's default, ``eval.statistics: population``), on the same weights, in one
invocation.

- ImageNet recipes (BN-x5 at a profile, default cpu on Fashion-MNIST's idx files): ``ImagenetTask.evaluate``, whose
  population pass is ``profiles.<p>.population_batches`` training mini-batches through the frozen network before
  the whole validation set is scored.
- MNIST (both variants, ``--seeds`` each): ``MnistTask.evaluate``, whose population pass is
  ``eval.population_batches`` (1,000) mini-batches of 60 through the stack.

    python benchmarks/bench_population.py                         # ../shared/data, 2 cores
    python benchmarks/bench_population.py --profile proxy --device cuda

Each figure is the median of ``--repeats`` evaluations after one warm-up; the ratio is the added cost.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bnrepro import recipes
from bnrepro.data import mnist
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.experiments import imagenet as experiment
from bnrepro.experiments import mnist as mnist_experiment
from bnrepro.experiments.imagenet import clock
from bnrepro.runs import device_name, resolve_device

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def timed(evaluate, device: torch.device, repeats: int) -> float:
    """Median seconds of ``evaluate()`` over ``repeats`` calls after one warm-up."""
    evaluate()
    seconds = []
    for _ in range(repeats):
        start = clock(device)
        evaluate()
        seconds.append(clock(device) - start)
    return statistics.median(seconds)


def imagenet_costs(profile: str, device: str, repeats: int) -> None:
    recipe = recipes.load("bn-x5")
    options = experiment.Options(DATA / "fashion-mnist" / "raw", device=device, workers=0, show_progress=False)
    task, _, p = experiment.build(recipe, profile, options, SINGLE_PROCESS)
    task.model.eval()
    loss = torch.zeros(1)
    moving = timed(lambda: task.evaluate(0, loss, "moving"), task.device, repeats)
    population = timed(lambda: task.evaluate(0, loss, "population"), task.device, repeats)
    print(f"imagenet bn-x5 at profile {profile} ({device_name(task.device)}): evaluation of {len(task.val_split):,} "
          f"images {moving:.2f} s with the moving averages, {population:.2f} s with Alg. 2 over "
          f"{p.population_batches} x {p.batch_size} training images: +{100 * (population / moving - 1):.0f}%")


def mnist_costs(seeds: int, device: str, repeats: int) -> None:
    variants = {name: recipes.load(name) for name in mnist_experiment.DEFAULT_VARIANTS}
    data = mnist.load(DATA)
    setup = mnist_experiment.build(variants, list(range(seeds)), data, 0, resolve_device(device), "auto")
    task, members = setup.task, len(setup.members)
    loss = torch.zeros(members)
    with task.running():
        moving = timed(lambda: task.evaluate(0, loss, "moving"), torch.device("cpu"), repeats)
        population = timed(lambda: task.evaluate(0, loss, "population"), torch.device("cpu"), repeats)
    batches = next(iter(variants.values())).eval.population_batches
    print(f"mnist, {members} models ({setup.engine} engine): evaluation {moving:.3f} s with the moving averages, "
          f"{population:.3f} s with Alg. 2 over {batches:,} mini-batches: +{100 * (population / moving - 1):.0f}% "
          f"(x101 evaluations: +{101 * (population - moving):.0f} s a run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    imagenet_costs(args.profile, args.device, args.repeats)
    for seeds in args.seeds:
        mnist_costs(seeds, args.device, args.repeats)


if __name__ == "__main__":
    main()
