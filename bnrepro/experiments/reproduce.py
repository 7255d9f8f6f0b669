"""The whole of Sec. 4.2 at one profile: every run of Figs. 2-4 in order, then the ensemble, then the report.

A campaign is a plan of ImageNet runs (recipe, seed, overrides) and the ensemble of Fig. 4. Each planned run is
matched against the run folders under ``results/imagenet`` by the recipe's training digest at the profile (the
resolved recipe, overrides included, without its prose and other profiles: ``RecipeBase.training_digest``, each
folder's from its own recipe.yaml: ``recipes.trained``), profile, seed and data (``same_data``: the data set's
identity, ``sources.data_identity``): a finished one is kept, an interrupted one is resumed from its checkpoint, a
missing one is started. Interrupting the campaign (Ctrl-C) is always safe: the run in progress saves its
checkpoint, and the same command continues from there.

A campaign runs the code of one commit: ``load_code`` imports the whole package, then reads the commit once, and
refuses a checkout with uncommitted changes unless they are allowed (``--allow-dirty``). The campaign's own record,
``results/campaign/<profile>-<time>/manifest.json``, names that commit, the data's identity and every run it
kept or trained; a run whose manifest names another commit (the checkout changed while the campaign ran, so the
run's own reading of it is not the code that trained it) is listed there, so the report can say so.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import bnrepro
from bnrepro import recipes as recipe_io
from bnrepro.data import sources
from bnrepro.engine import checkpoint
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.engine.threads import torch_threads
from bnrepro.engine.trainer import Interrupted
from bnrepro.errors import UserError
from bnrepro.experiments import imagenet
from bnrepro.paper import PAPER
from bnrepro.runs import (
    COMPLETE,
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    Damaged,
    git_commit,
    new_run_dir,
    now,
    read_json,
    runs_of,
    skip,
    write_json,
)

ENSEMBLE = PAPER.campaign.ensemble  # Fig. 4's recipe: its members are the campaign's last runs
CAMPAIGN = "campaign"  # results/campaign/<profile>-<time>/: each campaign's own record
LAPTOP_VAL_IMAGES = 10_000  # an estimate without data assumes the laptop data sets' validation size


@dataclass(frozen=True)
class Planned:
    """One run of the campaign, and why it is there. ``home``: the folder under the results folder whose
    ``imagenet/`` holds the run when it is trained: the results folder itself for the paper's runs (which the report's
    Figs. 2-3 show), a study's own folder for a study's other runs (``experiments.changes``), so they stay out of them.
    """

    recipe: str
    seed: int = 0
    overrides: tuple[str, ...] = ()
    why: str = ""
    home: str = ""

    @property
    def name(self) -> str:
        extra = f", {', '.join(self.overrides)}" if self.overrides else ""
        return f"{Path(self.recipe).stem} (seed {self.seed}{extra})"


def campaign() -> list[Planned]:
    """Every ImageNet run of the campaign, in order: paper.yaml's ``campaign.runs`` (Figs. 2-3, Sec. 4.2.2, then
    what the claims need beside them), then the ensemble recipe's members (Fig. 4, Sec. 4.2.3), which that recipe
    alone lists, so that the runs the campaign trains are the ones ``bnrepro ensemble`` averages."""
    ensemble = recipe_io.load(ENSEMBLE)
    return [*(Planned(*run) for run in PAPER.planned()),
            *(Planned(member, why="Fig. 4: ensemble member") for member in ensemble.members)]


def profile_data(profile: str) -> Path:
    """The campaign's data when no folder is given: its first recipe's at ``profile`` (``imagenet.profile_data``)."""
    return imagenet.profile_data(campaign()[0].recipe, profile)


def val_limit(profile: str, given: int | None = None) -> int | None:
    """The validation images the ensemble evaluates: ``given`` (--val-limit), else the campaign's for ``profile``
    (paper.yaml; all of them unless it names a limit); None: all."""
    return given if given is not None else PAPER.campaign.val_limit(profile)


@dataclass
class Step:
    run: Planned
    state: Literal["done", "resume", "new"]
    folder: Path | None
    steps: int  # the run's budget at the profile
    other_data: int = 0  # runs of this recipe, profile and seed under results that trained on other data
    trained: int = 0  # the steps a run to resume has behind it (its checkpoint's step)

    @property
    def todo(self) -> int:
        """The steps this invocation trains: none for a kept run, the rest of the budget for one resumed."""
        return 0 if self.state == "done" else self.steps - self.trained


def trained_steps(folder: Path) -> int:
    """The step an interrupted run's checkpoint holds; 0 where it cannot be read (resuming it then says why)."""
    try:
        return int(checkpoint.load(Path(folder) / checkpoint.NAME).get("step", 0))
    except UserError:
        return 0


