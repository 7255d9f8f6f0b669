"""Fig. 2 (top-1 vs steps) and the Fig. 3 step-count table, from the files of finished ``bnrepro imagenet`` runs.

A run is finished when its manifest says ``complete`` or ``diverged``: a diverged run is a result (the paper's
Inception at 5x the learning rate is one), a running or interrupted one is not. Profiles are never mixed, since their
data and step budgets differ; nor are data sets within a profile: each profile shows the runs on one data set, that of
its latest campaign record, else of its latest finished run (``data_choices``, the one selection imagenet.md, claims.md
and ensemble.md all use, through ``split_by_data``); runs on other data are named in one line, not shown. Within each
profile, each recipe with each set of ``--set`` overrides (step budgets aside) is its own row: the latest finished run
of its lowest seed (seed 0 as a rule), with the latest run of each other seed in ``others``. A row of several seeds is
drawn as their mean with a min-max band (``seed_curve``) and tabled as their mean with its range. Where the manifests
carry ``compression`` (this profile's steps per paper step), steps are also given as paper-equivalent steps
(step / compression), the paper's unit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from bnrepro.paper import PAPER  # noqa: E402
from bnrepro.report import save_figure  # noqa: E402
from bnrepro.runs import (  # noqa: E402
    COMPLETE,
    DIVERGED,
    FAILED,
    FINISHED,
    INTERRUPTED,
    RUNNING,
    Damaged,
    atomic_write,
    check_writable,
    runs_of,
    skip,
)

# The paper's Fig. 3 and target, the recipes' order and colours, the profiles' order and the names of the rows with
# overrides are data: bnrepro/paper.yaml, read by bnrepro.paper.
LINE_STYLES = ("-", "--", "-.", ":")
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


def line_styles(runs: dict[str, Run]) -> dict[str, tuple[str, str]]:
    """Row -> (colour, line style) for one figure, every pair different: a recipe of paper.yaml keeps its colour
    (solid; dashed, then the other styles, for its rows with overrides); the other recipes' rows take, in row order,
    the next spare colour (paper.yaml's; none grey, the target line's colour) and the next line style, both cycling
    (6 colours x 4 styles: 12 rows, their least common multiple, before a pair repeats, then every other pair).
    Colour alone cannot tell 13 and more lines apart, nor similar hues apart (the pink of one member beside BN-x30's
    red), so the style always differs too."""
    used: set[tuple[str, str]] = set()
    spare = PAPER.spare_colours
    cycle = [(spare[i % len(spare)], LINE_STYLES[i % len(LINE_STYLES)])
             for i in range(math.lcm(len(spare), len(LINE_STYLES)))]
    spares = cycle + [(c, style) for style in LINE_STYLES for c in spare if (c, style) not in cycle]
    chosen = {}
    for key, run in runs.items():
        known = PAPER.colours.get(run.recipe)
        candidates = [(known, style) for style in (LINE_STYLES[1:] if run.variant else LINE_STYLES)] if known \
            else spares
        pick = next((pair for pair in candidates if pair not in used), None)
        if pick is None:  # more rows than pairs: reuse, in order
            pick = candidates[len(chosen) % len(candidates)]
        used.add(pick)
        chosen[key] = pick
    return chosen


def short_commit(commit: object) -> str:
    """A recorded commit as the reports show it: 12 hex digits, keeping ``+dirty`` (code that no commit holds)."""
    if not commit:
        return "not recorded"
    text = str(commit)
    head, dirty, _ = text.partition("+dirty")
    return head[:12] + dirty


# " in <folder>" of a split's description, and any other absolute path: the reports name no folder of the machine
# a run ran on (manifest.json keeps it).
_IN_FOLDER = re.compile(r" in (?=[^\s,;()]*[/\\])[^\s,;()]+")
_ABSOLUTE = re.compile(r"(?<![\w.~])(?:/|[A-Za-z]:[/\\])[^\s,;()`]*")


def without_paths(text: str) -> str:
    """``text`` without the folders it names: " in <folder>" dropped, any other absolute path cut to its last two
    parts (``…/imagenet/train``)."""
    def tail(match: re.Match) -> str:
        parts = [part for part in re.split(r"[/\\]", match.group(0)) if part and not part.endswith(":")]
        return "…/" + "/".join(parts[-2:])
    return _ABSOLUTE.sub(tail, _IN_FOLDER.sub("", text))


def data_text(manifest: dict) -> str:
    """The data a run (or an evaluation) used, by name, counts and digest (its ``data_identity``); for a manifest
    from before ``data_identity``, its ``dataset`` description without paths, digest not recorded."""
    identity = manifest.get("data_identity")
    if identity:
        return (f"{identity['name']} ({identity['train_examples']:,} train, {identity['val_examples']:,} val, "
                f"{len(identity['classes'])} classes), digest `{identity['digest'][:12]}`")
    return f"{without_paths(str(manifest.get('dataset', 'not recorded')))}, digest not recorded"


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
    """The target T of imagenet.md, Fig. 2 and claims v2 (``claims.target_v2``): the paper's 72.2% at profile
    ``paper``; elsewhere Inception's maximum accuracy, as the paper defines the target, estimated over seeds: the
    mean over Inception's seeds of their max single-crop top-1 (``seed_maxes``; with one seed, its max). None without
    an Inception run. Claims v1 keep their own target, the lowest seed's max (``claims.target_v1``)."""
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


