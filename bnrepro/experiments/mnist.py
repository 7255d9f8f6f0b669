"""The MNIST diagnostic of Sec. 4.1 (Fig. 1): every seed of every variant trained as one stack.

All members see the same sequence of mini-batches (drawn from ``data_seed``), so "with BN" and
"without BN" are compared on identical data, and seeds differ in their initial weights.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from torch import Tensor

from bnrepro import recipes as recipe_io
from bnrepro.data import mnist
from bnrepro.engine import checkpoint
from bnrepro.engine.threads import torch_threads
from bnrepro.engine.trainer import Schedule, train
from bnrepro.errors import UserError
from bnrepro.models.binary import BinaryBatch
from bnrepro.models.mlp import MLPStack
from bnrepro.models.mlp_native import BinaryRows, NativeStack, unsupported
from bnrepro.recipes import MnistRecipe, Statistics
from bnrepro.runs import (
    COMPLETE,
    RunLock,
    announce,
    atomic_write,
    manifest_start,
    new_run_dir,
    now,
    resolve_device,
    to_device,
    training,
    write_json,
)

DEFAULT_VARIANTS = ["mnist/baseline", "mnist/bn"]
ENGINES = ("auto", "native", "torch")  # auto: native where it can run (a CPU with a C++ compiler), else torch
MNIST_TEST_IMAGES = 10_000  # what an evaluation runs every model on


@dataclass(frozen=True)
class Member:
    variant: str  # the recipe's short name, e.g. "bn"
    seed: int
    lr: float | None = None  # a sweep's own learning rate and initial weight std (None: the recipe's)
    init_std: float | None = None


@dataclass(frozen=True)
class Grid:
    """``bnrepro sweep``: every (learning rate, initial weight std) pair, for every variant and seed."""

    lrs: tuple[float, ...]
    init_stds: tuple[float, ...]


class MnistTask:
    """What the shared trainer needs: each step's losses, and the Fig. 1 measurements at each evaluation."""

    def __init__(self, recipe: MnistRecipe, stack: MLPStack, members: list[Member], data: mnist.MnistArrays,
                 data_seed: int, device: torch.device):
        threshold = recipe.data.binarize_threshold
        self.model, self.members, self.recipe = stack, members, recipe
        self.train_bits = mnist.binarize(data.train_images, threshold).to(device)
        self.train_labels = data.train_labels.to(device)
        self.test = BinaryBatch(mnist.binarize(data.test_images, threshold).to(device))
        self.test_labels = data.test_labels.to(device)
        self.batches = mnist.EpochBatches(len(self.train_labels), recipe.train.batch_size, data_seed)
        self.quantiles = torch.tensor([p / 100 for p in recipe.eval.percentiles], device=device)
        self.rows: list[dict[str, Any]] = []

    def losses(self, step: int) -> Tensor:
        index = to_device(self.batches.indices(step), self.train_bits.device)
        return self.model.losses(BinaryBatch(self.train_bits.index_select(0, index)),
                                 self.train_labels.index_select(0, index))

    def train_steps(self, start: int, stop: int, learning_rate: Callable[[int], float]) -> Tensor | None:
        """None: the torch engine trains one update at a time, through ``losses`` and the trainer's optimizer."""
        return None

    def running(self) -> AbstractContextManager:
        """Held while the trainer runs this task."""
        return nullcontext()

    def predict(self) -> tuple[Tensor, Tensor]:
        """Test logits (examples, members, classes) with population statistics (Alg. 2), and the input of
        the probed sigmoid of the last hidden layer (examples, members)."""
        logits, pre = self.model.predict(self.test)
        return logits, pre[:, :, self.recipe.eval.probe_unit]

    def estimate_population(self, step: int) -> None:
        """Alg. 2: BN's population statistics over the ``eval.population_batches`` training mini-batches that
        follow ``step`` in the run's order (a pure function of the step, so a resumed run gets the same)."""
        batches = [BinaryBatch(self.train_bits.index_select(0, self.batches.indices(s).to(self.train_bits.device)))
                   for s in range(step, step + self.recipe.eval.population_batches)]
        self.model.estimate_population(batches)

    def evaluate(self, step: int, train_loss: Tensor, statistics: Statistics) -> dict[str, float]:
        if statistics == "population" and self.model.normalized:
            self.estimate_population(step)
        self.model.statistics = statistics
        logits, probe = self.predict()  # probe: one fixed sigmoid of the last hidden layer (Fig. 1b, c)
        accuracy = (logits.argmax(2) == self.test_labels[:, None]).float().mean(0)
        percentiles = torch.quantile(probe, self.quantiles, dim=0)  # (percentiles, members)
        finite = torch.isfinite(logits).all(2).all(0) & torch.isfinite(probe).all(0)
        accuracy, percentiles = accuracy.where(finite, math.nan).cpu(), percentiles.where(finite, math.nan).cpu()
        for i, member in enumerate(self.members):
            row = {"variant": member.variant, "seed": member.seed, "step": step, "statistics": statistics,
                   **({} if member.lr is None else {"lr": member.lr, "init_std": member.init_std}),
                   "test_accuracy": float(accuracy[i]), "train_loss": float(train_loss[i])}
            row.update({f"p{p:g}": float(percentiles[j, i]) for j, p in enumerate(self.recipe.eval.percentiles)})
            self.rows.append(row)
        return {"loss": float(train_loss.nanmean()), "accuracy": float(accuracy.nanmean())}

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = list(state["rows"])