def import_package() -> None:
    """Import every module of the package, so that what runs later is what was on disk now, whatever the checkout
    becomes meanwhile (the campaign, and each of its worker processes as it starts)."""
    for module in pkgutil.walk_packages(bnrepro.__path__, "bnrepro."):
        if not module.name.endswith("__main__"):  # that one would run the command line
            importlib.import_module(module.name)


def load_code(allow_dirty: bool = False) -> str:
    """The commit of the code this campaign runs: every module of the package is imported first
    (``import_package``), then the commit read. A checkout with uncommitted changes names no code anyone can get
    back, so it is refused unless ``allow_dirty`` (the commit then ends ``+dirty``, and the campaign's record and
    report say so)."""
    import_package()
    commit = git_commit()
    if commit.endswith("+dirty") and not allow_dirty:
        raise UserError(f"the checkout has uncommitted changes ({commit}), so no commit names the code the runs "
                        f"would come from; commit them, or pass --allow-dirty to record the runs as from a dirty tree")
    return commit


def identity_reader() -> Callable[[Path], dict[str, Any] | None]:
    """``data_identity`` of a folder, each folder computed once; ``None`` where it is gone or is no data set."""
    @cache
    def read(folder: Path) -> dict[str, Any] | None:
        try:
            return sources.data_identity(folder) if Path(folder).is_dir() else None
        except (UserError, OSError, ValueError):
            return None
    return read


def same_data(manifest: dict[str, Any], data: dict[str, Any] | None,
              identity_of: Callable[[Path], dict[str, Any] | None]) -> bool:
    """Whether a run folder's manifest says it used ``data`` (a ``data_identity``; ``None``: not checked).

    A manifest with ``data_identity`` matches on its digest. An older one, without it, matches only if its
    ``classes`` and ``train_examples`` are the data's and its ``dataset_dir`` still holds data with the same
    digest (``identity_of``); a folder that is gone or changed proves nothing, so such a run is not kept."""
    if data is None:
        return True
    recorded = manifest.get("data_identity")
    if recorded:
        return recorded.get("digest") == data["digest"]
    if manifest.get("classes") != data["classes"] or manifest.get("train_examples") != data["train_examples"]:
        return False
    found = identity_of(Path(manifest["dataset_dir"])) if manifest.get("dataset_dir") else None
    return found is not None and found["digest"] == data["digest"]


SUMMARY = ("label", "max_top1", "diverged_at")  # what the campaign's closing lines read of each run's summary.json


def intact(folder: Path) -> bool:
    """Whether a finished run's summary.json and metrics.csv can be read: a damaged one is not kept (and said so,
    ``runs.skip``), so the campaign trains that run again rather than stop at its end or report it wrongly."""
    try:
        imagenet.read_finished(folder, SUMMARY)
    except Damaged as damage:
        skip(damage)
        return False
    return True