def paper_steps_text(x: float | None) -> str:
    """Paper(-equivalent) steps as the paper writes them (31.0e6); counts under 1e5 in full."""
    if x is None:
        return "—"
    return f"{x / 1e6:.1f}e6" if x >= 1e5 else f"{x:,.0f}"


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _speedup(reference: float | None, steps: float | None) -> str:
    return "—" if not reference or not steps else f"{reference / steps:,.1f}x"


def _seeds_text(runs: list[Run]) -> str:
    """Seeds as the table names them: "seed 2", "seeds 1, 2"."""
    return f"seed{'s' * (len(runs) > 1)} {', '.join(str(r.seed) for r in runs)}"


def max_text(run: Run) -> str:
    """A "Max accuracy" cell: the run's max; for a row of several seeds their mean and range, "51.2% (50.8-51.6,
    3 seeds)", naming any seed without a finite evaluation (left out of the mean)."""
    runs = run.seeds
    if len(runs) == 1:
        return _percent(run.max_top1)
    found = [r.max_top1 for r in runs if r.max_top1 is not None]
    blank = [r for r in runs if r.max_top1 is None]
    note = f"; no finite evaluation: {_seeds_text(blank)}" if blank else ""
    if not found:
        return f"— ({len(runs)} seeds{note})"
    counted = f"{len(runs)} seeds" if not blank else f"{len(found)} of {len(runs)} seeds"
    return f"{100 * np.mean(found):.1f}% ({100 * min(found):.1f}-{100 * max(found):.1f}, {counted}{note})"


def _reached(run: Run, steps: int | None, target: float | None, paper: bool) -> str:
    """A steps-to-target cell: the step (``paper``: in paper-equivalent steps), else never or where it diverged."""
    def text(step: int) -> str:
        return paper_steps_text(paper_equivalent(run, step)) if paper else f"{step:,}"
    diverged = "" if run.diverged_at is None else f"diverged at {text(run.diverged_at)}"
    if target is None:
        return "—"
    if steps is not None:
        return text(steps) + (f" ({diverged})" if diverged else "")
    return diverged or "never"


def geometric_mean(values: list[float]) -> float:
    """The mean of steps as ratios of steps compare them (claims.md's speed-ups are ratios of these too)."""
    return values[0] if len(values) == 1 else float(np.exp(np.mean(np.log(values))))


def _reached_seeds(run: Run, target: float | None, paper: bool, own_max: bool) -> str:
    """A steps-to-target cell of a row of several seeds: the geometric mean over the seeds that reach the target (each
    its own max where ``own_max``), its range and how many of how many seeds, then each seed that does not (never, or
    diverged at), or diverged after."""
    if target is None:
        return "—"
    runs, reached, notes = run.seeds, [], []
    for r in runs:
        step = seed_steps(r, target, own_max)
        if step is not None:
            reached.append(paper_equivalent(r, step) if paper else step)
        if r.diverged_at is not None:
            at = paper_steps_text(paper_equivalent(r, r.diverged_at)) if paper else f"{r.diverged_at:,}"
            notes.append(f"seed {r.seed} diverged at {at}" + (" after reaching it" if step is not None else ""))
        elif step is None:
            notes.append(f"seed {r.seed} never")
    text = paper_steps_text if paper else (lambda x: f"{x:,.0f}")
    if not reached:  # every seed never: only the diverged ones need a word
        return f"never ({len(runs)} seeds" + "".join(f"; {n}" for n in notes if "diverged" in n) + ")"
    counted = f"{len(runs)} seeds" if len(reached) == len(runs) else f"{len(reached)} of {len(runs)} seeds"
    spread = f"{text(min(reached))}-{text(max(reached))}, " if len(reached) > 1 else ""
    return f"{text(geometric_mean(reached))} ({spread}{counted}" + "".join(f"; {n}" for n in notes) + ")"


