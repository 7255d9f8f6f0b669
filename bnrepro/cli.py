"""Command line: parses options and hands them to the package; no experiment logic lives here."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import math
import os
import shlex
import sys
import threading
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bnrepro import recipes
from bnrepro.engine.trainer import Interrupted
from bnrepro.errors import UserError
from bnrepro.paper import PAPER

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproduce Ioffe & Szegedy (2015), Batch Normalization: experiments, figures, tables.")
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and compare recipes.")
app.add_typer(recipes_app, name="recipes")
console = Console(soft_wrap=True)  # piped output (e.g. recipes show | yaml) is never re-wrapped
errors = Console(stderr=True, soft_wrap=True)  # one line, however long

Overrides = Annotated[list[str], typer.Option("--set", help="Override a recipe value: dotted.key=value.")]
STUDIES = ("paper", "changes")  # what `bnrepro reproduce --study` runs: the paper's campaign, or the changes study
DataDir = Annotated[Path | None, typer.Option(
    help="Folder with mnist/raw/*.gz (default: $BNREPRO_DATA, else the user cache, else the copy in the package).")]

# What the command-line parser raises for a bad command line. typer >= 0.29 vendors click (typer._click) and no
# longer installs the click package; older typer uses click itself. Either way typer's public BadParameter
# derives from the parser's own classes, so they are found from it, never by importing click.
ClickException = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "ClickException")
UsageError = next(k for k in typer.BadParameter.__mro__ if k.__name__ == "UsageError")


def _with_flag(overrides: list[str], flag: str, key: str, value: object) -> list[str]:
    """``overrides`` plus ``key=value`` for ``flag``; a --set of the same key (or of a section holding it) is an
    error, not silently replaced by the flag's value."""
    if value is None:
        return overrides
    for text in overrides:
        given = text.partition("=")[0].strip()
        if given == key or key.startswith(given + "."):
            raise UserError(f"{flag} {value} and --set {text} both set {key}; give only one of them")
    return [*overrides, f"{key}={value}"]


def _refuse_setup_on_resume(ctx: typer.Context, resume: Path | None, options: tuple[str, ...]) -> None:
    """A resume continues a run exactly as its folder records it was set up; an option that sets a run up, given
    beside --resume, would be silently ignored, so it is an error. "Given" is the parser's own record of where a
    value came from (the command line), so an option repeated at its default value counts too."""
    if resume is None:
        return
    flags = {param.name: "/".join(param.opts[:1] + param.secondary_opts) for param in ctx.command.params}
    given = [flags[name] for name in options if ctx.get_parameter_source(name).name == "COMMANDLINE"]
    if given:
        raise UserError(f"--resume continues a run exactly as it was set up; drop {', '.join(given)} (start a new "
                        f"run to change them)")


