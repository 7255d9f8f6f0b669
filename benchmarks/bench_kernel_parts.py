"""Where the native MNIST kernel's time goes, part by part, against the best rate each part could run at on this CPU;
and the bound this gives for 10 seeds of Fig. 1 (README, "Speed": "Where the time goes, and the bound").

What it measures, in one invocation, everything on one thread:

- The parts of a model-step, inside the kernel: bnrepro/native/mlp.cpp built with ``-DBNREPRO_PART_TIMES``
  (through ``native.defined``, the package's flags otherwise; its ``PART`` markers then count the time stamp counter's
  ticks per part) trains the stack ``bnrepro mnist --seeds 10`` builds (both variants, 20 models) on real MNIST for
  ``--steps`` steps, in chunks of the recipe's ``eval.every`` as the trainer calls it. Ticks become microseconds
  per model-step through the counter's rate, measured against ``time.perf_counter`` over the run. Check printed:
  the parts add up to the train calls' time.
- A best rate for each part: the products at this core's FMA peak (the faster of a 1024^3 ``torch.mm`` and a
  batched 60x100x100 ``torch.bmm``); the sparse first layer at the speed of a gather-sum of the same weight rows
  (``torch.embedding_bag`` on a 784x100 weight with the batches' own pixel lists, many batches in one call so that
  dispatch does not count); its gradient and update as a gather-sum of the gradient's rows by pixel (the same
  call) plus a read-modify-write of the rows of the pixels a batch uses (a dense ``sub_``). A part's best rate is
  the faster of its reference and its measured time. BN, the elementwise work, the other updates and the chunk's
  setup have no reference: the bound counts them as measured.
- An evaluation, on the package's own build of the kernel: Alg. 2's population pass over ``eval.population_batches``
  mini-batches and inference on the 10,000 test images (the instrumented build's split of both is shown too).

The bound is the README's arithmetic: every part at its best rate, summed, x (20 models x ``train.steps``) /
``--cores``, plus (``train.steps`` / ``eval.every`` + 1) evaluations / ``--cores``; it assumes the cores scale
perfectly.

    python benchmarks/bench_kernel_parts.py --data-dir ../shared/data --steps 2000
    python benchmarks/bench_kernel_parts.py --steps 50    # a quick check that it runs; its numbers mean little

Run it on an otherwise idle machine: a second process on the cores moves every figure, and the counter's ticks
count the time the thread waited for a core in whichever part it was in.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bnrepro import native, recipes
from bnrepro.data import mnist
from bnrepro.experiments import mnist as experiment
from bnrepro.models.mlp_native import NativeStack
from bnrepro.runs import git_commit, now

DEFINE = "BNREPRO_PART_TIMES"  # the kernel's build that counts ticks per part of the work
# enum Part in mlp.cpp, in its order: (name, what it covers)
PARTS = (
    ("products", "the hidden and output layers' matrix products, forward and backward"),
    ("sparse", "the first layer forward: sums of weight rows"),
    ("first_update", "the first layer's gradient and SGD update"),
    ("bn", "BN forward and backward, its averages and gamma/beta updates"),
    ("elementwise", "sigmoids, bias, softmax and loss, transposes, sigmoid gradients"),
    ("updates", "the other SGD updates (hidden and output weights, output bias)"),
    ("setup", "per chunk: mini-batches by pixel, private copies of the parameters"),
)


class PartClock:
    """The instrumented library's part totals and time stamp counter."""

    def __init__(self, library: ctypes.CDLL):
        self._times, self._ticks = library.bnrepro_mlp_part_times, library.bnrepro_mlp_ticks
        self._times.argtypes, self._times.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64
        self._ticks.argtypes, self._ticks.restype = [], ctypes.c_uint64

    def ticks(self) -> int:
        return self._ticks()

    def take(self) -> dict[str, float]:
        """Ticks per part since the last call (which the kernel then forgets)."""
        out = (ctypes.c_double * len(PARTS))()
        count = self._times(ctypes.cast(out, ctypes.c_void_p), len(PARTS))
        if count != len(PARTS):
            raise SystemExit(f"the kernel counts {count} parts, this script knows {len(PARTS)}: update PARTS")
        return {name: out[i] for i, (name, _) in enumerate(PARTS)}


