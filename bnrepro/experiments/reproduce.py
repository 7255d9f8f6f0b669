"""The whole of Sec. 4.2 at one profile: every run of Figs. 2-4 in order, then the ensemble, then the report.

A campaign is a plan of ImageNet runs (recipe, seed, overrides) and the ensemble of Fig. 4. Each planned run is
matched against the run folders under ``results/imagenet`` by recipe digest (the resolved recipe, overrides
included), profile and seed: a finished one is kept, an interrupted one is resumed from its checkpoint, a
missing one is started. Interrupting the campaign (Ctrl-C) is always safe: the run in progress saves its
checkpoint, and the same command continues from there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bnrepro import recipes as recipe_io
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.errors import UserError
from bnrepro.experiments import imagenet
from bnrepro.runs import runs_of

ENSEMBLE = "ensemble/bn-inception"


@dataclass(frozen=True)
class Planned:
    """One run of the campaign, and why it is there."""

    recipe: str
    seed: int = 0
    overrides: tuple[str, ...] = ()
    why: str = ""

    @property
    def name(self) -> str:
        extra = f", {', '.join(self.overrides)}" if self.overrides else ""
        return f"{Path(self.recipe).stem} (seed {self.seed}{extra})"


# Figs. 2-3 (Sec. 4.2.2), then what the claims need beside them, then Fig. 4's members (Sec. 4.2.3).
FIGURES_2_3 = (
    Planned("imagenet/inception", why="Fig. 2/3: the baseline; its maximum is the target"),
    Planned("imagenet/bn-baseline", why="Fig. 2/3"),
    Planned("imagenet/bn-x5", why="Fig. 2/3"),
    Planned("imagenet/bn-x30", why="Fig. 2/3"),
    Planned("imagenet/bn-x5-sigmoid", why="Fig. 3"),
    Planned("imagenet/inception-sigmoid", why="Sec. 4.2.2: never above chance"),
    Planned("imagenet/inception-x5", why="Sec. 4.2.2: machine infinity"),
    Planned("imagenet/bn-x5", overrides=("train.shuffle=shards",), why="change 6 alone: BN-x5 without it"),
    Planned("imagenet/inception", seed=1, why="seed spread"),
    Planned("imagenet/bn-x5", seed=1, why="seed spread"),
)


def campaign() -> list[Planned]:
    """Every ImageNet run of the campaign, in order: Figs. 2-3, then the ensemble recipe's members."""
    ensemble = recipe_io.load(ENSEMBLE)
    return [*FIGURES_2_3, *(Planned(member, why="Fig. 4: ensemble member") for member in ensemble.members)]


@dataclass
class Step:
    run: Planned
    state: Literal["done", "resume", "new"]
    folder: Path | None
    steps: int  # the run's budget at the profile


def plan(profile: str, results: Path) -> list[Step]:
    """The campaign at ``profile`` against what ``results`` already holds."""
    found = runs_of(results, "imagenet", ("complete", "diverged", "interrupted", "running"))
    steps = []
    for run in campaign():
        recipe = recipe_io.load(run.recipe, list(run.overrides))
        if profile not in recipe.profiles:
            raise UserError(f"recipe '{run.recipe}' has no profile '{profile}'")
        mine = [(folder, m) for folder, m in found if m.get("recipe_digest") == recipe.digest
                and m.get("profile") == profile and m.get("seed") == run.seed
                and list(m.get("overrides", [])) == list(run.overrides)]
        done = [folder for folder, m in mine if m.get("status") in ("complete", "diverged")]
        paused = [folder for folder, m in mine if (folder / imagenet.CHECKPOINT).is_file()
                  and m.get("status") not in ("complete", "diverged")]
        state, folder = ("done", done[-1]) if done else ("resume", paused[-1]) if paused else ("new", None)
        steps.append(Step(run, state, folder, recipe.profiles[profile].steps))
    return steps


