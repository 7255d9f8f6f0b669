"""The finished ImageNet runs and their selection: the one set of runs imagenet.md, claims.md, ensemble.md and
changes.md show.

A module of its own, apart from any one report, because claims.md, ensemble.md, changes.md and imagenet.md all read
the same runs on the same data: one selection, made once here, so that no report shows a run, a row, a data set or a
target the others do not. imagenet.md tables and draws these rows, claims.md judges them, ensemble.md and changes.md
keep to the data they are on.

A run is finished when its manifest says ``complete`` or ``diverged``: a diverged run is a result (the paper's
Inception at 5x the learning rate is one), a running or interrupted one is not. Profiles are never mixed, since their
data and step budgets differ; nor are data sets within a profile: each profile shows the runs on one data set, that of
its latest campaign record, else of its latest finished run (``data_choices``, the one selection imagenet.md, claims.md
and ensemble.md all use, through ``split_by_data``); runs on other data are named in one line, not shown. Within each
profile, each recipe with each set of ``--set`` overrides (step budgets aside) is its own row: the latest finished run
of its lowest seed (seed 0 as a rule), with the latest run of each other seed in ``others``. The target T and each
seed's steps to it (``target_for``, ``seed_steps``) are counted here too, as imagenet.md, Fig. 2 and claims v2 all
count them. Where the manifests carry ``compression`` (this profile's steps per paper step), steps are also given as
paper-equivalent steps (``paper_equivalent``: step / compression), the paper's unit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import pandas as pd
import yaml

from bnrepro.paper import PAPER
from bnrepro.report.text import without_paths
from bnrepro.runs import COMPLETE, DIVERGED, FAILED, FINISHED, INTERRUPTED, RUNNING, Damaged, runs_of, skip

# The paper's target, the recipes' and profiles' order and the names of the rows with overrides are data:
# bnrepro/paper.yaml, read by bnrepro.paper.

# Overrides that only change a step budget (what --steps writes) do not make a row of their own.
BUDGET_OVERRIDE = re.compile(r"^profiles\.[^.=]+\.steps=")
# The target T is a mean of accuracies: mean(0.79, 0.80, 0.81) = 0.8000000000000002 must count as 0.80 (claims v2
# compares with the same tolerance).
ROUNDING = 1e-9


@dataclass
class Run:
    """One finished run folder, read once."""

    path: Path
    rel: str  # the folder relative to the results folder, as the report names it
    manifest: dict
    summary: dict
    metrics: pd.DataFrame
    others: tuple[Run, ...] = ()  # the same row's latest runs of its other seeds (set by latest_per_recipe)

    @property
    def recipe(self) -> str:
        name = self.summary.get("recipe") or self.manifest.get("recipe") or self.path.name
        return name.removeprefix("imagenet/")

    @property
    def variant(self) -> tuple[str, ...]:
        """The run's ``--set`` overrides that change the recipe (step budgets aside), sorted: a row of its own."""
        found = (re.sub(r"\s*=\s*", "=", str(text).strip(), count=1) for text in self.manifest.get("overrides") or [])
        return tuple(sorted(text for text in found if not BUDGET_OVERRIDE.match(text)))

    @property
    def key(self) -> str:
        """The run's row: its recipe, with its overrides where it has any."""
        return row_key(self.recipe, self.variant)

    @property
    def seed(self) -> int:
        return int(self.manifest.get("seed") or 0)

    @property
    def compression(self) -> float | None:
        """This profile's steps per paper step, from the manifest (None where it records none)."""
        c = self.manifest.get("compression")
        return float(c) if c else None

    @property
    def label(self) -> str:
        base = self.summary.get("label") or self.manifest.get("label") or self.recipe
        if not self.variant:
            return base
        return PAPER.variant_labels.get((self.recipe, self.variant)) or f"{base}, --set {' '.join(self.variant)}"

    @property
    def profile(self) -> str:
        return self.summary.get("profile") or self.manifest.get("profile") or "unknown"

    @property
    def diverged_at(self) -> int | None:
        """The step the run diverged at; a manifest that says diverged without a step gives the first NaN loss."""
        if self.summary.get("diverged_at") is not None:
            return int(self.summary["diverged_at"])
        if self.manifest.get("status") != DIVERGED:
            return None
        bad = self.metrics[~_finite(self.metrics.train_loss) | ~_finite(self.metrics.top1)]
        return int(bad.step.iloc[0]) if len(bad) else int(self.metrics.step.max())

    @property
    def lagging(self) -> pd.Series:
        """Per row of ``curve``: an evaluation of a BN network with the moving averages, which lag the weights
        by their window (~1 / momentum updates); Fig. 2 marks such points. Networks without BN have nothing to lag."""
        curve = self.curve
        if "statistics" not in curve or not self.batch_norm:
            return pd.Series(False, index=curve.index)
        return curve.statistics == "moving"

    @property
    def batch_norm(self) -> bool:
        """Whether the run's network has BN, from its resolved recipe (``recipe.yaml``)."""
        try:
            return bool(yaml.safe_load((self.path / "recipe.yaml").read_text())["model"]["batch_norm"])
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return False

    @property
    def curve(self) -> pd.DataFrame:
        """The finite evaluations, up to divergence if any: what Fig. 2 draws and the table counts."""
        m = self.metrics[_finite(self.metrics.top1)]
        if self.diverged_at is not None:
            m = m[m.step <= self.diverged_at]
        return m.sort_values("step")

    @property
    def max_top1(self) -> float | None:
        return float(self.curve.top1.max()) if len(self.curve) else None

    @property
    def seeds(self) -> list[Run]:
        """The row's run and its other seeds' (``others``), by seed: what a row of several seeds averages."""
        return sorted((self, *self.others), key=lambda run: run.seed)