def plan(profile: str, results: Path, data: dict[str, Any] | None = None,
         runs: list[Planned] | None = None) -> list[Step]:
    """The campaign (or ``runs``, a study's) at ``profile`` against what ``results`` already holds, in the results
    folder's ``imagenet/`` and in every planned run's ``home``: a run is the same wherever it was trained, so a study
    keeps the campaign's runs it needs and the campaign a study's. Runs count only if they used ``data``
    (``sources.data_identity`` of the campaign's data; ``None``, as for a dry run without data: not checked)."""
    runs = campaign() if runs is None else runs
    homes = sorted({"", *(run.home for run in runs)})
    found = [found for home in homes for found in runs_of(Path(results) / home, "imagenet",
                                                          (*FINISHED, INTERRUPTED, RUNNING))]
    trained = {folder: recipe_io.trained(folder, m) for folder, m in found}
    identity_of = identity_reader()
    steps = []
    for run in runs:
        recipe = recipe_io.load(run.recipe, list(run.overrides))
        if profile not in recipe.profiles:
            raise UserError(f"recipe '{run.recipe}' has no profile '{profile}'")
        same = [(folder, m) for folder, m in found if trained[folder].matches(recipe)
                and m.get("profile") == profile and m.get("seed") == run.seed
                and list(m.get("overrides", [])) == list(run.overrides)]
        mine = [(folder, m) for folder, m in same if same_data(m, data, identity_of)]
        done = [folder for folder, m in mine if m.get("status") in FINISHED and intact(folder)]
        paused = [folder for folder, m in mine if (folder / checkpoint.NAME).is_file()
                  and m.get("status") not in FINISHED]
        state, folder = ("done", done[-1]) if done else ("resume", paused[-1]) if paused else ("new", None)
        steps.append(Step(run, state, folder, recipe.profiles[profile].steps, len(same) - len(mine),
                          trained_steps(folder) if state == "resume" else 0))
    return steps


def train(steps: list[Step], profile: str, dataset_dir: Path, results: Path, options: dict,
          say=print, jobs: int = 1) -> list[Path]:
    """Run the plan in order, ``jobs`` runs at a time; returns every run folder, in plan order. One line per run as
    it starts: where the campaign stands, its ETA at the speed of the steps trained so far in this invocation.

    With ``jobs`` > 1 each run trains in a worker process on cpus / jobs threads: the small convolutions of the
    laptop profile scale poorly across threads, so two 1-thread runs on 2 cores train ~1.4x the images/s of one
    2-thread run (README, "The paper on a laptop"). Ctrl-C asks every running run to stop at its next step
    boundary and save its checkpoint, as it does a single run."""
    ledger = Ledger(sum(s.todo for s in steps), len(steps), say)
    if jobs == 1:
        folders = []
        for i, step in enumerate(steps, 1):
            ledger.starting(i, step)
            folders.append(step.folder if step.state == "done" else train_one(step, profile, dataset_dir, results,
                                                                               options))
            ledger.finished(step)
        return folders
    return train_in_workers(steps, profile, dataset_dir, results, dict(options, show_progress=False), ledger, jobs)


class Ledger:
    """Where the campaign stands: the line said as each run starts, with an ETA from the steps trained so far."""

    def __init__(self, todo: int, runs: int, say: Callable[[str], Any]):
        self.todo, self.runs, self.say = todo, runs, say
        self.trained, self.started = 0, time.perf_counter()

    def starting(self, i: int, step: Step) -> None:
        elapsed = time.perf_counter() - self.started
        eta = f"{(self.todo - self.trained) * elapsed / self.trained / 60:,.0f} min" if self.trained else \
            "after the first run"
        what = {"done": "finished earlier, kept", "resume": f"resuming at step {step.trained:,}",
                "new": "starting"}[step.state]
        self.say(f"campaign run {i}/{self.runs}: {step.run.name} ({step.run.why}), {step.steps:,} steps: {what}; "
                 f"{elapsed / 60:,.1f} min so far, ETA {eta}")

    def finished(self, step: Step) -> None:
        self.trained += step.todo


def train_one(step: Step, profile: str, dataset_dir: Path, results: Path, options: dict) -> Path:
    """One planned run: resumed from its checkpoint, or started; returns its folder."""
    if step.state == "resume":
        return imagenet.resume(step.folder, SINGLE_PROCESS, dataset_dir, **options)
    run_options = imagenet.Options(Path(dataset_dir), seed=step.run.seed, **options)
    return imagenet.run(step.run.recipe, profile, list(step.run.overrides), run_options, Path(results) / step.run.home,
                        SINGLE_PROCESS)