def train(steps: list[Step], profile: str, dataset_dir: Path, results: Path, options: dict,
          say=print) -> list[Path]:
    """Run the plan in order; returns every run folder. One line per run: where the campaign stands, its ETA
    at the speed of the steps trained so far in this invocation."""
    todo = sum(s.steps for s in steps if s.state != "done")
    trained, started, folders = 0, time.perf_counter(), []
    for i, step in enumerate(steps, 1):
        elapsed = time.perf_counter() - started
        eta = f"{(todo - trained) * elapsed / trained / 60:,.0f} min" if trained else "after the first run"
        what = {"done": "finished earlier, kept", "resume": "resuming", "new": "starting"}[step.state]
        say(f"campaign run {i}/{len(steps)}: {step.run.name} ({step.run.why}), {step.steps:,} steps: {what}; "
            f"{elapsed / 60:,.1f} min so far, ETA {eta}")
        if step.state == "done":
            folders.append(step.folder)
            continue
        if step.state == "resume":
            folder = imagenet.resume(step.folder, SINGLE_PROCESS, dataset_dir, **options)
        else:
            run_options = imagenet.Options(Path(dataset_dir), seed=step.run.seed, **options)
            folder = imagenet.run(step.run.recipe, profile, list(step.run.overrides), run_options, results,
                                  SINGLE_PROCESS)
        trained += step.steps
        folders.append(folder)
    return folders


def ensemble(folders: list[Path], profile: str, dataset_dir: Path, results: Path, device: str, workers: int,
             val_limit: int | None, show_progress: bool) -> Path:
    """Fig. 4 over the members' runs (the campaign's last six), unless a finished evaluation of exactly these
    runs with this recipe exists."""
    from bnrepro.evaluate import ensemble as evaluation

    overrides = [f"profile={profile}"] + ([f"val_limit={val_limit}"] if val_limit else [])
    recipe = recipe_io.load(ENSEMBLE, overrides)
    members = folders[-len(recipe.members):]
    wanted = sorted(str(Path(m)) for m in members)
    for folder, manifest in reversed(runs_of(results, "ensemble")):
        if manifest.get("recipe_digest") == recipe.digest and sorted(m["run"] for m in manifest["members"]) == wanted:
            return folder
    return evaluation.run(ENSEMBLE, overrides, results, dataset_dir, results, device, workers, members,
                          show_progress=show_progress)


def estimate(steps: list[Step], profile: str, device: str, val_limit: int | None, updates: int = 8) -> dict:
    """Seconds the plan's remaining work should take, from a short measurement here: the training step of one
    BN and one non-BN recipe on synthetic images (the two cost classes), and inference for the evaluations."""
    import torch

    from bnrepro.models.inception import count_flops

    rates: dict[tuple, float] = {}
    seconds = 0.0
    for step in steps:
        if step.state == "done":
            continue
        recipe = recipe_io.load(step.run.recipe, list(step.run.overrides))
        key = (recipe.model.batch_norm, recipe.model.lrn, recipe.model.nonlinearity, recipe.train.distortions)
        if key not in rates:  # the costs that differ between recipes
            options = imagenet.Options(Path("."), device=device, show_progress=False)
            task, optimizer, _ = imagenet._build(recipe, profile, options, SINGLE_PROCESS, synthetic=True)
            rates[key] = imagenet.time_training(task, optimizer, updates, 2)
            macs = count_flops(task.model, recipe.profiles[profile].resolution)
        p = recipe.profiles[profile]
        evaluations = p.steps // p.eval_every + 2
        seconds += p.steps * p.batch_size / rates[key]
        seconds += evaluations * 10_000 / (3 * rates[key])  # inference ~3x a training image (forward only)
    ensemble = recipe_io.load(ENSEMBLE)
    crops = sum(ensemble.crops) * len(ensemble.members) * (val_limit or 10_000)
    inference = 3 * max(rates.values()) if rates else None
    ensemble_seconds = crops / inference if inference else 0.0
    return {"training_and_evaluation_s": seconds, "ensemble_s": ensemble_seconds,
            "total_s": seconds + ensemble_seconds, "images_per_second": rates, "threads": torch.get_num_threads(),
            "multiply_adds": macs if rates else None}


def describe(steps: list[Step]) -> list[str]:
    """The plan, one line a run."""
    return [f"{i:2d}. {s.run.name:<45} {s.steps:>7,} steps  {s.state:<6} {'' if s.folder is None else s.folder}"
            for i, s in enumerate(steps, 1)]


def summary(folders: list[Path]) -> list[str]:
    lines = []
    for folder in folders:
        data = json.loads((Path(folder) / "summary.json").read_text())
        best = "—" if data["max_top1"] is None else f"{100 * data['max_top1']:.2f}%"
        lines.append(f"{data['label']:<22} best top-1 {best}" + (f", diverged at step {data['diverged_at']:,}"
                                                               if data["diverged_at"] else ""))
    return lines