class NativeMnistTask(MnistTask):
    """The same task on the native engine (bnrepro/models/mlp_native.py): each chunk of steps between the
    trainer's checks, and each evaluation, is one C++ call rather than ~60 tensor operations a step."""

    def __init__(self, *args):
        super().__init__(*args)
        self.engine = NativeStack(self.model)  # its threads: torch's count now, before ``running`` lowers torch's
        self.train_rows, self.test_rows = BinaryRows.of(self.train_bits), BinaryRows.of(self.test.bits)
        self.train_labels = self.train_labels.to(torch.int64).contiguous()

    def running(self) -> AbstractContextManager:
        return torch_threads(1)  # the kernel's threads get the cores

    def estimate_population(self, step: int) -> None:
        """Alg. 2 on the kernel, over the same mini-batches as the torch engine's pass (``MnistTask``)."""
        steps = range(step, step + self.recipe.eval.population_batches)
        self.engine.estimate_population(torch.stack([self.batches.indices(s) for s in steps]), self.train_rows)

    def train_steps(self, start: int, stop: int, learning_rate: Callable[[int], float]) -> Tensor:
        """Steps [start, stop) in one kernel call: their losses (stop - start, members)."""
        steps = range(start, stop)
        examples = torch.stack([self.batches.indices(step) for step in steps])
        return self.engine.train_steps(examples, self.train_rows, self.train_labels, [learning_rate(s) for s in steps])

    def predict(self) -> tuple[Tensor, Tensor]:
        return self.engine.predict(self.test_rows, self.recipe.eval.probe_unit)


def sweep_memory_check(grid: Grid, seeds: int, variants: int, recipe: MnistRecipe) -> None:
    """Refuse a grid whose models cannot fit in this machine's memory, before anything is allocated (a 3000 x 3000
    grid once failed in an allocation after 44 s). Per model: its parameters, gradients, momentum and a copy
    (4 x 4 bytes each), and its activations over the 10,000 test images at an evaluation (4 bytes per unit)."""
    widths = [28 * 28, *recipe.model.hidden, 10]
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    models = len(grid.lrs) * len(grid.init_stds) * seeds * variants
    need = models * (16 * params + 4 * MNIST_TEST_IMAGES * sum(widths[1:]))
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UserError(f"the grid has {models:,} models, which need about {need / 2**30:,.0f} GiB, more than this "
                        f"machine's {have / 2**30:,.0f} GiB; use fewer --lrs, --inits or --seeds")


def variant_name(recipe_name: str) -> str:
    return Path(recipe_name).stem