def steps_cell(run: Run, target: float | None, paper: bool, own_max: bool = False) -> str:
    """A steps-to-target cell (``paper``: in paper-equivalent steps; ``own_max``: each seed to its own max, see
    ``counts_own_max``): one seed's (``_reached``), or several seeds' (``_reached_seeds``)."""
    if len(run.seeds) > 1:
        return _reached_seeds(run, target, paper, own_max)
    return _reached(run, None if target is None else seed_steps(run, target, own_max), target, paper)


def typical_steps(run: Run, target: float | None, paper: bool, own_max: bool = False) -> float | None:
    """A row's steps to ``target`` for its speed-up (``own_max``: each seed's to its own max): its run's, or over
    several seeds the geometric mean over those that reach it (``paper``: in paper-equivalent steps); None without a
    target or a seed that reaches it."""
    if target is None:
        return None
    found = [(r, seed_steps(r, target, own_max)) for r in run.seeds]
    values = [paper_equivalent(r, s) if paper else s for r, s in found if s is not None]
    return geometric_mean(values) if values else None


def fig3_table(profile: str, runs: dict[str, Run], target: float | None) -> pd.DataFrame:
    """Fig. 3 for one profile: our steps to ``target`` (also in paper-equivalent steps where the manifests carry
    ``compression``), max accuracy, the seeds and the speed-up, beside the paper's. A row of several seeds gives their
    mean and range (steps: geometric mean over the seeds that reach the target). Inception's seeds count, away from
    profile ``paper``, to their own max (``counts_own_max``), as claims v2 does; the other rows to ``target``."""
    inception = runs.get("inception")
    inception_own = counts_own_max(profile, "inception")
    compressed = any(run.compression is not None for run in runs.values())
    rows = []
    for name, run in runs.items():
        paper = PAPER.fig3(name)  # None for a row with overrides, or a recipe the paper's table leaves out
        paper_steps, paper_max = (paper.steps, paper.max_top1) if paper else (None, None)
        own = counts_own_max(profile, name)
        row = {"Model": run.label, "Steps to target": steps_cell(run, target, paper=False, own_max=own)}
        if compressed:
            row["Paper-equivalent steps to target"] = (steps_cell(run, target, paper=True, own_max=own)
                                                       if all(r.compression is not None for r in run.seeds)
                                                       else "no compression recorded")
        speedup = "—"
        if inception is not None:
            both = all(r.compression is not None for r in (*inception.seeds, *run.seeds))  # else this profile's steps
            speedup = _speedup(typical_steps(inception, target, both, inception_own),
                               typical_steps(run, target, both, own))
        row.update({
            "Max accuracy": max_text(run),
            "Seeds": "/".join(str(r.seed) for r in run.seeds),
            "Speed-up vs Inception": speedup,
            f"Paper: steps to {_percent(PAPER.imagenet.target)}": paper_steps_text(paper_steps),
            "Paper: max accuracy": _percent(paper_max),
            "Paper: speed-up": _speedup(PAPER.fig3("inception").steps, paper_steps),
        })
        rows.append(row)
    return pd.DataFrame(rows)