def best_time(call: Callable[[], object], number: int = 1, repeats: int = 5) -> float:
    """Seconds per call: the least over ``repeats`` rounds of ``number`` calls, after one round of warm-up."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for _ in range(number):
            call()
        times.append((time.perf_counter() - start) / number)
    return min(times[1:])


@dataclass
class Batches:
    """The trained mini-batches' sizes: active pixels per example, and the pixels a batch uses (rows the first
    layer's update touches); and both layouts of the first ``sample`` batches' pixel lists for the references."""

    rows_per_example: float
    used_per_batch: float
    examples: torch.Tensor  # (sample, batch)
    by_example: tuple[torch.Tensor, torch.Tensor]  # concatenated pixel lists of every example, and their starts
    by_pixel: tuple[torch.Tensor, torch.Tensor]  # per batch and used pixel, the batch's rows that have it on


def batch_sizes(task: experiment.NativeMnistTask, steps: range, sample: int = 200) -> Batches:
    examples = torch.stack([task.batches.indices(s) for s in steps])
    counts = task.train_rows.offsets.diff()
    bits = task.train_bits.bool()
    used = [int(bits[e].any(0).sum()) for e in examples[:sample]]
    picked = examples[:sample].reshape(-1)
    lists = [task.train_rows.features[task.train_rows.offsets[e]: task.train_rows.offsets[e + 1]].long()
             for e in picked.tolist()]
    pixel_rows, pixel_starts, at = [], [], 0
    for batch in examples[:sample]:
        pixel, row = bits[batch].t().nonzero(as_tuple=True)  # in pixel order, rows in order within each
        starts = torch.searchsorted(pixel, pixel.unique())
        pixel_rows.append(row)
        pixel_starts.append(starts + at)
        at += len(row)
    return Batches(float(counts[examples].float().mean()), sum(used) / len(used), examples[:sample],
                   (torch.cat(lists), torch.cumsum(torch.tensor([0] + [len(x) for x in lists[:-1]]), 0)),
                   (torch.cat(pixel_rows), torch.cat(pixel_starts)))


@dataclass
class References:
    """Rates on this core (one thread), and the time per model-step they give the parts that have a reference."""

    peak_gflops: float
    small_gflops: float
    gather_gbs: float
    seconds: dict[str, float]


def references(widths: list[int], batch: int, sizes: Batches, lr: float) -> References:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    peak = 2 * 1024**3 / best_time(lambda: torch.mm(a, b)) / 1e9
    x, w = torch.randn(20, 60, 100), torch.randn(20, 100, 100)
    small = 2 * 20 * 60 * 100 * 100 / best_time(lambda: torch.bmm(x, w), number=50) / 1e9
    flops = 3 * 2 * batch * sum(widths[i] * widths[i + 1] for i in range(1, len(widths) - 1))  # forward + 2 back
    n = widths[1]
    w0 = torch.randn(widths[0], n)
    index, starts = sizes.by_example
    count = len(sizes.examples)
    sparse = best_time(lambda: F.embedding_bag(index, w0, starts, mode="sum")) / count
    gbs = len(index) * n * 4 / (sparse * count) / 1e9
    grad = torch.randn(batch, n)
    rows, pixel_starts = sizes.by_pixel
    gather = best_time(lambda: F.embedding_bag(rows, grad, pixel_starts, mode="sum")) / count
    used = round(sizes.used_per_batch)
    target, step = torch.randn(used, n), torch.randn(used, n)
    rmw = best_time(lambda: target.sub_(step, alpha=lr), number=100)
    return References(peak, small, gbs, {"products": flops / (max(peak, small) * 1e9), "sparse": sparse,
                                         "first_update": gather + rmw})


def train(task: experiment.NativeMnistTask, clock: PartClock, start: int, steps: int, chunk: int,
          lr: float) -> tuple[dict[str, float], float, int]:
    """Steps [start, start + steps) in chunks, as the trainer calls them: ticks per part, the calls' seconds (by
    perf_counter) and their ticks (by the counter)."""
    clock.take()  # whatever ran before is not counted
    seconds, ticks = 0.0, 0
    first, stop = start, start + steps
    while first < stop:
        last = min((first // chunk + 1) * chunk, stop)  # the trainer's chunks end at each evaluation
        began, tick = time.perf_counter(), clock.ticks()
        losses = task.train_steps(first, last, lambda _: lr)
        ticks += clock.ticks() - tick
        seconds += time.perf_counter() - began
        if not losses.isfinite().all():
            raise SystemExit("training diverged: its times would not be an ordinary run's")
        first = last
    return clock.take(), seconds, ticks


def evaluation(task: experiment.NativeMnistTask, engine: NativeStack, step: int,
               clock: PartClock | None = None) -> list[tuple[float, dict[str, float]]]:
    """One population pass (Alg. 2) and one inference on the test set, on ``engine``: each one's seconds, and with
    ``clock`` (``engine`` on its library) each one's ticks per part."""
    steps = range(step, step + task.recipe.eval.population_batches)
    examples = torch.stack([task.batches.indices(s) for s in steps])
    calls = [lambda: engine.estimate_population(examples, task.train_rows),
             lambda: engine.predict(task.test_rows, task.recipe.eval.probe_unit)]
    found = []
    for call in calls:
        if clock:
            clock.take()
        began = time.perf_counter()
        call()
        found.append((time.perf_counter() - began, clock.take() if clock else {}))
        task.model.statistics = "population"  # inference with the statistics just estimated, as an evaluation
    return found