def _finite(column: pd.Series) -> pd.Series:
    """True where a value is a finite number (a diverged run writes NaN, inf or nothing)."""
    return pd.Series(np.isfinite(pd.to_numeric(column, errors="coerce").astype(float)), index=column.index)


def finished_runs(results: Path) -> list[Run]:
    """ImageNet run folders whose manifest says complete or diverged, oldest first (by start time, then name); a
    run whose files cannot be read is left out, with one line that names the file."""
    from bnrepro.experiments.imagenet import read_finished

    runs = []
    for folder, manifest in runs_of(results, "imagenet", FINISHED):
        try:
            summary, metrics = read_finished(folder)
        except Damaged as damage:
            skip(damage)
            continue
        runs.append(Run(folder, folder.relative_to(results).as_posix(), manifest, summary, metrics))
    return runs


def row_key(recipe: str, variant: tuple[str, ...] = ()) -> str:
    """A row's name in ``latest_per_recipe``: the recipe alone, or with its overrides in brackets."""
    return recipe if not variant else f"{recipe} [{' '.join(variant)}]"


def latest_per_recipe(runs: list[Run]) -> dict[str, dict[str, Run]]:
    """profile -> row (``row_key``: recipe and overrides) -> the latest finished run of the row's lowest seed, with
    the latest run of each other seed in its ``others``; profiles and rows in the paper's order."""
    chosen: dict[tuple[str, str], dict[int, Run]] = {}
    for run in runs:  # oldest first, so a later run replaces an earlier one of the same seed
        chosen.setdefault((run.profile, run.key), {})[run.seed] = run
    rows: dict[str, dict[str, Run]] = {}
    for (profile, key), seeds in chosen.items():
        first, *rest = sorted(seeds)
        rows.setdefault(profile, {})[key] = replace(seeds[first], others=tuple(seeds[s] for s in rest))
    return {p: dict(sorted(rows[p].items(), key=lambda kv: _row_rank(kv[1]))) for p in sorted(rows, key=profile_rank)}


def profile_rank(profile: str) -> tuple[int, str]:
    """Where a profile's section goes: paper.yaml's order, then the profiles it does not name, by name."""
    order = PAPER.profile_order
    return (order.index(profile) if profile in order else len(order), profile)


def _recipe_rank(recipe: str) -> tuple[int, str]:
    order = PAPER.recipe_order  # Fig. 2's order, then the recipes it leaves out, then the others by name
    return (order.index(recipe) if recipe in order else len(order), recipe)


def _row_rank(run: Run) -> tuple[int, str, tuple[str, ...]]:
    return (*_recipe_rank(run.recipe), run.variant)


# One data set per profile ---------------------------------------------------------------------------------------------
# A profile's name says how runs are scaled, not what they trained on: the cpu profile held a Fashion-MNIST campaign
# before its CIFAR-10 one. The report shows one data set per profile and names the runs it leaves out, so their
# folders can stay.