def deviations_list(found: list[str] | None, what: str, indent: int = 0) -> str:
    """A run's recorded deviations from the paper, as Markdown: a count, then one indented bullet each."""
    if found is None:
        return "deviations from the paper: not recorded"
    head = f"deviations from the paper{f' ({what})' if what else ''}: " + ("none" if not found else f"{len(found)}")
    return "\n".join([head, *(f"{' ' * indent}- {text}" for text in found)])


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub markdown for ``df`` (``DataFrame.to_markdown`` needs tabulate, which is not a dependency)."""
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def figure_name(profile: str) -> str:
    """``fig2_imagenet_<profile>``, safe as a file name whatever the manifest says the profile is."""
    return "fig2_imagenet_" + re.sub(r"[^A-Za-z0-9_.-]", "_", profile)


def seed_curve(run: Run) -> pd.DataFrame:
    """Fig. 2's line and band for a row of several seeds, indexed by step: ``mean``, ``min`` and ``max`` top-1 over the
    seeds with a finite value at that step, how many those are (``n``), and ``lagging`` (one of them evaluated BN with
    moving averages there). The steps are those every seed evaluated, a diverged seed counting as evaluated (without a
    value) after its divergence: seeds of one recipe share their evaluation steps, and where they do not (a budget
    changed between them), a mean over the common steps compares like with like."""
    values, lagging, evaluated = {}, {}, []
    for r in run.seeds:
        curve = r.curve.assign(lagging=r.lagging).drop_duplicates("step", keep="last").set_index("step")
        values[r.seed], lagging[r.seed] = curve.top1.astype(float), curve.lagging.astype(bool)
        evaluated.append((set(r.metrics.step.astype(int)), r.diverged_at))
    top1 = pd.DataFrame(values).sort_index()
    common = [all(step in steps or (diverged is not None and step > diverged) for steps, diverged in evaluated)
              for step in top1.index]
    top1 = top1[common]
    flags = pd.DataFrame(lagging).reindex(top1.index).fillna(False).astype(bool)
    frame = pd.DataFrame({"mean": top1.mean(axis=1), "min": top1.min(axis=1), "max": top1.max(axis=1),
                          "n": top1.count(axis=1), "lagging": flags.any(axis=1)})
    return frame[frame.n > 0]


def _x(run: Run, steps: pd.Series, paper: bool) -> pd.Series:
    """Steps of ``run`` on Fig. 2's x-axis: paper-equivalent where ``paper``."""
    return steps / run.compression if paper else steps


def _draw_one_seed(ax: plt.Axes, run: Run, colour: str, style: str, paper: bool) -> tuple[pd.Series, pd.Series,
                                                                                         pd.Series]:
    """A row of one seed: its run's line, an x at a diverged run's last finite evaluation; returns the line's x, y and
    which points lag (for ``figure_2`` to mark)."""
    curve = run.curve
    x, label = _x(run, curve.step, paper), run.label
    if run.diverged_at is not None:
        equivalent = f", {paper_steps_text(paper_equivalent(run, run.diverged_at))} paper-equivalent" if paper else ""
        label += f" (diverged at step {run.diverged_at:,}{equivalent})"
    ax.plot(x, curve.top1, color=colour, label=label, linewidth=1.5, linestyle=style)
    if run.diverged_at is not None and len(curve):
        ax.plot(x.iloc[-1], curve.top1.iloc[-1], marker="x", markersize=10, markeredgewidth=2, color=colour)
    return x, curve.top1, run.lagging


def _draw_seeds(ax: plt.Axes, run: Run, colour: str, style: str, paper: bool) -> tuple[pd.Series, pd.Series,
                                                                                      pd.Series]:
    """A row of several seeds: the seed mean (``seed_curve``) as the line, a shaded min-max band, an x at each diverged
    seed's own last finite evaluation; the legend says how many seeds, and how many diverged."""
    frame, runs = seed_curve(run), run.seeds
    diverged = [r for r in runs if r.diverged_at is not None]
    x = _x(run, frame.index.to_series(), paper)
    label = f"{run.label} (mean of {len(runs)} seeds, band: min-max"
    label += f"; {len(diverged)} of {len(runs)} diverged)" if diverged else ")"
    ax.fill_between(x, frame["min"], frame["max"], color=colour, alpha=0.12, linewidth=0)
    ax.plot(x, frame["mean"], color=colour, label=label, linewidth=1.5, linestyle=style)
    for r in diverged:
        if len(r.curve):
            last = r.curve.iloc[-1]
            ax.plot(_x(r, last.step, paper), last.top1, marker="x", markersize=8, markeredgewidth=2, color=colour)
    return x, frame["mean"], frame.lagging


def drawn_rows(runs: dict[str, Run]) -> dict[str, Run]:
    """The rows Fig. 2 draws: those of the paper's Sec. 4.2 recipes (paper.yaml's ``recipes``), with their overrides;
    other rows (the ensemble's members, which are Fig. 4's) are in the table only. All rows where none is the paper's.
    """
    paper = {key: run for key, run in runs.items() if run.recipe in PAPER.colours}
    return paper or runs