@dataclass
class Measured:
    """The instrumented run: ticks per part of training, of a population pass and of an inference; the train calls'
    seconds and ticks; the counter's rate; and an evaluation's seconds on the package's build."""

    steps: int
    members: int
    bn_members: int
    rate: float  # ticks per second
    train: dict[str, float]
    call_seconds: float
    call_ticks: int
    population_parts: dict[str, float]
    predict_parts: dict[str, float]
    population: float
    predict: float

    def microseconds(self) -> dict[str, float]:
        """Per part, microseconds per model-step."""
        return {name: ticks / self.rate / (self.steps * self.members) * 1e6 for name, ticks in self.train.items()}


def measure(args: argparse.Namespace, task: experiment.NativeMnistTask, clock: PartClock) -> Measured:
    recipe, started, start_tick = task.recipe, time.perf_counter(), clock.ticks()
    train(task, clock, 0, args.warmup, recipe.eval.every, recipe.train.lr)
    parts, seconds, ticks = train(task, clock, args.warmup, args.steps, recipe.eval.every, recipe.train.lr)
    step = args.warmup + args.steps
    evaluation(task, NativeStack(task.model, threads=1), step)  # a warm-up: the first evaluation allocates
    (_, population_parts), (_, predict_parts) = evaluation(task, task.engine, step, clock)  # for the split
    rate = (clock.ticks() - start_tick) / (time.perf_counter() - started)
    (population, _), (predict, _) = evaluation(task, NativeStack(task.model, threads=1), step)  # the package's
    return Measured(args.steps, len(task.members), task.model.normalized, rate, parts, seconds, ticks,
                    population_parts, predict_parts, population, predict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST's folder (default: as bnrepro finds it)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps measured")
    parser.add_argument("--warmup", type=int, default=20, help="steps trained first, not measured")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per variant (the bound's 20 models: 10)")
    parser.add_argument("--cores", type=int, default=2, help="cores the bound divides the work over")
    args = parser.parse_args()
    torch.set_num_threads(1)  # torch's references and the kernel's threads (NativeStack takes torch's count)

    variants = {experiment.variant_name(name): recipes.load(name) for name in experiment.DEFAULT_VARIANTS}
    data = mnist.load(args.data_dir)
    with native.defined(DEFINE):  # the stack's engine binds the instrumented kernel's functions when made
        library = native.library("mlp")
        setup = experiment.build(variants, list(range(args.seeds)), data, 0, torch.device("cpu"), "native")
    if setup.engine != "native":
        raise SystemExit(f"the stack runs on the {setup.engine} engine, not the native one")
    task = setup.task
    measured = measure(args, task, PartClock(library))
    sizes = batch_sizes(task, range(args.warmup, args.warmup + args.steps))
    refs = references(list(task.model.widths), task.recipe.train.batch_size, sizes, task.recipe.train.lr)
    print(f"bnrepro {git_commit()}, {now()}, {platform.processor() or platform.machine()}")
    print(f"{args.steps:,} steps x {measured.members} models ({measured.bn_members} with BN), 1 thread; time stamp "
          f"counter {measured.rate / 1e9:.3f} GHz; torch {torch.__version__}")
    counted, rate = sum(measured.train.values()), measured.rate
    print(f"check: the parts add up to {counted / rate:.3f} s; the train calls took {measured.call_seconds:.3f} s by "
          f"perf_counter (parts {counted / rate / measured.call_seconds:.1%} of it) and "
          f"{measured.call_ticks / rate:.3f} s by the counter ({counted / measured.call_ticks:.1%})")
    best = table(measured, sizes, refs)
    bound(measured, best, refs, task.recipe, args.cores)


def table(measured: Measured, sizes: Batches, refs: References) -> dict[str, float]:
    """Prints the README's table; returns each part's best rate, microseconds per model-step."""
    us, members, bn_members = measured.microseconds(), measured.members, max(measured.bn_members, 1)
    work = {
        "products": f"{refs.seconds['products'] * refs.peak_gflops * 1e3:.2f} MFLOP",
        "sparse": f"~{sizes.rows_per_example:.0f} weight rows of 400 B per example",
        "first_update": f"rows of the ~{sizes.used_per_batch:.0f} pixels the batch uses",
        "bn": f"BN models only: {us['bn'] * members / bn_members:.1f} µs per BN model-step",
    }
    how = {
        "products": f"FMA peak: the faster of a 1024^3 mm, {refs.peak_gflops:.0f} GFLOP/s, and a batched "
                    f"60x100x100 bmm, {refs.small_gflops:.0f}",
        "sparse": f"gather-sum of the rows at {refs.gather_gbs:.0f} GB/s (embedding_bag)",
        "first_update": "gather-sum of gradient rows by pixel + the rows' read-modify-write",
    }
    best = {name: min(refs.seconds[name] * 1e6, us[name]) if name in refs.seconds else us[name] for name in us}
    print("\n| part | work | measured, µs per model-step | best rate, µs |")
    print("|---|---|---|---|")
    for name, what in PARTS:
        note = how.get(name, "no reference: as measured")
        if name in refs.seconds and best[name] < refs.seconds[name] * 1e6:
            note = f"as measured, faster than its reference's {refs.seconds[name] * 1e6:.1f} µs: {note}"
        print(f"| {name}: {what} | {work.get(name, '')} | {us[name]:.1f} | {best[name]:.1f} ({note}) |")
    print(f"| total | | {sum(us.values()):.1f} | {sum(best.values()):.1f} |")
    return best


def bound(measured: Measured, best: dict[str, float], refs: References, recipe, cores: int) -> None:
    """Prints an evaluation's cost and the README's bound."""
    per_eval, rate = measured.population + measured.predict, measured.rate
    print(f"\none evaluation on the package's kernel, 1 thread: the population pass over "
          f"{recipe.eval.population_batches:,} mini-batches {measured.population:.3f} s + inference on the test set "
          f"{measured.predict:.3f} s = {per_eval:.3f} s")
    for label, found in (("population pass", measured.population_parts), ("inference", measured.predict_parts)):
        split = ", ".join(f"{name} {ticks / sum(found.values()):.0%}" for name, ticks in found.items() if ticks)
        print(f"  its {label}, split on the instrumented build ({sum(found.values()) / rate:.3f} s): {split}")
    evaluations = recipe.train.steps // recipe.eval.every + 1
    per_core = measured.members * recipe.train.steps / cores * 1e-6  # seconds per µs of a model-step
    print(f"\nthe bound: {measured.members} models x {recipe.train.steps:,} steps and {evaluations} evaluations on "
          f"{cores} cores (perfect scaling)")
    for name in refs.seconds:
        print(f"  {name} at its best rate: {best[name] * per_core:.1f} s")
    rest = sum(value for name, value in best.items() if name not in refs.seconds)
    print(f"  the other parts as measured: {rest * per_core:.1f} s")
    print(f"  evaluations: {evaluations * per_eval / cores:.1f} s")
    total = sum(best.values()) * per_core + evaluations * per_eval / cores
    measured_total = sum(measured.microseconds().values()) * per_core + evaluations * per_eval / cores
    print(f"  bound: {total:.0f} s; at the rates measured: {measured_total:.0f} s (the bound is "
          f"{total / measured_total:.0%} of it)")
    if not math.isfinite(total):
        raise SystemExit("a measurement failed")


if __name__ == "__main__":
    main()