def _check_trainable_together(variants: dict[str, MnistRecipe]) -> MnistRecipe:
    """Variants share one stack and one optimizer, so they may differ only in ``model.batch_norm``."""
    def comparable(recipe: MnistRecipe) -> dict[str, Any]:
        tree = recipe.model_dump(exclude={"label", "description", "paper", "assumptions"})
        tree["model"].pop("batch_norm")
        return tree

    (first_name, first), *rest = variants.items()
    for name, recipe in rest:
        a, b = recipe_io.flatten(comparable(first)), recipe_io.flatten(comparable(recipe))
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if differ:
            raise UserError(f"variants '{first_name}' and '{name}' are trained together and may differ only "
                            f"in model.batch_norm, but also differ in {', '.join(differ)}; run them separately")
    return first


@dataclass
class Setup:
    task: MnistTask
    optimizer: torch.optim.Optimizer
    members: list[Member]
    engine: str  # which engine trains the run, and why not the native one where it does not


def build(variants: dict[str, MnistRecipe], seeds: list[int], data: mnist.MnistArrays, data_seed: int,
           device: torch.device, engine: str, grid: Grid | None = None) -> Setup:
    shared = _check_trainable_together(variants)
    ordered = sorted(variants.items(), key=lambda item: not item[1].model.batch_norm)  # BN members first
    points = [(lr, std) for lr in grid.lrs for std in grid.init_stds] if grid else [(None, None)]
    members = [Member(name, seed, lr, std) for name, _ in ordered for lr, std in points for seed in seeds]
    m, t = shared.model, shared.train
    stack = MLPStack(
        [member.seed for member in members], [28 * 28, *m.hidden, 10],
        batch_norm=[variants[member.variant].model.batch_norm for member in members],
        nonlinearity=m.nonlinearity, init=m.init, bn_eps=m.bn_eps, bn_momentum=m.bn_momentum,
        init_std=[m.init_std if member.init_std is None else member.init_std for member in members],
        lr_scale=[1.0 if member.lr is None else member.lr / t.lr for member in members],  # x the recipe's rate
    ).to(device)
    optimizer = torch.optim.SGD([stack.flat], lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, not '{engine}'")
    why_not = "--engine torch" if engine == "torch" else unsupported(stack, device, optimizer)
    if engine == "native" and why_not:
        raise UserError(f"the native engine cannot train this run: {why_not}; use --engine torch or auto")
    task_class, used = (MnistTask, f"torch (native: {why_not})") if why_not else (NativeMnistTask, "native")
    return Setup(task_class(shared, stack, members, data, data_seed, device), optimizer, members, used)


def run(
    recipe_names: list[str],
    overrides: list[str],
    seeds: int,
    data_seed: int,
    device_name_: str,
    out: Path,
    data_dir: Path | None,
    show_progress: bool = True,
    engine: str = "auto",
    grid: Grid | None = None,
) -> Path:
    """Train every variant for ``seeds`` seeds in a new run folder under ``out/mnist`` (a ``grid``: every point of
    it too, under ``out/sweep``); returns the folder."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {seeds}")
    for name in recipe_names:  # before the overrides, which would fail on another experiment's keys first
        if (kind := recipe_io.load(name).experiment) != "mnist":
            raise UserError(f"recipe '{name}' is an {kind} recipe, not an MNIST one; `bnrepro recipes list` shows "
                            f"the MNIST ones (mnist/...)")
    variants = {variant_name(name): recipe_io.load(name, overrides) for name in recipe_names}
    if grid is not None:
        sweep_memory_check(grid, seeds, len(variants), next(iter(variants.values())))
    device = resolve_device(device_name_)
    data = mnist.load(data_dir)
    setup = build(variants, list(range(seeds)), data, data_seed, device, engine, grid)
    run_dir = new_run_dir(Path(out) / ("sweep" if grid else "mnist"))  # only now: every check that can fail passed
    resolved = {name: recipe.model_dump(mode="json") for name, recipe in variants.items()}
    atomic_write(run_dir / "recipes.yaml", yaml.safe_dump(resolved, sort_keys=False, width=100))
    manifest = manifest_start("sweep" if grid else "mnist", device, {
        **({"grid": {"lrs": list(grid.lrs), "init_stds": list(grid.init_stds)}} if grid else {}),
        "recipes": {name: {"source": src, "digest": variants[name].digest}
                    for name, src in zip(variants, recipe_names)},
        "overrides": list(overrides), "seeds": list(range(seeds)), "data_seed": data_seed,
        "deviations": [f"recipe changed for this run: --set {text}" for text in overrides],
        "data": data_record(data),
        "engine": setup.engine,
    })
    write_json(run_dir / "manifest.json", manifest)
    return _train(run_dir, variants, manifest, setup, resume=False, show_progress=show_progress)


def data_record(data: mnist.MnistArrays) -> dict[str, Any]:
    """What the manifest says of the data: where it was (a folder, or "embedded"), which choice found it, whether
    its files are the official ones, and its identity (the parsed arrays' SHA-256) that a resume must match."""
    source = data.source if data.source == "embedded" else str(Path(data.source).absolute())
    return {"source": source, "copy": data.copy, "matches_official_md5": data.official,
            "arrays_sha256": data.arrays_sha256}


def resume(run_dir: Path, device_name_: str, data_dir: Path | None, show_progress: bool = True,
           engine: str = "auto", command: str = "mnist") -> Path:
    """Continue an interrupted run exactly where its checkpoint left it, on the same data (its recorded copy unless
    ``data_dir`` says where it is now). A run killed before its first checkpoint trains again from step 0 in its
    folder: everything is a function of its recipes, seeds and data, so that too gives the uninterrupted run.
    ``command``: the one resuming, ``mnist`` or ``sweep``, which must be the one that started the run (each prints
    its own summary at the end)."""
    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        resolved = yaml.safe_load((run_dir / "recipes.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        raise UserError(f"{run_dir} is not an MNIST run folder (no readable manifest.json/recipes.yaml)") from None
    started_by = manifest.get("experiment", "mnist")
    if started_by != command:
        raise UserError(f"{run_dir} is a `bnrepro {started_by}` run; continue it with: "
                        f"bnrepro {started_by} --resume {shlex.quote(str(run_dir))}")
    owner = RunLock.claim(run_dir)  # first, before the data is read: of two resumes started together, one trains
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())  # as the claim found it (a rival may have
        if manifest.get("status") == COMPLETE:                          # finished the run meanwhile)
            raise UserError(f"run {run_dir} is already complete; start a new one instead")
        variants = {name: MnistRecipe.model_validate(tree) for name, tree in resolved.items()}
        device = resolve_device(device_name_)
        data = mnist.load_for_resume(manifest.get("data", {}).get("source"), data_dir)
        check_same_data(run_dir, manifest.get("data", {}), data)
        grid = Grid(tuple(manifest["grid"]["lrs"]), tuple(manifest["grid"]["init_stds"])) if "grid" in manifest \
            else None
        setup = build(variants, manifest["seeds"], data, manifest["data_seed"], device, engine, grid)
        manifest["resumed"] = [*manifest.get("resumed", []), now()]
        manifest["resumed_engines"] = [*manifest.get("resumed_engines", []), setup.engine]
        manifest["resumed_data"] = [*manifest.get("resumed_data", []), data_record(data)["source"]]
        from_checkpoint = (run_dir / checkpoint.NAME).is_file()
        if not from_checkpoint:
            manifest["restarted"] = [*manifest.get("restarted", []), "no checkpoint yet: trained again from step 0"]
        return _train(run_dir, variants, manifest, setup, resume=from_checkpoint, show_progress=show_progress,
                      owner=owner)
    finally:
        owner.release()


def check_same_data(run_dir: Path, recorded: dict[str, Any], data: mnist.MnistArrays) -> None:
    """Refuse to resume a run on other data than it started with (Fashion-MNIST laid out as MNIST, a changed
    file): the run's numbers would mix two data sets under one manifest. Compared by the parsed arrays' SHA-256;
    a run from before that was recorded, by whether the files were the official MNIST ones."""
    want, where = recorded.get("arrays_sha256"), recorded.get("source")
    hint = ("resume without --data-dir: the package's embedded MNIST is the run's data" if where == "embedded" else
            "resume with --data-dir DIR where DIR/mnist/raw holds the run's files, or without it while they are "
            "where the run found them")
    if want is not None and want != data.arrays_sha256:
        raise UserError(f"run {run_dir} trained on other data than {data.source} holds (arrays SHA-256 {want[:12]} "
                        f"from {where}, found {data.arrays_sha256[:12]}); {hint}")
    if want is None and "matches_official_md5" in recorded and recorded["matches_official_md5"] != data.official:
        said = "the official MNIST files" if recorded["matches_official_md5"] else "files other than the official ones"
        found = "the official ones" if data.official else "other files"
        raise UserError(f"run {run_dir} trained on {said}, but {data.source} holds {found}; {hint}")


def _train(run_dir: Path, variants: dict[str, MnistRecipe], manifest: dict[str, Any],
           setup: Setup, resume: bool, show_progress: bool, owner: RunLock | None = None) -> Path:
    task, optimizer, members = setup.task, setup.optimizer, setup.members
    recipe = task.recipe
    # A checkpoint at every evaluation (500 steps), so a killed run loses at most one interval: measured on 2 cores,
    # 11 ms for 2 models (0.8 MB, fsync'd), 51 ms for 20 (8 MB; ~1.5% of the ~3.5 s an interval takes) and 0.4 s
    # for the sweep's 192 (79 MB; ~1% of its ~35 s interval). Where checkpoints fall never changes the numbers.
    schedule = Schedule(recipe.train.steps, recipe.eval.every, checkpoint_every=recipe.eval.every)
    announce("MNIST", manifest.get("deviations", []))
    with training(run_dir, manifest, owner=owner), task.running():
        log = train(task, optimizer, schedule, run_dir / checkpoint.NAME, members=len(members), resume=resume,
                    show_progress=show_progress, statistics=recipe.eval.statistics,
                    describe=lambda s: f"loss {s.get('loss', math.nan):.3f}  acc {s.get('accuracy', math.nan):.4f}")
    metrics = pd.DataFrame(task.rows)
    divergences = [{"variant": m.variant, "seed": m.seed, "step": step}
                   for m, step in zip(members, log.diverged_at) if step is not None]
    if "grid" in manifest:  # bnrepro sweep: per member, and Sec. 3.3 checked on one trained BN network
        from bnrepro.experiments import sweep

        summary = sweep.summarize(metrics, members, log.diverged_at, task)
    else:
        summary = summarize(metrics, variants, divergences)
    summary["deviations"] = manifest.get("deviations", [])
    announce("MNIST, finished", summary["deviations"])
    atomic_write(run_dir / "metrics.csv", metrics.to_csv(index=False))
    write_json(run_dir / "summary.json", summary)
    manifest.update(status=COMPLETE, finished=now())
    write_json(run_dir / "manifest.json", manifest)
    (run_dir / checkpoint.NAME).unlink(missing_ok=True)
    return run_dir


def summarize(metrics: pd.DataFrame, variants: dict[str, MnistRecipe], divergences: list[dict]) -> dict[str, Any]:
    """Per variant: final test accuracy (mean, std over seeds) and the first step at which its mean curve
    reaches the no-BN baseline's final mean accuracy (how much sooner BN gets there, Fig. 1a)."""
    curves = metrics.groupby(["variant", "step"])["test_accuracy"].mean()
    last = metrics["step"].max()
    final = metrics[metrics["step"] == last].groupby("variant")["test_accuracy"]
    baseline = next((name for name, r in variants.items() if not r.model.batch_norm), None)
    target = float(curves[baseline][last]) if baseline else None
    summary: dict[str, Any] = {"steps": int(last), "baseline": baseline, "variants": {}, "divergences": divergences}
    for name, recipe in variants.items():
        curve, finals = curves[name], final.get_group(name)
        reached = curve[curve >= target] if target is not None else curve.iloc[:0]
        summary["variants"][name] = {
            "label": recipe.label,
            "seeds": int(len(finals)),
            "seeds_finite": int(finals.count()),  # seeds that did not diverge
            "final_test_accuracy_mean": _number(finals.mean()),
            "final_test_accuracy_std": _number(finals.std(ddof=1)) if finals.count() > 1 else 0.0,
            "steps_to_baseline_final_accuracy": int(reached.index[0]) if len(reached) else None,
        }
    return summary


def _number(value: float) -> float | None:
    """JSON has no NaN: a quantity that does not exist (every seed diverged) is null."""
    return None if math.isnan(value) else float(value)