def _zoom(runs: dict[str, Run], paper: bool) -> float | None:
    """The right end of Fig. 2's second panel: 1.05 x the shortest row's last step (the BN recipes' budget, which
    the first panel squeezes into its first fifth), where the longest row runs at least twice as far; else None."""
    ends = [float(_x(r, r.metrics.step, paper).max()) for row in runs.values() for r in row.seeds if len(r.metrics)]
    if not ends or max(ends) < 2 * min(ends):
        return None
    return 1.05 * min(ends)


def figure_2(profile: str, runs: dict[str, Run], target: float | None, out: Path) -> list[Path]:
    """Fig. 2: single-crop validation top-1 vs training steps (paper-equivalent steps, step / compression, where
    every run's manifest carries ``compression``), one line per row of the paper's recipes (``drawn_rows``), each its
    own colour and style (``line_styles``): a row of one seed is its run's line, one of several seeds their mean with a
    min-max band (``seed_curve``); a diverged run's line stops at its last finite evaluation, marked with an x
    (``figure_caption`` says it in words). Where budgets differ by 2x or more, a second panel shows the shorter ones'
    span (``_zoom``), where the BN recipes' curves lie."""
    runs = drawn_rows(runs)
    seeds = [r for row in runs.values() for r in row.seeds]
    paper = bool(seeds) and all(r.compression is not None for r in seeds)  # x in paper-equivalent steps
    zoom = _zoom(runs, paper)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(7, 4.4), sharey=True, squeeze=False)
    styles = line_styles(runs)
    for ax in axes[0]:
        marked = False
        for key, run in runs.items():
            colour, style = styles[key]
            draw = _draw_seeds if len(run.seeds) > 1 else _draw_one_seed
            x, y, lagging = draw(ax, run, colour, style, paper)
            if lagging.any():  # BN evaluated with the moving averages: the point measures their lag (README)
                ax.plot(x[lagging], y[lagging], linestyle="none", marker="o", markersize=4,
                        markerfacecolor="white", markeredgecolor=colour, markeredgewidth=1)
                marked = True
        if marked:
            ax.plot([], [], linestyle="none", marker="o", markersize=4, markerfacecolor="white",
                    markeredgecolor="0.3", label="BN with moving averages, not Alg. 2 (lagging)")
        if target is not None:
            what = "paper's target" if profile == "paper" else target_legend(runs)
            ax.axhline(target, color="0.5", linestyle=":", linewidth=1, label=f"{what} ({100 * target:.1f}%)")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))  # plain up to 9,999 steps, then 1e4, 1e6...
    batches = sorted({r.manifest["global_batch"] // r.manifest.get("replicas", 1) for r in seeds
                      if "global_batch" in r.manifest})  # a step is one mini-batch of the profile's size
    steps = "training steps" + (f" (mini-batches of {'/'.join(map(str, batches))})" if batches else "")
    if paper:
        factors = sorted({round(1 / r.compression) for r in seeds})
        steps = f"paper-equivalent steps\n(step / compression; one step here = {'/'.join(map('{:,}'.format, factors))} "
        steps += "paper steps)"  # two lines: the axes' scale (1e7) is printed at the right end of the first
    first, last = axes[0][0], axes[0][-1]
    first.set(xlabel=steps, ylabel="validation top-1 (single crop)", ylim=(0, None))
    if zoom:
        last.set(xlabel=steps, xlim=(0, zoom))
        first.set_title("every step", fontsize=9)
        last.set_title("the shorter budgets' span", fontsize=9)
    fig.suptitle(f"Fig. 2 reproduced, profile {profile}", fontsize=10)
    # The legend beside the axes, not on them: shaded bands fill the space a legend inside would hide. The figure
    # widens with its longest label (its handle half an inch, a character about 0.062 inch at 8 pt), so each axes
    # stays about 7 (two panels: 5) inches wide.
    longest = max((len(text) for text in first.get_legend_handles_labels()[1]), default=0)
    fig.set_size_inches((10.5 if zoom else 7.5) + 0.062 * longest, 4.4)
    last.legend(*first.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0,
                fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, figure_name(profile))


def campaigns(results: Path) -> dict[str, list[dict]]:
    """profile -> the records of ``bnrepro reproduce`` campaigns at it (``results/campaign``), oldest first."""
    found: dict[str, list[dict]] = {}
    for _, record in runs_of(results, "campaign", (RUNNING, INTERRUPTED, FAILED, COMPLETE)):
        found.setdefault(str(record.get("profile")), []).append(record)
    return found