def start_worker(threads: int) -> None:
    """A worker process: the package imported now (``import_package``), ``threads`` CPU threads, and Ctrl-C left
    to the campaign, which forwards it as SIGTERM: the trainer stops at its next step boundary on it, and outside
    a training loop it is ignored (a worker that died of it would break the pool, and the pool would kill the
    other runs before they saved their checkpoints)."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the trainer listens while it trains; an idle worker lives on
    import_package()
    torch.set_num_threads(threads)


def train_in_workers(steps: list[Step], profile: str, dataset_dir: Path, results: Path, options: dict,
                     ledger: Ledger, jobs: int) -> list[Path]:
    """``train`` on ``jobs`` worker processes (spawned: a fresh interpreter, no OpenMP state forked), at most
    ``jobs`` runs in flight, started in plan order. A run that fails or is interrupted stops the others (each saves
    its checkpoint), then its exception goes on."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    folders: dict[int, Path] = {i: s.folder for i, s in enumerate(steps) if s.state == "done"}
    for i in folders:
        ledger.starting(i + 1, steps[i])
    waiting = [i for i, s in enumerate(steps) if s.state != "done"]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=start_worker, initargs=(threads,)) as pool, \
            stop_signals():
        running: dict[Future, int] = {}
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    i = waiting.pop(0)
                    ledger.starting(i + 1, steps[i])
                    running[pool.submit(train_one, steps[i], profile, dataset_dir, results, options)] = i
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    i = running.pop(future)
                    folders[i] = future.result()  # a run's exception ends the campaign here
                    ledger.finished(steps[i])
        except BaseException as err:
            stop_workers(running)
            stopped = [f.exception() for f in running if isinstance(f.exception(), Interrupted)]
            if isinstance(err, KeyboardInterrupt) and stopped:
                raise stopped[0] from None  # said as a single run's Ctrl-C is: where to continue
            raise
    return [folders[i] for i in range(len(steps))]


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Ctrl-C or SIGTERM (what stops a campaign started in the background, whose shell made it ignore Ctrl-C) as a
    KeyboardInterrupt in the campaign's process while its workers train: it then stops them (``stop_workers``)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_workers(running: dict[Future, int]) -> None:
    """Ask every running run to stop at its next step boundary (SIGTERM, repeated until it has: a run still
    setting up when first asked would otherwise train to its end) and wait for them; their own interruptions
    are not raised (the campaign's is)."""
    while any(not f.done() for f in running):
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        wait(running, timeout=5)


def ensemble(folders: list[Path], profile: str, dataset_dir: Path, results: Path, device: str, workers: int,
             val_limit: int | None, show_progress: bool, data: dict[str, Any] | None = None) -> Path:
    """Fig. 4 over the members' runs (the campaign's last six), unless a finished evaluation of exactly these
    runs with this recipe exists (on ``data`` where its manifest records its data's identity; an older one is
    kept on its members alone, which ``plan`` matched to the data)."""
    from bnrepro.evaluate import ensemble as evaluation

    kept = kept_ensemble(folders, profile, results, val_limit, data)
    if kept is not None:
        return kept
    overrides = _ensemble_overrides(profile, val_limit)
    members = folders[-len(recipe_io.load(ENSEMBLE, overrides).members):]
    return evaluation.run(ENSEMBLE, overrides, results, dataset_dir, results, device, workers, members,
                          show_progress=show_progress)


def _ensemble_overrides(profile: str, val_limit: int | None) -> list[str]:
    return [f"profile={profile}"] + ([f"val_limit={val_limit}"] if val_limit else [])


def kept_ensemble(folders: list[Path], profile: str, results: Path, val_limit: int | None,
                  data: dict[str, Any] | None = None) -> Path | None:
    """A finished evaluation of exactly the members among ``folders`` (the campaign's last runs) with the ensemble
    recipe at ``profile``, on ``data`` where its manifest records its data's identity; None where there is none."""
    recipe = recipe_io.load(ENSEMBLE, _ensemble_overrides(profile, val_limit))
    wanted = sorted(str(Path(m)) for m in folders[-len(recipe.members):])
    for folder, manifest in reversed(runs_of(results, "ensemble")):
        recorded = manifest.get("data_identity")
        runs = sorted(str(m.get("run")) for m in manifest.get("members") or [] if isinstance(m, dict))
        if recipe_io.trained(folder, manifest).matches(recipe) and runs == wanted \
                and (data is None or not recorded or recorded.get("digest") == data["digest"]):
            return folder
    return None