@app.command()
def mnist(
    ctx: typer.Context,
    recipe: Annotated[list[str], typer.Option(help="Variants to train together.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per variant (initial weights).")] = 1,
    data_seed: Annotated[int, typer.Option(help="Seed of the mini-batch order, shared by all models.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the recipe's 50,000).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path, typer.Option(help="Results folder; the run goes to OUT/mnist/<time>.")] = Path("results"),
    data_dir: DataDir = None,
    set_: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run folder.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    engine: Annotated[str, typer.Option(help="native (C++, CPU), torch, or auto: native where it can run.")] = "auto",
) -> None:
    """The MNIST diagnostic (Fig. 1): a 3x100 sigmoid network with and without BN."""
    from bnrepro.experiments import mnist as experiment

    _refuse_setup_on_resume(ctx, resume, ("recipe", "seeds", "data_seed", "steps", "out", "set_"))
    try:
        if resume is not None:
            run_dir = experiment.resume(resume, device, data_dir, show_progress=progress, engine=engine)
        else:
            if steps is not None and steps < 0:
                raise UserError(f"--steps must be 0 or more, not {steps}")
            overrides = _with_flag(list(set_ or []), "--steps", "train.steps", steps)
            run_dir = experiment.run(recipe or experiment.DEFAULT_VARIANTS, overrides, seeds, data_seed, device, out,
                                     data_dir, show_progress=progress, engine=engine)
    except Interrupted as stop:
        _stopped(stop, "mnist", data_dir, device, engine)
    from bnrepro.report.mnist import summary_table

    console.print(summary_table(run_dir))
    console.print(f"results: {run_dir}", markup=False)


@app.command()
def sweep(
    ctx: typer.Context,
    lr_min: Annotated[float, typer.Option(help="Smallest learning rate of the grid.")] = 0.01,
    lr_max: Annotated[float, typer.Option(help="Largest learning rate.")] = 100.0,
    lrs: Annotated[int, typer.Option(help="Learning rates, log-spaced.")] = 8,
    init_min: Annotated[float, typer.Option(help="Smallest initial weight std.")] = 0.01,
    init_max: Annotated[float, typer.Option(help="Largest initial weight std.")] = 10.0,
    inits: Annotated[int, typer.Option(help="Initial stds, log-spaced.")] = 6,
    seeds: Annotated[int, typer.Option(help="Seeds per grid point (initial weights).")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps of every model.")] = 10_000,
    data_seed: Annotated[int, typer.Option(help="Seed of the mini-batch order, shared by all models.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path, typer.Option(help="Results folder; the run goes to OUT/sweep/<time>.")] = Path("results"),
    data_dir: DataDir = None,
    set_: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted sweep folder.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    engine: Annotated[str, typer.Option(help="native (C++, CPU), torch, or auto: native where it can run.")] = "auto",
) -> None:
    """Beyond the paper: the MNIST network of Fig. 1 over a grid of learning rates x initial weight scales, with
    and without BN, every model trained together; divergence is a result. `bnrepro report` draws it."""
    from bnrepro.experiments import mnist as experiment
    from bnrepro.experiments.sweep import log_grid

    _refuse_setup_on_resume(ctx, resume, ("lr_min", "lr_max", "lrs", "init_min", "init_max", "inits", "seeds",
                                          "steps", "data_seed", "out", "set_"))
    for name, low, high, count in (("--lr", lr_min, lr_max, lrs), ("--init", init_min, init_max, inits)):
        if not (0 < low <= high and math.isfinite(high)) or count < 1:
            raise UserError(f"{name}-min and {name}-max must be positive and finite with min <= max, and the count "
                            f">= 1")
    if steps < 0:
        raise UserError(f"--steps must be 0 or more, not {steps}")
    grid = experiment.Grid(log_grid(lr_min, lr_max, lrs), log_grid(init_min, init_max, inits))
    overrides = _with_flag(list(set_ or []), "--steps", "train.steps", steps)
    try:
        if resume is not None:  # the grid, seeds and steps are the run's own, as its manifest recorded them
            run_dir = experiment.resume(resume, device, data_dir, show_progress=progress, engine=engine,
                                        command="sweep")
        else:
            run_dir = experiment.run(experiment.DEFAULT_VARIANTS, overrides, seeds, data_seed, device, out, data_dir,
                                     show_progress=progress, engine=engine, grid=grid)
    except Interrupted as stop:
        _stopped(stop, "sweep", data_dir, device, engine)
    summary = json.loads((run_dir / "summary.json").read_text())
    diverged = len(summary["divergences"])
    console.print(f"{len(summary['members'])} models, {diverged} diverged; `bnrepro report` draws the heatmaps",
                  markup=False)
    console.print(f"results: {run_dir}", markup=False)


def resume_command(stop: Interrupted, command: str, data_dir: Path | None, device: str, engine: str) -> str:
    """The command that continues an MNIST run or sweep stopped by Ctrl-C, verbatim for a shell (paths quoted), with
    the --data-dir, --device and --engine it ran with, so that a copy of it finds the same data (offline too) and
    trains on the same engine."""
    words = ["bnrepro", command, "--resume", str(stop.path.parent)]
    for flag, value, default in (("--data-dir", data_dir, None), ("--device", device, "auto"),
                                 ("--engine", engine, "auto")):
        words += [flag, str(value)] if value != default else []
    return shlex.join(words)


def _stopped(stop: Interrupted, command: str, data_dir: Path | None, device: str, engine: str) -> NoReturn:
    """Ctrl-C in an MNIST run or sweep: one line saying how to continue it, and the shell's exit code for SIGINT."""
    errors.print(f"interrupted at step {stop.step}; checkpoint saved. Continue with: "
                 f"{resume_command(stop, command, data_dir, device, engine)}", markup=False, highlight=False)
    sys.exit(130)


@app.command()
def imagenet(
    ctx: typer.Context,
    recipe: Annotated[str | None, typer.Option(help="Recipe to train, e.g. bn-x30 (`bnrepro recipes list`).")] = None,
    profile: Annotated[str, typer.Option(
        help="paper (ImageNet), proxy (small data, one GPU), cpu (CIFAR-10 on a laptop) or smoke.")] = "paper",
    dataset_dir: Annotated[Path | None, typer.Option(
        help="train/ and val/ class folders, packed shards, idx files or CIFAR-10's python batches (default at "
             "profile cpu: CIFAR-10, downloaded once into the user cache).")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the profile's budget).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights, data order and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (under torchrun: one GPU per process).")] = "auto",
    workers: Annotated[int | None, typer.Option(
        help="Data-loading worker processes per replica (default: 4, or the usable CPUs if fewer).")] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile the network.")] = False,
    deterministic: Annotated[bool, typer.Option(
        help="On a GPU, only kernels that repeat their results (slower): a resumed run equals an uninterrupted one "
             "bit for bit, as on a CPU.")] = False,
    gpu_decode: Annotated[bool, typer.Option(help="On a GPU, decode JPEGs there rather than in the workers.")] = True,
    resident: Annotated[bool, typer.Option(
        help="Hold a data set that fits in memory decoded there, augmented in batches on the device.")] = True,
    synthetic: Annotated[bool, typer.Option(
        help="Time the training step on random images of the profile's size (no data, no run folder).")] = False,
    out: Annotated[Path, typer.Option(help="Results folder; the run goes to OUT/imagenet/<recipe>-<time>.")] = Path(
        "results"),
    set_: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run folder.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """The ImageNet experiments (Figs. 2-3): train one recipe; many GPUs with `torchrun -m bnrepro imagenet`."""
    import torch

    from bnrepro.data.order import SEEDS
    from bnrepro.engine.distributed import Replicas
    from bnrepro.experiments import imagenet as experiment
    from bnrepro.runs import default_workers

    _refuse_setup_on_resume(ctx, resume, ("recipe", "profile", "steps", "seed", "set_", "deterministic", "resident",
                                          "out"))
    if steps is not None and steps < 1:  # a run of 0 steps keeps no checkpoint: no ensemble could use it
        raise UserError(f"--steps must be 1 or more, not {steps}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, not {workers}")
    if not 0 <= seed < SEEDS:  # the augmentation's per-example seeds are built from it (data.order.example_seed)
        raise UserError(f"--seed must be between 0 and {SEEDS - 1}, not {seed}")
    overrides = _with_flag(list(set_ or []), "--steps", f"profiles.{profile}.steps", steps)
    how = dict(device=device, workers=workers, compile=compile, gpu_decode=gpu_decode, show_progress=progress)
    replicas = Replicas.from_environment("nccl" if device != "cpu" and torch.cuda.is_available() else "gloo")
    try:
        if synthetic:
            if recipe is None or resume is not None:
                raise UserError("--synthetic times a recipe's training step: give --recipe NAME (and no --resume)")
            timing = experiment.synthetic(recipe, profile, list(set_ or []), experiment.Options(Path("."), seed=seed,
                                          **how), steps or 20, replicas)
            if replicas.is_main:
                console.print(synthetic_summary(timing), highlight=False, markup=False)
            return
        if resume is not None:
            run_dir = experiment.resume(resume, replicas, dataset_dir, **how)
        else:
            if recipe is None:
                raise UserError("give --recipe NAME (or --resume RUN_FOLDER)")
            dataset_dir = dataset_dir or experiment.profile_data(recipe, profile)  # cpu: CIFAR-10, downloaded once
            options = experiment.Options(dataset_dir, seed=seed, resident=resident, deterministic=deterministic, **how)
            run_dir = experiment.run(recipe, profile, overrides, options, out, replicas)
    finally:
        replicas.close()
    if replicas.is_main:
        summary = json.loads((run_dir / "summary.json").read_text())
        console.print(imagenet_summary(summary), highlight=False)
        console.print(f"results: {run_dir}", markup=False)


def rate(per_second: float) -> str:
    """A rate with its digits: thousands separated, three significant digits below 100 (a slow device is not 0/s)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def synthetic_summary(timing: dict) -> str:
    return (f"{timing['label']} ({timing['profile']}), synthetic data on {timing['device']} ({timing['precision']}, "
            f"{timing['replicas']} replica(s)): {rate(timing['images_per_second'])} images/s over {timing['steps']} "
            f"steps; the profile's {timing['budget_steps']:,} steps would train in about "
            f"{timing['budget_hours']:,.1f} h (evaluations not included)")


def imagenet_summary(summary: dict) -> str:
    best = "—" if summary["max_top1"] is None else \
        f"{100 * summary['max_top1']:.2f}% at step {summary['max_top1_step']:,}"
    diverged = f"; diverged at step {summary['diverged_at']:,}" if summary["diverged_at"] else ""
    return f"{summary['label']} ({summary['profile']}): {summary['steps']:,} steps, best top-1 {best}{diverged}"


@app.command()
def pack(
    source: Annotated[Path, typer.Argument(help="train/ (and val/) class folders, or MNIST-format idx files.")],
    dest: Annotated[Path, typer.Argument(help="Where the shards go.")],
    shard_size: Annotated[int, typer.Option(help="Examples per shard.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the one fixed packing order.")] = 0,
) -> None:
    """Pack a data set into WebDataset tar shards (`train.shuffle` works on class folders too, over virtual shards)."""
    from bnrepro.data.pack import pack as pack_shards

    for split, count in pack_shards(source, dest, shard_size, seed).items():
        console.print(f"{split}: {count:,} examples in {-(-count // shard_size)} shards under {dest}", markup=False)


@app.command()
def ensemble(
    recipe: Annotated[str, typer.Option(help="Ensemble recipe (members and crop schemes).")] = "ensemble/bn-inception",
    dataset_dir: Annotated[Path | None, typer.Option(help="Holds val/ class folders or val-*.tar shards.")] = None,
    member: Annotated[list[Path] | None, typer.Option(help="A member's run folder (instead of the recipe's).")] = None,
    results: Annotated[Path, typer.Option(help="Where the members' runs are (RESULTS/imagenet/).")] = Path("results"),
    out: Annotated[Path, typer.Option(help="The evaluation goes to OUT/ensemble/<recipe>-<time>.")] = Path("results"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int | None, typer.Option(
        help="Data-loading worker processes (default: 4, or the usable CPUs if fewer).")] = None,
    set_: Overrides = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Fig. 4: every member single-crop, 10-crop and 144-crop, and the ensemble (mean class probabilities)."""
    from bnrepro.evaluate import ensemble as evaluation
    from bnrepro.runs import default_workers

    if dataset_dir is None:
        raise UserError("give --dataset-dir DIR (the validation images: DIR/val/<class>/ or DIR/val-*.tar)")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, not {workers}")
    run_dir = evaluation.run(recipe, list(set_ or []), results, dataset_dir, out, device, workers, member or None,
                             show_progress=progress)
    rows = pd_table(run_dir / "results.csv")
    console.print(rows)
    console.print(f"results: {run_dir}", markup=False)


def pd_table(csv: Path) -> Table:
    """A results CSV as a rich table (errors as percentages)."""
    import pandas as pd

    frame = pd.read_csv(csv)
    table = Table()
    for column in frame.columns:
        table.add_column(column)
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{100 * v:.2f}%" if isinstance(v, float) else str(v) for v in row))
    return table


def _check_reproduce(val_limit: int | None, workers: int | None, jobs: int, device: str, study: str) -> None:
    """``reproduce``'s options, checked before anything runs (not at the ensemble after an hour of training)."""
    import torch

    if val_limit is not None and val_limit < 1:
        raise UserError(f"--val-limit must be 1 or more, not {val_limit}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be 0 or more, not {workers}")
    if jobs < 1:
        raise UserError(f"--jobs must be 1 or more, not {jobs}")
    if study not in STUDIES:
        raise UserError(f"--study must be one of {', '.join(STUDIES)}, not '{study}'")
    if jobs > 1 and device != "cpu" and torch.cuda.is_available():
        raise UserError("--jobs trains several runs at once on the CPU; on a GPU give --jobs 1 (or --device cpu)")


@app.command()
def reproduce(
    profile: Annotated[str, typer.Option(help="cpu (CIFAR-10 on a 2-core CPU, hours), proxy or paper (GPUs).")] = "cpu",
    dataset_dir: Annotated[Path | None, typer.Option(
        help="The profile's data (default at cpu: CIFAR-10, downloaded once into the user cache).")
                           ] = None,
    results: Annotated[Path, typer.Option(help="Where the runs, the ensemble and the report go.")] = Path("results"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Data-loading workers for data that is not held in memory.")
                       ] = None,
    val_limit: Annotated[int | None, typer.Option(
        help="Ensemble: evaluate the first this many validation images (default: the campaign's for the profile, in "
             f"bnrepro/paper.yaml: {PAPER.campaign.val_limit_text()}).")
                         ] = None,
    jobs: Annotated[int, typer.Option(
        help="Runs trained at once, each on CPUs / JOBS threads (2 on a 2-core CPU trains ~1.4x faster); 1 on a "
             "GPU.")] = 1,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and an estimate of its time, train nothing.")] = False,
    allow_dirty: Annotated[bool, typer.Option(
        help="Run from a checkout with uncommitted changes (recorded as <commit>+dirty); refused otherwise.")] = False,
    progress: Annotated[bool, typer.Option(help="Show each run's progress bar.")] = True,
    study: Annotated[str, typer.Option(
        help="paper: Figs. 2-4; changes: beyond the paper, Sec. 4.2.1's seven changes one at a time (BN-x5 with each "
             "undone, BN-Baseline with each made), its runs in RESULTS/changes/.")] = "paper",
) -> None:
    """Every run of Figs. 2-4 at one profile, in order (finished runs on the same data kept, an interrupted one
    resumed), then the ensemble at 1, 10 and 144 crops, then the report; or, --study changes, every run of the
    changes study, then the report. Ctrl-C is safe at any point: run the command again. The code's commit is read
    once, before anything runs, and recorded in results/campaign/ (results/changes/campaign/)."""
    from bnrepro.data import sources
    from bnrepro.experiments import changes
    from bnrepro.experiments import reproduce as campaign
    from bnrepro.report import build
    from bnrepro.runs import default_workers

    _check_reproduce(val_limit, workers, jobs, device, study)
    paper = study == "paper"
    limit = campaign.val_limit(profile, val_limit)  # None given: the campaign's for the profile (paper.yaml)
    if dataset_dir is None and not dry_run:  # cpu: CIFAR-10, downloaded once into the user cache
        dataset_dir = campaign.profile_data(profile)
    commit = None if dry_run else campaign.load_code(allow_dirty)
    data = None if dataset_dir is None else sources.data_identity(dataset_dir)
    steps = campaign.plan(profile, results, data, None if paper else changes.runs(profile, PAPER.campaign.seeds))
    console.print(f"{'campaign' if paper else 'changes study'} at profile {profile}: {len(steps)} runs, then "
                  f"{'the ensemble and ' if paper else ''}the report"
                  + ("" if data else " (no --dataset-dir: runs found are not checked against the data)"), markup=False)
    for line in campaign.describe(steps):
        console.print(line, markup=False, highlight=False)
    if dry_run:
        left = paper and campaign.ensemble_left(steps, profile, results, limit, data)
        guess = campaign.estimate(steps, profile, device, limit, jobs=jobs, with_ensemble=left)
        if not guess["images_per_second"]:  # nothing measured: every planned run is done, the ensemble kept
            console.print("estimate: no run left to train; only the report would be written", markup=False)
            return
        rates = ", ".join(f"{rate:,.0f}" for rate in guess["images_per_second"].values())
        ensemble = f"ensemble {guess['ensemble_s'] / 60:,.0f} min, " if left else ""
        console.print(f"estimate from a short measurement here (training images/s: {rates}): training and evaluation "
                      f"{guess['training_and_evaluation_s'] / 60:,.0f} min, {ensemble}in all about "
                      f"{guess['total_s'] / 60:,.0f} min", markup=False)
        return
    record = campaign.Record(results, profile, commit, data, dataset_dir, steps,
                             campaign.CAMPAIGN if paper else changes.RECORDS)
    how = dict(device=device, workers=default_workers() if workers is None else workers, show_progress=progress,
               git_commit=commit, allow_dirty=allow_dirty)
    try:
        folders, ensemble_dir = campaign.execute(record, steps, dataset_dir, how, limit, jobs=jobs, with_ensemble=paper,
                                                 say=lambda line: console.print(line, markup=False, highlight=False))
    except Interrupted as stop:
        errors.print(f"interrupted at step {stop.step} of {escape(str(stop.path.parent))}; checkpoint saved. Continue "
                     f"with the same command: bnrepro reproduce --profile {profile}"
                     f"{'' if paper else f' --study {study}'} ...", highlight=False)
        sys.exit(130)
    for line in campaign.summary(folders):
        console.print(line, markup=False, highlight=False)
    if ensemble_dir is not None:
        console.print(f"ensemble: {ensemble_dir}", markup=False)
    console.print(f"{'campaign' if paper else 'study'} record: {record.folder / 'manifest.json'}", markup=False)
    for path in build(results, results / "report"):
        console.print(f"wrote {path}", markup=False)


@app.command()
def report(
    results: Annotated[Path, typer.Option(help="Folder holding the runs.")] = Path("results"),
    out: Annotated[Path | None, typer.Option(help="Where figures and tables go (default RESULTS/report).")] = None,
) -> None:
    """Regenerate every figure and table from the runs under RESULTS, with the paper's numbers beside them."""
    from bnrepro.report import build

    written = build(results, out or results / "report")
    for path in written:
        console.print(f"wrote {path}", markup=False)


@recipes_app.command("list")
def recipes_list() -> None:
    """Every recipe, with its description."""
    for name in recipes.available():
        console.print(f"[bold]{name}[/bold]  {recipes.load(name).description}")


@recipes_app.command("show")
def recipes_show(name: str, set_: Overrides = None) -> None:
    """The fully resolved recipe (after extends: and --set)."""
    recipe = recipes.load(name, set_ or [])
    console.print(f"# {name}  (digest {recipe.digest}, training digest {recipe.training_digest()})", highlight=False)
    console.print(recipes.to_yaml(recipe), highlight=False, markup=False)
    if isinstance(recipe, recipes.ImagenetRecipe):
        for line in _profile_epochs(recipe):
            console.print(line, highlight=False, markup=False)


def _profile_epochs(recipe: recipes.ImagenetRecipe) -> list[str]:
    """Budgets are in steps; these YAML comments say what they mean in epochs of each profile's data."""
    decay = recipe.train.lr_decay
    lines = ["# profiles in epochs (steps x batch / training examples):"]
    paper = recipe.profiles["paper"]
    for name, p in recipe.profiles.items():
        lr = recipes.learning_rate(recipe, p, p.train_examples)
        decay_steps = decay.period * (paper.train_examples / paper.batch_size * p.compression if p.compression
                                      else p.train_examples / p.batch_size)
        lines.append(f"#   {name}: budget {p.steps:,} steps = {p.epochs(p.steps):,.1f} epochs; evaluate every "
                     f"{p.eval_every:,} steps = {p.epochs(p.eval_every):,.2f} epochs; lr {lr(0):.3g} "
                     f"(x{lr(0) / recipe.train.lr:g} the paper's), x{decay.rate} every {decay_steps:,.0f} steps; "
                     f"at the end {100 * lr(max(p.steps - 1, 0)) / lr(0):.1f}% of its start")
    return lines


@recipes_app.command("diff")
def recipes_diff(a: str, b: str, set_: Overrides = None,
                 set_a: Annotated[list[str], typer.Option("--set-a", help="Override a value of A alone.")] = None,
                 set_b: Annotated[list[str], typer.Option("--set-b", help="Override a value of B alone.")] = None,
                 ) -> None:
    """What recipe B changes against recipe A, key by key (both fully resolved; --set to both, --set-a and --set-b to
    one: a variant against its recipe, as the changes study runs them)."""
    left, right = recipes.load(a, [*(set_ or []), *(set_a or [])]), recipes.load(b, [*(set_ or []), *(set_b or [])])
    table = Table(title=f"{a} -> {b}")
    for column in ("key", a, b):
        table.add_column(column, overflow="fold")
    for key, x, y in recipes.diff(left, right):
        table.add_row(key, "—" if x is None else str(x), "—" if y is None else str(y))
    console.print(table)


def main() -> None:
    """Entry point: user errors and interruptions become one line and an exit code, never a traceback."""
    try:
        code = app(standalone_mode=False)  # click answers Ctrl-C outside the training loop with 130
        if code == 130:
            raise KeyboardInterrupt
    except UserError as err:
        errors.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        sys.exit(2)
    except Interrupted as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for all replicas
            command = stop.path.parent.parent.name  # runs live in OUT/<experiment>/<run>
            errors.print(f"interrupted at step {stop.step}; checkpoint saved. Continue with: "
                         f"{shlex.join(['bnrepro', command, '--resume', str(stop.path.parent)])}", markup=False,
                         highlight=False)
        sys.exit(130)
    except KeyboardInterrupt:
        errors.print("interrupted; no checkpoint was written now (a run folder holding an earlier "
                     "checkpoint.pt can still be continued with --resume)", highlight=False)
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        sys.exit(130)
    except UsageError as err:  # an unknown option, a bad or missing value, an unexpected argument
        ctx = getattr(err, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        # no command at all: the help was printed (typer's rich help prints it itself and leaves the message empty)
        message = _one_line(err.format_message()) or "give a command; they are listed above"
        errors.print(f"[red]error:[/red] {escape(message + see)}", highlight=False)
        sys.exit(2)
    except OSError as err:
        if err.errno not in MACHINE_LIMITS:
            raise  # anything else is a bug, and its traceback says where
        what = (err.strerror or os.strerror(err.errno)) + (f": {err.filename}" if err.filename else "")
        errors.print(f"[red]error:[/red] {escape(what)} (free some space or choose a folder you may write to, then "
                     f"run the command again)", highlight=False)
        sys.exit(2)
    except ClickException as err:
        errors.print(f"[red]error:[/red] {escape(_one_line(err.format_message()))}", highlight=False)
        sys.exit(err.exit_code)


# OSErrors that are the machine's limits and permissions, not a bug: a full disk or quota, a file over the size
# limit, a read-only file system, a folder the user may not write to.
MACHINE_LIMITS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def run() -> None:
    """The ``bnrepro`` command and ``python -m bnrepro``: ``main()``, then Python's shutdown without its last step.

    That step frees, object by object, the ~1,700 modules torch loads: ~1.3 s here, a twentieth of a 1-seed
    MNIST run and a third of ``bnrepro recipes list``, for memory the OS takes back anyway. Everything before it
    still happens: threads are joined, exit handlers run (multiprocessing reaps its workers), Python's and C's
    output buffers are flushed; results were written atomically and closed long before. A bug's traceback ends
    the ordinary way.
    """
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)  # as Python prints it
    try:
        threading._shutdown()  # what the interpreter does first at exit: wait for non-daemon threads
        atexit._run_exitfuncs()
    except KeyboardInterrupt:  # Ctrl-C while waiting: stop waiting
        code = 130
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, OSError, ValueError):  # closed, or its reader has gone
                stream.flush()
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None).fflush(None)  # what C libraries printed (os._exit skips the C library's exit)
        os._exit(code)