def campaign_lines(records: list[dict]) -> list[str]:
    """The latest campaign's record as a bullet: the commit of its code (dirty where allowed), its data, what it
    trained and kept, and every run it trained or resumed whose manifest names another commit."""
    if not records:
        return []
    record = records[-1]
    commit = short_commit(record.get("git_commit"))
    dirty = (" (**a checkout with uncommitted changes**, run with `--allow-dirty`: no commit holds this code)"
             if str(record.get("git_commit", "")).endswith("+dirty") else "")
    counts: dict[str, int] = {}
    for run in record.get("runs") or record.get("plan", []):
        state = {"done": "kept", "resume": "resumed", "new": "trained"}.get(run["state"], run["state"])
        counts[state] = counts.get(state, 0) + 1
    done = ", ".join(f"{n} {state}" for state, n in counts.items()) or "none recorded yet"
    earlier = f"; {len(records) - 1} earlier campaign record(s)" if len(records) > 1 else ""
    lines = [f"- Campaign (`bnrepro reproduce`): status {record.get('status')}, the code of commit `{commit}`{dirty}, "
             f"read once before it ran; data: {data_text(record)}; runs: {done}{earlier}"]
    lines += [f"  - **{without_paths(text)}**" for text in record.get("other_commits", [])]
    return lines


def target_legend(runs: dict[str, Run]) -> str:
    """Fig. 2's name for the target line away from profile ``paper`` (``target_for``)."""
    n = len(runs["inception"].seeds) if "inception" in runs else 1
    return "target: Inception's max" if n == 1 else f"target: mean of Inception's {n} seeds' max"


def _target_text(profile: str, runs: dict[str, Run], target: float | None) -> str:
    """The profile's target (``target_for``), said with where it comes from and how steps to it are counted."""
    if profile == "paper":
        return f"{_percent(PAPER.imagenet.target)}, the paper's (Inception's best single-crop top-1)"
    if target is None:
        return ("none: no finished `inception` run in this profile, so no steps-to-target "
                "(the target is the mean over Inception's seeds of their best top-1)")
    seeds = runs["inception"].seeds
    if len(seeds) == 1:
        text = (f"{100 * target:.1f}%, the best top-1 of this profile's `inception` run (claims v2's T; as in the "
                "paper, Inception's maximum)")
    else:
        each = "/".join(_percent(x) for x in seed_maxes(runs["inception"]))
        text = (f"{100 * target:.1f}%, the mean over Inception's {len(seeds)} seeds of their best top-1 (claims v2's "
                f"T; as in the paper, Inception's maximum): {each} (seeds {'/'.join(str(r.seed) for r in seeds)}). "
                "Inception's steps to target are each seed's first evaluation of its own best, as claims v2 counts "
                "them; the other rows' their first evaluation at or above the target")
    if any(r.max_top1 is None for r in seeds):
        text += "; a seed without a finite evaluation counts as 0%, as in claims v2"
    return text


def _run_lines(runs: dict[str, Run]) -> list[str]:
    """Each row's run folder, seed, budget, commit and deviations, then its other seeds' folders."""
    lines = []
    for name, run in runs.items():
        steps = run.summary.get("steps", int(run.metrics.step.max()))
        replicas = run.manifest.get("replicas", 1)
        batch = run.manifest.get("global_batch", "not recorded")
        compression = "" if run.compression is None else \
            f", compression {run.compression:.3g} (a step stands for {1 / run.compression:,.0f} paper steps)"
        lines.append(f"  - {run.label} (`{name}`): `{run.rel}`, seed {run.seed}, status {run.manifest.get('status')}, "
                     f"{steps:,} steps{compression}, {replicas} replica{'s' * (replicas != 1)}, global batch {batch}, "
                     f"commit `{short_commit(run.manifest.get('git_commit'))}`; "
                     + deviations_list(run.summary.get("deviations", run.manifest.get("deviations")), "", indent=4))
        for other in run.others:
            lines.append(f"    - seed {other.seed}: `{other.rel}`, status {other.manifest.get('status')}, "
                         f"max {_percent(other.max_top1)} (in the row's seed mean and range, and Fig. 2's band)")
    return lines