def ensemble_left(steps: list[Step], profile: str, results: Path, val_limit: int | None,
                  data: dict[str, Any] | None = None) -> bool:
    """Whether ``execute`` would evaluate the ensemble: yes unless every run is done and ``kept_ensemble`` finds
    an evaluation of them (what a dry run's estimate must count)."""
    done = all(step.state == "done" for step in steps)
    return not (done and kept_ensemble([step.folder for step in steps], profile, results, val_limit, data))


class Record:
    """The campaign's own record, ``results/campaign/<profile>-<time>/manifest.json`` (a study's in its own
    ``where``, so that the report's choice of data, ``report.selection.data_choices``, reads the paper's campaigns
    alone): the commit of the code (``load_code``), the data's identity and folder, the plan, and at the end every run
    folder with the commit its manifest names, so that runs whose manifest disagrees with the campaign's code are on
    file."""

    def __init__(self, results: Path, profile: str, commit: str, data: dict[str, Any] | None, dataset_dir: Path,
                 steps: list[Step], where: str = CAMPAIGN):
        self.results = Path(results)
        self.folder = new_run_dir(self.results / where, prefix=f"{profile}-")
        self.states = {s.folder: s.state for s in steps if s.folder is not None}
        self.manifest: dict[str, Any] = {
            "experiment": CAMPAIGN, "status": RUNNING, "started": now(), "profile": profile,
            "git_commit": commit, "dirty_allowed": commit.endswith("+dirty"),
            "dataset_dir": str(Path(dataset_dir).resolve()), "data_identity": data,
            "plan": [{"run": s.run.name, "state": s.state, "folder": self.relative(s.folder)} for s in steps]}
        self.write()

    def relative(self, folder: Path | None) -> str | None:
        if folder is None:
            return None
        try:
            return Path(folder).resolve().relative_to(self.results.resolve()).as_posix()
        except ValueError:
            return str(folder)

    def write(self) -> None:
        write_json(self.folder / "manifest.json", self.manifest)

    def stop(self, status: str) -> None:
        """The campaign ended before its report (``interrupted`` or ``failed``)."""
        self.manifest.update(status=status, finished=now())
        self.write()

    def finish(self, folders: list[Path], ensemble_dir: Path | None) -> list[str]:
        """Record every run and the ensemble (None: a study has none); returns a line for each run this campaign
        trained or resumed whose manifest names another commit than the campaign's code."""
        commit, runs, warnings = self.manifest["git_commit"], [], []
        for folder in folders:
            recorded = json.loads((Path(folder) / "manifest.json").read_text()).get("git_commit")
            state = {"done": "kept", "resume": "resumed"}.get(self.states.get(folder, "new"), "trained")
            runs.append({"folder": self.relative(folder), "state": state, "git_commit": recorded})
            if state != "kept" and recorded != commit:
                warnings.append(f"{self.relative(folder)}: its manifest names commit {recorded}, but the campaign "
                                f"{'resumed' if state == 'resumed' else 'trained'} it with the code of {commit}")
        self.manifest.update(status=COMPLETE, finished=now(), runs=runs, ensemble=self.relative(ensemble_dir),
                             other_commits=warnings)
        self.write()
        return warnings


def execute(record: Record, steps: list[Step], dataset_dir: Path, options: dict, val_limit: int | None,
            say: Callable[[str], Any] = print, jobs: int = 1, with_ensemble: bool = True
            ) -> tuple[list[Path], Path | None]:
    """The planned runs (``train``), then the ensemble (unless not ``with_ensemble``: a study's), on the campaign's
    ``record``: finished there with every run folder, or marked interrupted or failed before the exception goes on.
    Returns the run folders and the ensemble's (None without one)."""
    profile, results = record.manifest["profile"], record.results
    try:
        folders = train(steps, profile, dataset_dir, results, options, say=say, jobs=jobs)
        ensemble_dir = ensemble(folders, profile, dataset_dir, results, options["device"], options["workers"],
                                val_limit, options["show_progress"], record.manifest["data_identity"]) \
            if with_ensemble else None
    except (Interrupted, KeyboardInterrupt):
        record.stop(INTERRUPTED)
        raise
    except BaseException:
        record.stop(FAILED)
        raise
    for line in record.finish(folders, ensemble_dir):
        say(f"warning: {line}")
    return folders, ensemble_dir