def data_name(manifest: dict) -> str:
    """The data set a manifest names, without folder or digest: its ``data_identity``'s name, else (a manifest from
    before it) its ``dataset`` description up to " in <folder>"; "" where it records neither."""
    identity = manifest.get("data_identity") or {}
    if identity.get("name"):
        return str(identity["name"])
    return str(manifest.get("dataset") or "").split(" in ", 1)[0].strip()


def same_data(a: dict, b: dict) -> bool:
    """Whether two manifests (runs, ensembles, campaign records) say they used the same data: by digest where both
    record ``data_identity``. A manifest from before it matches on what both record, the data set's name (``data_name``)
    and its classes and training-example count where both have them: the report reads run folders, not data, so it
    cannot take the digest now. A manifest that names no data contradicts nothing and matches."""
    ia, ib = a.get("data_identity") or {}, b.get("data_identity") or {}
    if ia.get("digest") and ib.get("digest"):
        return ia["digest"] == ib["digest"]
    na, nb = data_name(a), data_name(b)
    if not na or not nb:
        return True
    recorded = [((ia or a).get(key), (ib or b).get(key)) for key in ("classes", "train_examples")]
    return na == nb and all(x is None or y is None or x == y for x, y in recorded)


@dataclass(frozen=True)
class DataChoice:
    """The one data set a profile's tables, figures and claims show (made by ``data_choices``)."""

    reference: dict  # the manifest whose data is shown: the profile's latest campaign record, or its latest run's
    campaign: bool  # whether ``reference`` is a campaign record
    kept: frozenset[str] = field(default_factory=frozenset)  # folders the record lists: `reproduce` checked their data

    def holds(self, manifest: dict, rel: str) -> bool:
        """Whether a run (or ensemble) with ``manifest``, in folder ``rel`` of the results folder, is on this data."""
        return rel in self.kept or same_data(manifest, self.reference)

    @property
    def source(self) -> str:
        return "this profile's latest campaign's data" if self.campaign else "the data of this profile's latest run"


def _listed(record: dict) -> frozenset[str]:
    """The run and ensemble folders a campaign record names (its plan, its runs and its ensemble), relative to the
    results folder as ``Run.rel``."""
    entries = [e for e in (*(record.get("plan") or []), *(record.get("runs") or [])) if isinstance(e, dict)]
    return frozenset(str(f) for f in (*(e.get("folder") for e in entries), record.get("ensemble")) if f)


def campaigns(results: Path) -> dict[str, list[dict]]:
    """profile -> the records of ``bnrepro reproduce`` campaigns at it (``results/campaign``), oldest first."""
    found: dict[str, list[dict]] = {}
    for _, record in runs_of(results, "campaign", (RUNNING, INTERRUPTED, FAILED, COMPLETE)):
        found.setdefault(str(record.get("profile")), []).append(record)
    return found


def data_choices(results: Path) -> dict[str, DataChoice]:
    """profile -> the data its report shows: that of its latest campaign record (``campaigns``) where the record names
    its data (a campaign's runs are on it by construction), else that of its latest finished ImageNet run. The one
    selection imagenet.md, claims.md and ensemble.md make (``split_by_data``); it reads manifests only."""
    choices = {}
    for _, manifest in runs_of(results, "imagenet", FINISHED):  # oldest first: the latest run of each profile stays
        choices[str(manifest.get("profile") or "unknown")] = DataChoice(manifest, campaign=False)
    for profile, records in campaigns(results).items():
        if records[-1].get("data_identity"):  # a record without it (no data given) chooses nothing
            choices[profile] = DataChoice(records[-1], campaign=True, kept=_listed(records[-1]))
    return choices


class Recorded(Protocol):
    """A run or an ensemble run as ``split_by_data`` needs it."""

    manifest: dict
    rel: str

    @property
    def profile(self) -> str | None: ...


R = TypeVar("R", bound=Recorded)


def split_by_data(found: list[R], choices: dict[str, DataChoice]) -> tuple[list[R], list[R]]:
    """``found`` split into those on their profile's chosen data (``choices``; one at a profile without a choice is
    shown) and the rest, each in the order given."""
    shown, other = [], []
    for item in found:
        choice = choices.get(str(item.profile))
        (shown if choice is None or choice.holds(item.manifest, item.rel) else other).append(item)
    return shown, other


