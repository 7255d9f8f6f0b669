"""Sweep speed in the grid's saturated corner against its ordinary point: the whole `bnrepro sweep`, in one invocation.

Issue 23: the same 8 models x 2,000 steps took 45.5 s at learning rates 30-100 and initial stds 5-10, against 18.7 s
at learning rate 0.3 and std 0.1 (whole commands, start-up included). The extra time was subnormal floats: saturated
sigmoids, softmax terms and their gradients make millions of them, and on x86 each operation on one takes a microcode
assist. The native kernel now flushes them to zero while it runs (``FlushDenormals`` in bnrepro/native/mlp.cpp).

This times the two grid points as a user meets them: the whole ``bnrepro sweep`` command in a fresh process, on the
native engine, ``--repeats`` times each (interleaved, so that a change in the machine's load falls on both), and
prints the median times and the corner's cost per model-step over the ordinary point's (start-up included, as in the
issue). Both points train 8 models: the corner a 2 x 2 grid of 1 seed with and without BN, the ordinary point one
grid point of 4 seeds.

``--keep-denormals`` also runs every command on the kernel built with the flush compiled out
(``BNREPRO_KEEP_DENORMALS``, as ``native.defined`` builds it): the speed before the fix on the same machine, and the
flush's effect on the results (the two builds' metrics.csv compared row by row: equal bits, or the largest difference
per column).

    python benchmarks/bench_sweep_corner.py --data-dir ../shared/data                  # 3 repeats
    python benchmarks/bench_sweep_corner.py --data-dir ../shared/data --repeats 5 --keep-denormals
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bnrepro import native

# Runs ``bnrepro`` on the kernel built with the macros given first (space-separated; "" for the package's build): the
# same command on another build of the kernel. A fresh process has loaded no kernel yet, so setting ``native.DEFINES``
# before the command is all that ``native.defined`` would do.
LAUNCH = "import sys; from bnrepro import cli, native; native.DEFINES = tuple(sys.argv.pop(1).split()); cli.run()"
BUILDS = {"flush": (), "keep": ("BNREPRO_KEEP_DENORMALS",)}  # the package's kernel; the one without the flush


@dataclass(frozen=True)
class Point:
    """A grid of ``bnrepro sweep``: its options, and how many models it trains."""

    name: str
    options: tuple[str, ...]
    models: int


POINTS = {
    "corner": Point("corner (lr 30-100, std 5-10)", ("--lr-min", "30", "--lr-max", "100", "--lrs", "2",
                                                     "--init-min", "5", "--init-max", "10", "--inits", "2",
                                                     "--seeds", "1"), 8),
    "ordinary": Point("ordinary (lr 0.3, std 0.1)", ("--lr-min", "0.3", "--lr-max", "0.3", "--lrs", "1",
                                                     "--init-min", "0.1", "--init-max", "0.1", "--inits", "1",
                                                     "--seeds", "4"), 8),
}


def build(macros: tuple[str, ...]) -> None:
    """Compile (or find in the cache) the kernel with ``macros`` defined, as the timed commands will load it."""
    with native.defined(*macros):
        native.library("mlp")


def sweep(point: Point, macros: tuple[str, ...], steps: int, data_dir: Path | None) -> tuple[float, pd.DataFrame]:
    """One whole ``bnrepro sweep`` command on the kernel built with ``macros``: its wall time and its metrics."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-c", LAUNCH, " ".join(macros), "sweep", *point.options, "--steps", str(steps),
                   "--device", "cpu", "--engine", "native", "--out", out, "--no-progress"]
        command += ["--data-dir", str(data_dir)] if data_dir else []
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:  # its notices (the --steps deviation) are shown only then
            raise SystemExit(f"bnrepro sweep failed ({done.returncode}):\n{done.stderr}")
        (run_dir,) = Path(out, "sweep").iterdir()
        engine = json.loads((run_dir / "manifest.json").read_text())["engine"]
        if engine != "native":
            raise SystemExit(f"the sweep ran on the {engine} engine, not the native one")
        return seconds, pd.read_csv(run_dir / "metrics.csv")


def compare(flushed: pd.DataFrame, kept: pd.DataFrame) -> str:
    """The flush's effect on one sweep's metrics: equal bits (NaN equal to NaN), or per column that differs, the
    rows that differ and the largest difference."""
    if list(flushed.columns) != list(kept.columns) or len(flushed) != len(kept):
        return "different tables (columns or rows)"
    numeric = [c for c in flushed.columns if pd.api.types.is_float_dtype(flushed[c])]
    found = []
    for column in numeric:
        a, b = flushed[column].to_numpy(), kept[column].to_numpy()
        differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        if differ.any():
            gap = np.abs(a[differ] - b[differ])
            found.append(f"{column}: {differ.sum()} of {len(a)} rows, max |difference| {np.nanmax(gap):.3g}"
                         if np.isfinite(gap).any() else f"{column}: {differ.sum()} of {len(a)} rows (NaN in one)")
    rest = [c for c in flushed.columns if c not in numeric]
    if not flushed[rest].equals(kept[rest]):
        found.append("non-numeric columns differ")
    return "; ".join(found) if found else "identical, bit for bit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", nargs="+", choices=sorted(POINTS), default=["corner", "ordinary"],
                        help="grid points to run (the ratio needs both)")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="also run the kernel without its flush of subnormals, and compare the results")
    args = parser.parse_args()

    builds = {name: macros for name, macros in BUILDS.items() if name == "flush" or args.keep_denormals}
    for macros in builds.values():
        build(macros)  # compiled before any timing
    times: dict[tuple[str, str], list[float]] = {}
    metrics: dict[tuple[str, str], pd.DataFrame] = {}
    for repeat in range(args.repeats):
        for point in args.points:
            for name, macros in builds.items():
                seconds, found = sweep(POINTS[point], macros, args.steps, args.data_dir)
                times.setdefault((point, name), []).append(seconds)
                metrics.setdefault((point, name), found)  # the first repeat's (every repeat gives the same)
                print(f"repeat {repeat + 1}: {POINTS[point].name}, {name}: {seconds:.1f} s", flush=True)

    print(f"\n`bnrepro sweep`, 8 models x {args.steps:,} steps, whole command (start-up included), median of "
          f"{args.repeats}:\n")
    print("| grid point | kernel | median (s) | ms per model-step (start-up included) |")
    print("|---|---|---|---|")
    median = {key: statistics.median(values) for key, values in times.items()}
    for (point, name), seconds in median.items():
        per_step = 1e3 * seconds / (POINTS[point].models * args.steps)
        label = "flushes subnormals" if name == "flush" else "keeps subnormals (before the fix)"
        print(f"| {POINTS[point].name} | {label} | {seconds:.1f} | {per_step:.3f} |")
    print()
    for name in builds:
        if ("corner", name) in median and ("ordinary", name) in median:
            ratio = (median["corner", name] / POINTS["corner"].models) / (median["ordinary", name] /
                                                                          POINTS["ordinary"].models)
            print(f"corner / ordinary per model-step, kernel that {'flushes' if name == 'flush' else 'keeps'} "
                  f"subnormals: {ratio:.2f}x")
    if args.keep_denormals:
        print("\nthe flush's effect on the results (metrics.csv, flush vs keep):")
        for point in args.points:
            print(f"  {POINTS[point].name}: {compare(metrics[point, 'flush'], metrics[point, 'keep'])}")


if __name__ == "__main__":
    main()