def estimate(steps: list[Step], profile: str, device: str, val_limit: int | None, updates: int = 8,
             jobs: int = 1, with_ensemble: bool = True) -> dict:
    """Seconds the plan's remaining work should take, from a short measurement here: the training step of one
    BN and one non-BN recipe on synthetic images (the two cost classes), and inference for the evaluations (and the
    ensemble's, ``with_ensemble``). With ``jobs``, the step is measured on the threads each worker gets, and ``jobs``
    runs share the training time."""
    import torch

    from bnrepro.models.inception import count_flops

    threads = torch.get_num_threads()
    rates: dict[tuple, float] = {}
    macs = None

    def rate(recipe) -> float:
        """Training images/s of ``recipe``'s cost class (what differs in cost between recipes), measured once."""
        nonlocal macs
        key = (recipe.model.batch_norm, recipe.model.lrn, recipe.model.nonlinearity, recipe.train.distortions)
        if key not in rates:
            options = imagenet.Options(Path("."), device=device, show_progress=False)
            task, optimizer, _ = imagenet.build(recipe, profile, options, SINGLE_PROCESS, synthetic=True)
            rates[key] = imagenet.time_training(task, optimizer, updates, 2)
            macs = count_flops(task.model, recipe.profiles[profile].resolution)
        return rates[key]

    seconds = 0.0
    ensemble = recipe_io.load(ENSEMBLE)
    with torch_threads(max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else threads):
        for step in steps:
            if step.state == "done":
                continue
            recipe = recipe_io.load(step.run.recipe, list(step.run.overrides))
            p = recipe.profiles[profile]
            evaluations = p.steps // p.eval_every + 2
            seconds += step.todo * p.batch_size / rate(recipe)  # a run to resume has only the rest of its steps left
            seconds += step.todo / p.steps * evaluations * LAPTOP_VAL_IMAGES / (3 * rate(recipe))  # inference ~3x
        if with_ensemble and not rates:  # no run left to train: the ensemble still evaluates its members
            rate(recipe_io.load(ensemble.members[0]))
    seconds /= jobs
    crops = sum(ensemble.crops) * len(ensemble.members) * (val_limit or LAPTOP_VAL_IMAGES)
    inference = 3 * max(rates.values()) * jobs if with_ensemble else None  # the ensemble runs on all threads
    ensemble_seconds = crops / inference if inference else 0.0
    return {"training_and_evaluation_s": seconds, "ensemble_s": ensemble_seconds,
            "total_s": seconds + ensemble_seconds, "images_per_second": rates, "threads": threads,
            "multiply_adds": macs}


def describe(steps: list[Step]) -> list[str]:
    """The plan, one line a run; runs found on other data are counted (they are never kept)."""
    def other(step: Step) -> str:
        n = step.other_data
        return f"  ({n} run{'s' * (n != 1)} of it on other data, not kept)" if n else ""
    def state(step: Step) -> str:
        return f"resume at {step.trained:,}" if step.state == "resume" else step.state
    return [f"{i:2d}. {s.run.name:<45} {s.steps:>7,} steps  {state(s):<6} {'' if s.folder is None else s.folder}"
            + other(s) for i, s in enumerate(steps, 1)]


def summary(folders: list[Path]) -> list[str]:
    lines = []
    for folder in folders:
        data = read_json(Path(folder) / "summary.json", SUMMARY)
        best = "—" if data["max_top1"] is None else f"{100 * data['max_top1']:.2f}%"
        lines.append(f"{data['label']:<22} best top-1 {best}" + (f", diverged at step {data['diverged_at']:,}"
                                                               if data["diverged_at"] else ""))
    return lines