def _data_line(runs: dict[str, Run], choice: DataChoice | None) -> str:
    """The data of the runs shown (the chosen data's where none is shown yet), and what chose it."""
    datasets = sorted({data_text(r.manifest) for row in runs.values() for r in row.seeds})
    if not datasets and choice is not None:
        datasets = [data_text(choice.reference)]
    source = f" ({choice.source})" if choice is not None else ""
    return (f"- Data: {'; '.join(datasets)}{source}"
            + (" (**the runs used different data**)" if len(datasets) > 1 else ""))


def figure_caption(profile: str, runs: dict[str, Run]) -> str:
    """What Fig. 2 draws, in words: above all what a row of several seeds' line and band are."""
    drawn = drawn_rows(runs)
    text = (f"*Fig. 2, profile `{profile}`:* single-crop validation top-1 against steps, one line per row of the "
            "table" + (" of the paper's Sec. 4.2 recipes (the ensemble's members, Fig. 4's, are in the table only)"
                       if len(drawn) < len(runs) else "")
            + "; a diverged run's line stops at its last finite evaluation, marked with an x.")
    if _zoom(drawn, all(r.compression is not None for row in drawn.values() for r in row.seeds)):
        text += " The right panel repeats the left over the shorter budgets' span, where the BN recipes' curves lie."
    if profile == "paper":
        text += " The dotted grey line is the paper's target."
    elif "inception" in runs:
        text += (" The dotted grey line is the target: the mean over Inception's seeds of their best top-1 (with one "
                 "seed, its best).")
    if any(len(run.seeds) > 1 for run in runs.values()):
        text += (" A row of several seeds is drawn as the mean top-1 over its seeds at each step all of them "
                 "evaluated, with a shaded band from the lowest to the highest seed there; the legend gives the "
                 "number of seeds. A diverged seed has no value after its divergence (an x marks its last finite "
                 "evaluation): from there the line is the mean over the seeds still finite and the band their "
                 "range, and the legend says how many diverged.")
    return text


def profile_section(profile: str, runs: dict[str, Run], superseded: list[Run], records: list[dict] = (),
                    other: list[Run] = (), choice: DataChoice | None = None) -> str:
    """One profile's Fig. 3 table, headed by its data (``choice``), target, its latest campaign (``records``) and the
    run folders and commits it comes from; the runs on other data (``other``) named in one line."""
    target = target_for(profile, runs)
    lines = [f"## Profile `{profile}`", "", _data_line(runs, choice),
             f"- Target accuracy: {_target_text(profile, runs, target)}", *campaign_lines(list(records))]
    if runs:
        lines += ["- Runs (per recipe and overrides, the latest finished run of the lowest seed; other seeds below "
                  "it):", *_run_lines(runs), "", markdown_table(fig3_table(profile, runs, target)), ""]
    else:
        lines += ["- Runs: no finished run on this data yet.", ""]
    notes = [f"{runs[name].label}: {note}." for name, note in PAPER.notes.items() if name in runs]
    if notes:
        lines += ["Not in the paper's table: " + " ".join(notes), ""]
    if superseded:
        lines += ["Older finished runs, not shown: " + ", ".join(f"`{r.rel}` ({r.recipe})" for r in superseded), ""]
    if other:
        lines += [other_data_line(list(other), choice, lambda r: f"`{r.rel}` ({r.recipe}, seed {r.seed})"), ""]
    if runs:
        lines += [f"![Fig. 2, profile {profile}]({figure_name(profile)}.png)", "", figure_caption(profile, runs), ""]
    return "\n".join(lines)


def rounded_speedup() -> str:
    """The sentence saying how the paper's text rounds BN-x5's speed-up of its Fig. 3 (31.0e6 / 2.1e6 = 14.8x)."""
    inception, x5 = PAPER.fig3("inception").steps, PAPER.fig3("bn-x5").steps
    return (f"Its text rounds BN-x5's {paper_steps_text(inception)} / {paper_steps_text(x5)} = "
            f"{_speedup(inception, x5)} down to \"{PAPER.imagenet.speedup_in_text:g} times fewer steps\".")