def select(results: Path) -> tuple[list[Run], list[Run]]:
    """The finished ImageNet runs the reports show (on their profile's chosen data) and those they leave out, both
    oldest first."""
    return split_by_data(finished_runs(Path(results)), data_choices(Path(results)))


def other_data_line(other: list[Recorded], choice: DataChoice | None, name: Callable[[Recorded], str]) -> str:
    """The one line naming runs (or ensembles) left out for their data: "Made before this campaign" where a campaign
    chose the data and all of them started before it; ``name`` gives each one's text."""
    datasets = "; ".join(sorted({without_paths(data_name(r.manifest)) or "not recorded" for r in other}))
    started = str((choice.reference if choice else {}).get("started", ""))
    if choice is not None and choice.campaign:
        before = all(str(r.manifest.get("started", "")) < started for r in other)
        head = "Made before this campaign, on other data" if before else "On other data than this campaign's"
    else:
        head = "On other data than the profile's latest run" if choice else "On other data"
    return f"{head} ({datasets}), not shown: " + ", ".join(name(r) for r in other)


def seed_maxes(run: Run) -> np.ndarray:
    """The max single-crop top-1 of each of a row's seeds (``Run.seeds``, by seed), 0 for a seed without a finite
    evaluation, as claims v2 counts it: what the target T averages, and v2's seed means."""
    return np.array([r.max_top1 or 0.0 for r in run.seeds])


def target_for(profile: str, runs: dict[str, Run]) -> float | None:
    """The target T of imagenet.md, Fig. 2 and claims v2 (``claims.v2.target``): the paper's 72.2% at profile
    ``paper``; elsewhere Inception's maximum accuracy, as the paper defines the target, estimated over seeds: the
    mean over Inception's seeds of their max single-crop top-1 (``seed_maxes``; with one seed, its max). None without
    an Inception run. Claims v1 keep their own target, the lowest seed's max (``claims.v1.target``)."""
    if profile == "paper":
        return PAPER.imagenet.target
    return float(seed_maxes(runs["inception"]).mean()) if "inception" in runs else None


def counts_own_max(profile: str, key: str) -> bool:
    """Whether row ``key``'s seeds count their steps to target to their own max rather than to T, as claims v2
    counts them: Inception's, away from profile ``paper`` (T is Inception's maximum accuracy, which each of its
    seeds reaches at the first evaluation of its own max)."""
    return key == "inception" and profile != "paper"


def steps_to(run: Run, target: float) -> int | None:
    """The first evaluated step whose top-1 is at least ``target`` (before any divergence); None if none is."""
    reached = run.curve[run.curve.top1 >= target]
    return int(reached.step.iloc[0]) if len(reached) else None


def crossing(run: Run, level: float) -> tuple[int, int] | None:
    """Where ``run`` first reaches ``level`` (``ROUNDING`` under it counting as at it): (the evaluation before, the
    first evaluation at or above it), the interval its crossing lies in, as claims v2 and the changes study count
    steps; None if no evaluation does."""
    curve = run.curve
    reached = curve.step[curve.top1 >= level - ROUNDING]
    if not len(reached):
        return None
    hi = int(reached.iloc[0])
    before = curve.step[curve.step < hi]
    return (int(before.iloc[-1]) if len(before) else hi), hi


def seed_steps(run: Run, target: float | None, own_max: bool = False) -> int | None:
    """One seed's steps to target as imagenet.md and claims v2 count them: its first evaluation at or above
    ``target`` (``ROUNDING`` under it counting as at it), or, ``own_max`` (``counts_own_max``), the first evaluation
    of its own max; None without a target, without a finite evaluation, or if it never reaches ``target``."""
    level = run.max_top1 if own_max else target
    return None if level is None else steps_to(run, level - ROUNDING)


def paper_equivalent(run: Run, step: float | None) -> float | None:
    """``step`` of ``run`` in paper steps (step / compression); None without a step or a recorded compression."""
    return None if step is None or run.compression is None else step / run.compression


def comparable(runs: list[Run], steps: list[float | None]) -> list[float | None]:
    """Steps of several runs on one scale: paper-equivalent where every one of them records its compression (which
    may differ between them), else this profile's own steps."""
    if all(run.compression is not None for run in runs):
        return [paper_equivalent(run, step) for run, step in zip(runs, steps)]
    return list(steps)
