"""MNIST speed: `bnrepro mnist` against a plain eager PyTorch loop doing the same work, in one invocation.

The reference is what one would write first: an ``nn.Sequential`` per variant (Linear, [BatchNorm1d],
Sigmoid) x3 + Linear, SGD, binary MNIST held in memory as float tensors (no DataLoader), the same
mini-batch order, and a full 10,000-image test evaluation every 500 steps, BN's with Alg. 2's population
statistics where the recipe's evaluations use them (``population``: 1,000 training mini-batches forward in training
mode, BN's cumulative averages); one model after the other.
bnrepro trains every model of the run together: with its native engine (bnrepro/native/mlp.cpp, the default
on a CPU with a C++ compiler) or, with --engine torch, as one batched torch stack (bnrepro/models/mlp.py).
bnrepro is timed as a user meets it: the whole ``bnrepro mnist`` command in a fresh process, from start-up
and imports to the summary table and the interpreter's exit (the plain loop runs in this process, so its time
leaves those ~3 s out).

    python benchmarks/bench_mnist.py --data-dir ../shared/data            # 50,000 steps, 1 and 10 seeds
    python benchmarks/bench_mnist.py --data-dir ../shared/data --steps 5000 --seeds 1

Also prints the compute bound: FLOPs per step and the machine's measured fp32 GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bnrepro import recipes
from bnrepro.data import mnist
from bnrepro.runs import git_commit, now


def plain_loop(data: mnist.MnistArrays, recipe: recipes.MnistRecipe, batch_norm: bool, seed: int, steps: int) -> float:
    """Train one model the ordinary way; returns its final test accuracy."""
    torch.manual_seed(seed)
    layers, width = [], 784
    for hidden in recipe.model.hidden:
        layers += [nn.Linear(width, hidden, bias=not batch_norm)]
        if batch_norm:
            layers += [nn.BatchNorm1d(hidden, eps=recipe.model.bn_eps, momentum=recipe.model.bn_momentum)]
        layers += [nn.Sigmoid()]
        width = hidden
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=recipe.model.init_std, a=-0.2, b=0.2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.train.lr)
    threshold = recipe.data.binarize_threshold
    train_x = mnist.binarize(data.train_images, threshold).float()
    test_x = mnist.binarize(data.test_images, threshold).float()
    batches = mnist.EpochBatches(len(train_x), recipe.train.batch_size, seed=0)
    accuracy = 0.0
    for step in range(steps):
        index = batches.indices(step)
        model.train()
        loss = nn.functional.cross_entropy(model(train_x[index]), data.train_labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % recipe.eval.every == 0 or step + 1 == steps:
            if batch_norm and (recipe.eval.statistics == "population" or step + 1 == steps):
                population(model, train_x, batches, step + 1, recipe.eval.population_batches)
            model.eval()
            with torch.no_grad():
                accuracy = (model(test_x).argmax(1) == data.test_labels).float().mean().item()
    return accuracy


@torch.no_grad()
def population(model: nn.Module, train_x: torch.Tensor, batches: mnist.EpochBatches, step: int, count: int) -> None:
    """Alg. 2 as plain PyTorch writes it (the "precise BN" idiom): BN's running statistics reset, then the cumulative
    average (``momentum=None``) of the batch mean and unbiased variance over the ``count`` training mini-batches
    that follow ``step``, forward passes in training mode. The same work as bnrepro's pass at each evaluation."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for s in range(step, step + count):
        model(train_x[batches.indices(s)])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def gemm_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * 1024**3 / (time.perf_counter() - start) / 1e9


def step_flops(recipe: recipes.MnistRecipe, density: float) -> tuple[float, float]:
    """FLOPs of one training step of one model: dense, and with the binary input layer done sparsely."""
    widths, batch = [784, *recipe.model.hidden, 10], recipe.train.batch_size
    first, rest = widths[0] * widths[1], sum(a * b for a, b in zip(widths[1:-1], widths[2:]))
    dense = 2 * batch * (2 * first + 3 * rest)  # forward + weight gradient for all, input gradient past layer 1
    sparse = 2 * batch * (2 * density * first + 3 * rest)
    return dense, sparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--plain-steps", type=int, default=None,
                        help="time the plain loop on this many steps per model and scale to --steps "
                             "(its cost per step is constant); default: all --steps")
    parser.add_argument("--skip-plain", action="store_true", help="only time bnrepro")
    parser.add_argument("--engine", default="auto", help="bnrepro's engine: auto, native or torch")
    args = parser.parse_args()

    data = mnist.load(args.data_dir)
    recipe = recipes.load("mnist/baseline")
    density = mnist.binarize(data.train_images, recipe.data.binarize_threshold).float().mean().item()
    dense, sparse = step_flops(recipe, density)
    rate = gemm_gflops()
    print(f"bnrepro {git_commit()}, {now()}, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"machine: {torch.get_num_threads()} threads, fp32 GEMM {rate:.0f} GFLOP/s (1024^3)")
    print(f"one model-step: {dense / 1e6:.1f} MFLOP dense, {sparse / 1e6:.1f} MFLOP with the sparse binary input "
          f"(density {density:.3f}); {args.steps:,} steps of 2 models = {2 * args.steps * sparse / rate / 1e9:.1f} s "
          "at that rate, before evaluation")

    rows = []
    for seeds in args.seeds:
        plain = None
        if not args.skip_plain:
            plain_steps = min(args.plain_steps or args.steps, args.steps)
            start = time.perf_counter()
            accuracies = [plain_loop(data, recipe, bn, seed, plain_steps)
                          for seed in range(seeds) for bn in (False, True)]
            plain = (time.perf_counter() - start) * args.steps / plain_steps
            scaled = f", measured on {plain_steps:,} steps and scaled" if plain_steps < args.steps else ""
            print(f"plain eager loop, {seeds} seed(s) x 2 variants: {plain:.1f} s{scaled} (final accuracies "
                  f"{', '.join(f'{a:.4f}' for a in accuracies)})")
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "bnrepro", "mnist", "--seeds", str(seeds), "--steps", str(args.steps),
                       "--device", "cpu", "--engine", args.engine, "--out", out, "--no-progress"]
            command += ["--data-dir", str(args.data_dir)] if args.data_dir else []
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            ours = time.perf_counter() - start
            (run_dir,) = Path(out, "mnist").iterdir()
            engine = json.loads((run_dir / "manifest.json").read_text())["engine"]
            summary = json.loads((run_dir / "summary.json").read_text())["variants"]
        finals = ", ".join(f"{name} {v['final_test_accuracy_mean']:.4f}" for name, v in summary.items())
        print(f"bnrepro mnist ({engine} engine), {seeds} seed(s) x 2 variants: {ours:.1f} s (final accuracy, mean "
              f"over seeds: {finals})")
        rows.append((seeds, plain, ours))

    print("\n| seeds per variant | plain eager loop (s) | bnrepro (s) | speed-up |")
    print("|---|---|---|---|")
    for seeds, plain, ours in rows:
        ratio = f"{plain / ours:.1f}x" if plain else "-"
        print(f"| {seeds} | {plain:.1f} | {ours:.1f} | {ratio} |" if plain else f"| {seeds} | - | {ours:.1f} | - |")


if __name__ == "__main__":
    main()