def markdown(by_profile: dict[str, dict[str, Run]], runs: list[Run], records: dict[str, list[dict]] | None = None,
             other: list[Run] = (), choices: dict[str, DataChoice] | None = None) -> str:
    """imagenet.md: the conventions, then each profile's section (``profile_section``), the runs on its chosen data
    (``runs``, rows ``by_profile``) and those on other data (``other``) named."""
    shown = {r.path for chosen in by_profile.values() for row in chosen.values() for r in (row, *row.others)}
    lines = ["# ImageNet (paper Sec. 4.2, Fig. 2 and Fig. 3)", "",
             "A step is one mini-batch of the profile's batch size, the paper's unit, however many replicas "
             "trained the run. Steps to target count evaluated steps only, so they are upper bounds within one "
             "evaluation interval. Max accuracy is the best single-crop validation top-1 over the run's finite "
             "evaluations. Each evaluation says which BN statistics it used (`statistics` in `metrics.csv`): "
             "Alg. 2's population statistics at every evaluation unless the run's recipe chose `eval.statistics: "
             "moving` (then at step 0 and the last one only); runs made before this project evaluated with Alg. 2 "
             "throughout have moving-average rows between. Those rows of BN networks measure the averages' lag "
             "(~1 / momentum updates) rather than the network: Fig. 2 marks them with open circles, and steps to "
             "target or maxima read from them are not the network's. "
             "The paper's columns are its Fig. 3 (shared/paper/README.md, section 3); its step counts are "
             "for the full ImageNet setup, comparable to ours only at profile `paper`, or, where the manifests carry "
             "`compression` (this profile's steps per paper step), through the paper-equivalent steps (step / "
             f"compression), which Fig. 2 then has on its x-axis. {rounded_speedup()} "
             "Each recipe with each set of `--set` overrides (step budgets aside) is a row: the latest finished run "
             "of each of its seeds. A row of one seed shows its run. A row of several seeds shows, in the table, the "
             "mean of its seeds' max accuracy with their range (lowest-highest) and the geometric mean of their "
             "steps to target over the seeds that reach it, with their range, naming each seed that does not "
             "(never, or diverged); in Fig. 2, the seeds' mean top-1 as the line and their range as a shaded band. "
             f"The target (a dotted line in Fig. 2) is the paper's {_percent(PAPER.imagenet.target)} at profile "
             "`paper`; elsewhere it is "
             "claims.md's rules v2's T, Inception's maximum accuracy as the paper defines the target, estimated over "
             "seeds: the mean over Inception's seeds of their best top-1 (with one seed, its best; a seed without a "
             "finite evaluation counts as 0%). There Inception's steps to target are, per seed, its first evaluation "
             "of its own best, where it reaches its maximum, as v2 counts them; every other row's are its first "
             "evaluation at or above the target. claims.md's rules v1 keep their own target, the best top-1 of "
             "Inception's lowest seed; its rules v2 judge all seeds with noise bands. Speed-ups are ratios of steps "
             "to target (over several seeds, of the geometric means), in "
             "paper-equivalent steps where all the runs carry `compression`. "
             "Each profile shows the runs on one data set: that of its latest campaign record (`results/campaign`), "
             "else that of its latest finished run. Its runs on other data (an earlier campaign under the same "
             "profile name) are named in one line under its table and shown nowhere, claims.md and ensemble.md "
             "included. Data compare by digest; a manifest from before the digest was recorded matches on the data "
             "set's name, classes and training-example count, and a run the campaign record lists is on its data. "
             "Data are named by data set, counts and digest (`data_identity` in a run's manifest: the idx files' "
             "bytes, or the paths and sizes of the files of shards and class folders), never by the folder they lay "
             "in, which stays in each run's `manifest.json`; commits marked `+dirty` ran with uncommitted changes.", ""]
    profiles = sorted({*by_profile, *(r.profile for r in other)}, key=profile_rank)
    for profile in profiles:
        chosen = by_profile.get(profile, {})
        superseded = [r for r in runs if r.profile == profile and r.path not in shown]
        lines.append(profile_section(profile, chosen, superseded, (records or {}).get(profile, []),
                                     [r for r in other if r.profile == profile], (choices or {}).get(profile)))
    return "\n".join(lines).rstrip("\n") + "\n"


def build(results: Path, out: Path) -> list[Path]:
    """Write imagenet.md and a Fig. 2 per profile with runs on its chosen data (``data_choices``); [] without any
    finished run."""
    choices = data_choices(Path(results))
    runs, other = split_by_data(finished_runs(Path(results)), choices)
    if not runs and not other:
        return []
    check_writable(out)
    by_profile = latest_per_recipe(runs)
    written = []
    for profile, chosen in by_profile.items():
        written += figure_2(profile, chosen, target_for(profile, chosen), out)
    atomic_write(out / "imagenet.md", markdown(by_profile, runs, campaigns(Path(results)), other, choices))
    return [*written, out / "imagenet.md"]
