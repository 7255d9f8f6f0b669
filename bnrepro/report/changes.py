"""The changes study (issue 22, ``bnrepro reproduce --study changes``): what each of Sec. 4.2.1's changes buys.

Each change is measured in two directions, from the runs ``experiments.changes`` plans: left out of BN-x5 (BN-x5
against BN-x5 with the change undone) and added to BN-Baseline (BN-Baseline with the change made against BN-Baseline,
both at BN-x5's budget). Both are said as the change's effect, with the change against without it, so a positive
accuracy difference and a speed-up above 1 mean the change helps, whichever way it was measured.

The rules, fixed before the study's runs (README, "Beyond the paper"):
- Max top-1: per seed, the run's best single-crop evaluation; the effect d is the difference of seed means (with the
  change minus without), its noise band two standard errors of that difference (``claims.v2.band``). ``helps`` if
  d > band, ``hurts`` if d < -band, else ``inside the noise``.
- Steps: to the level L of the direction: T (Inception's max at the profile, imagenet.md's target) or, where a seed
  of the direction's reference (BN-x5; BN-Baseline at BN-x5's budget) peaks below T, the lowest of its seeds'
  maxes, so that every reference seed reaches L. Per seed, the first evaluation at or above L, whose crossing lies
  after the evaluation before it: the interval (before, first]; a seed that never reaches L counts at its last
  evaluation, its interval (last, infinity) (said as "never"). The speed-up is the ratio of the geometric means over
  seeds (without the change over with it); its interval, as claims v2 takes a ratio of steps: from the
  evaluations' intervals, widened by two standard errors of the difference of mean log steps.
  ``faster`` if the interval lies above 1, ``slower`` if below, else ``inside the noise``; a seed that never
  reaches L thus counts only as far as its lower bound shows.
- Fewer than two seeds on either side: no band, ``one seed`` (never a ranking).
The runs are the latest finished run of each seed of each planned run (matched by the recipe's training digest,
profile and seed) on the data imagenet.md shows at the profile (``selection.data_choices``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from bnrepro import recipes as recipe_io  # noqa: E402
from bnrepro.experiments import changes  # noqa: E402
from bnrepro.paper import PAPER  # noqa: E402
from bnrepro.report import save_figure  # noqa: E402
from bnrepro.report.claims.v2 import Steps, band, ratio_of  # noqa: E402
from bnrepro.report.selection import (  # noqa: E402
    Run,
    crossing,
    data_choices,
    finished_runs,
    latest_per_recipe,
    profile_rank,
    split_by_data,
    target_for,
)
from bnrepro.report.text import data_caveats, markdown_table  # noqa: E402
from bnrepro.runs import atomic_write, check_writable  # noqa: E402

HELPS, HURTS, FASTER, SLOWER = "helps", "hurts", "faster", "slower"
NOISE, ONE_SEED, MISSING = "inside the noise", "one seed", "not run"
LEAVE, ADD = "leave one out", "add one in"
MARKERS = {LEAVE: ("o", "tab:blue", "left out of BN-x5"), ADD: ("s", "tab:orange", "added to BN-Baseline")}


@dataclass
class Speed:
    """A change's speed-up to L (steps without it over steps with it): the ratio of geometric means, its interval
    (evaluations and seed band; NaN without seeds), the verdict, and the seeds that never reach L on each side."""

    ratio: float
    low: float = math.nan
    high: float = math.nan
    verdict: str = MISSING
    never_with: int = 0
    never_without: int = 0


@dataclass
class Side:
    """One run of the study over its seeds: with or without a change."""

    runs: list[Run]  # by seed

    @property
    def maxes(self) -> np.ndarray:
        return np.array([r.max_top1 or 0.0 for r in self.runs])

    def steps(self, level: float) -> Steps:
        """Per seed, where its crossing of ``level`` lies: (the evaluation before, the first at or above it], or
        (its last evaluation, infinity) where it never gets there. Steps below 1 count as 1 (logs are taken)."""
        spans = []  # (lo, hi, the step counted) per seed
        for run in self.runs:
            found = crossing(run, level)
            last = float(run.curve.step.iloc[-1]) if len(run.curve) else 1.0
            spans.append((last, math.inf, last) if found is None else (*found, found[1]))
        lo, hi, at = (np.maximum(np.array(column, float), 1.0) for column in zip(*spans))
        return Steps(lo, hi, at)

    def text(self) -> str:
        values = self.maxes
        if not len(values):
            return "—"
        spread = f" [{100 * values.min():.2f}–{100 * values.max():.2f}]" if len(values) > 1 else ""
        return f"{100 * values.mean():.2f}%{spread} ({len(values)} seed{'s' * (len(values) > 1)})"


@dataclass
class Effect:
    """A change's effect measured one way: ``with_`` and ``without`` the change."""

    change: int
    direction: str
    with_: Side
    without: Side
    level: float | None  # L: the steps are counted to it

    @property
    def name(self) -> str:
        return PAPER.changes[self.change].name

    @property
    def measured(self) -> bool:
        return bool(self.with_.runs) and bool(self.without.runs)

    @property
    def seeded(self) -> bool:
        return len(self.with_.runs) > 1 and len(self.without.runs) > 1

    def accuracy(self) -> tuple[float, float, str]:
        """d (points as a fraction), its band, the verdict."""
        if not self.measured:
            return math.nan, math.nan, MISSING
        a, b = self.with_.maxes, self.without.maxes
        d = float(a.mean() - b.mean())
        if not self.seeded:
            return d, math.nan, ONE_SEED
        w = band(a, b)
        return d, w, HELPS if d > w else HURTS if d < -w else NOISE

    def speed(self) -> Speed:
        """The speed-up to L by the module's rule: its interval from the evaluations' intervals (the lowest it can
        be: without's earliest over with's latest; the highest: the reverse), widened by the seed band of log
        steps."""
        if not self.measured or self.level is None:
            return Speed(math.nan)
        a, b = self.with_.steps(self.level), self.without.steps(self.level)
        never = int(np.isinf(a.hi).sum()), int(np.isinf(b.hi).sum())  # seeds with and without that never reach L
        r = ratio_of(b, a)  # without over with
        ratio = math.exp(r.point)
        if not self.seeded:
            return Speed(ratio, verdict=ONE_SEED, never_with=never[0], never_without=never[1])
        verdict = FASTER if r.lower > 1 else SLOWER if r.upper < 1 else NOISE
        return Speed(ratio, r.lower, r.upper, verdict, *never)


def study_runs(results: Path) -> list[Run]:
    """The finished runs the study can use: the campaign's (``results/imagenet``) and its own
    (``results/changes/imagenet``), each named relative to ``results``."""
    own = [replace(r, rel=f"{changes.HOME}/{r.rel}") for r in finished_runs(Path(results) / changes.HOME)]
    return finished_runs(Path(results)) + own


def seeds_of(recipe: recipe_io.RecipeBase, profile: str, runs: list[tuple[Run, recipe_io.Trained]]) -> Side:
    """The latest finished run of each seed of ``recipe`` (any seed) at ``profile``, among ``runs`` with what each
    says it trained (``recipes.trained``)."""
    latest: dict[int, Run] = {}
    for run, trained in runs:  # oldest first: a later run of a seed replaces an earlier one
        if run.profile == profile and trained.matches(recipe):
            latest[run.seed] = run
    return Side([latest[s] for s in sorted(latest)])


def level_for(reference: Side, target: float | None) -> float | None:
    """L: T, or the lowest of the reference's seeds' maxes where one peaks below T (None without runs or T)."""
    if not reference.runs or target is None:
        return None
    return float(min(target, reference.maxes.min()))


def effects(profile: str, runs: list[Run], target: float | None) -> list[Effect]:
    """Every change's effect both ways at ``profile``, from ``runs`` (those on the profile's chosen data)."""
    trained = [(run, recipe_io.trained(run.path, run.manifest)) for run in runs]  # each recipe.yaml read once

    @cache
    def side(recipe: str, overrides: tuple[str, ...]) -> Side:  # each reference serves 7 variants: loaded once
        return seeds_of(recipe_io.load(recipe, list(overrides)), profile, trained)

    found = []
    for variant in changes.variants(profile, seeds=1):  # the design; seeds are matched across the runs
        if variant.direction == "reference":
            continue
        ours, theirs = (side(r.recipe, r.overrides) for r in (variant.run, variant.reference))
        with_, without = (theirs, ours) if variant.direction == LEAVE else (ours, theirs)
        found.append(Effect(variant.change, variant.direction, with_, without, level_for(theirs, target)))
    return found


def _points(d: float, w: float) -> str:
    if math.isnan(d):
        return "—"
    return f"{100 * d:+.2f}" + ("" if math.isnan(w) else f" ± {100 * w:.2f}")


def _speedup(speed: Speed) -> str:
    if math.isnan(speed.ratio):
        return "—"
    def end(x: float) -> str:  # a seed that never reaches L leaves an end of the interval at 0 or infinity
        return "∞" if math.isinf(x) else "0" if x == 0 else f"{x:.2f}x"
    text = f"{speed.ratio:.2f}x" + ("" if math.isnan(speed.low) else f" ({end(speed.low)}–{end(speed.high)})")
    nevers = [f"{n} seed{'s' * (n > 1)} {side} never reach L"
              for n, side in ((speed.never_with, "with"), (speed.never_without, "without")) if n]
    return text + (f"; {', '.join(nevers)}" if nevers else "")


def table(found: list[Effect]) -> pd.DataFrame:
    """Every number of the study: one row per change and direction."""
    rows = []
    for e in found:
        d, w, acc = e.accuracy()
        speed = e.speed()
        rows.append({"Change": f"{e.change}. {e.name}", "Measured": e.direction,
                     "Max top-1 with": e.with_.text(), "without": e.without.text(),
                     "Effect on max (points)": _points(d, w), "Max": acc,
                     "L": "—" if e.level is None else f"{100 * e.level:.2f}%",
                     "Speed-up to L (without / with)": _speedup(speed), "Steps": speed.verdict})
    return pd.DataFrame(rows)


SPEED_AXIS = (1 / 16, 16)  # the speed-up panel's range: an interval beyond it is cut there, with an arrow


def _bar(ax: plt.Axes, x: float, y: float, low: float, high: float, e: Effect, solid: bool,
         limits: tuple[float, float] = (-math.inf, math.inf)) -> None:
    """One effect's marker at (x, y) with its interval [low, high] (NaN: none), cut at ``limits`` with an arrow
    where it reaches beyond (a seed that never reaches L leaves the interval unbounded)."""
    marker, colour, label = MARKERS[e.direction]
    x = min(max(x, limits[0]), limits[1])
    err = None
    if not math.isnan(low):
        shown = max(low, limits[0]), min(high, limits[1])
        err = [[x - shown[0]], [shown[1] - x]]
        for end, cut, step in ((shown[0], low < limits[0], 0.8), (shown[1], high > limits[1], 1.25)):
            if cut:
                ax.annotate("", (end * step, y), (end, y), arrowprops={"arrowstyle": "->", "color": colour})
    ax.errorbar(x, y, xerr=err, fmt=marker, color=colour, mfc=colour if solid else "white", capsize=3, label=label)


def figure(profile: str, found: list[Effect], out: Path) -> list[Path]:
    """Each change's effect on max top-1 (left) and its speed-up to L (right), both directions, with their bands; a
    hollow marker is an effect inside its band (or of one seed)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for e in found:
        y = list(PAPER.changes).index(e.change) + (-0.15 if e.direction == LEAVE else 0.15)
        d, w, acc = e.accuracy()
        if not math.isnan(d):
            _bar(left, 100 * d, y, 100 * (d - w), 100 * (d + w), e, acc in (HELPS, HURTS))
        speed = e.speed()
        if not math.isnan(speed.ratio):
            _bar(right, speed.ratio, y, speed.low, speed.high, e, speed.verdict in (FASTER, SLOWER), SPEED_AXIS)
    left.axvline(0, color="grey", lw=0.8)
    right.axvline(1, color="grey", lw=0.8)
    right.set_xscale("log")
    right.set_xlim(SPEED_AXIS[0] / 1.5, SPEED_AXIS[1] * 1.5)
    left.set_yticks(range(len(PAPER.changes)), [f"{n}. {c.name}" for n, c in PAPER.changes.items()])
    left.set_ylim(len(PAPER.changes) - 0.5, -0.5)
    left.set_xlabel("effect on max top-1 (points: with the change − without)")
    right.set_xlabel("speed-up in steps to L (without the change / with)")
    right.xaxis.set_major_locator(LogLocator(base=2))
    right.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x" if x >= 1 else f"1/{1 / x:g}x"))
    right.xaxis.set_minor_formatter(NullFormatter())
    right.legend([Line2D([], [], marker=m, color=c, ls="none") for m, c, _ in MARKERS.values()],
                 [label for *_, label in MARKERS.values()], fontsize=8)
    fig.suptitle(f"Sec. 4.2.1's changes one at a time, profile {profile}: mean over seeds\n"
                 f"bars: 2 s.e. (steps: and the evaluations' spacing); hollow: inside them, or one seed (no bars)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, figure_name(profile))


def figure_name(profile: str) -> str:
    return "changes_" + re.sub(r"[^A-Za-z0-9_.-]", "_", profile)


def summary_lines(found: list[Effect]) -> list[str]:
    """Which changes matter at this scale, which do not, which are unmeasured, and what the paper says."""
    def listed(pick) -> str:
        hits = [f"{e.change}. {e.name} ({e.direction}: {what})" for e in found if (what := pick(e))]
        return "; ".join(hits) or "none"
    outside = listed(lambda e: ", ".join(v for v in (e.accuracy()[2], e.speed().verdict) if v in
                                         (HELPS, HURTS, FASTER, SLOWER)))
    inside = listed(lambda e: "both" if e.accuracy()[2] == NOISE and e.speed().verdict == NOISE else "")
    missing = {d: [str(e.change) for e in found if e.direction == d and not e.seeded] for d in MARKERS}
    missing_text = "; ".join(f"{d}: {', '.join(n)}" for d, n in missing.items() if n) or "none"
    paper = "; ".join(f"change {n} ({c.name}): {c.paper}" for n, c in PAPER.changes.items() if c.paper)
    return [f"- Outside the noise band: {outside}.", f"- Inside the noise on both measures: {inside}.",
            f"- Not run, or fewer than two seeds on a side: {missing_text}.",
            f"- The paper gives a number for one change alone: {paper}; the others only as part of BN-x5."]


def study(results: Path) -> dict[str, tuple[float | None, list[Effect]]]:
    """profile -> (T, every effect), for each profile with a finished run of the study's own, on the data
    imagenet.md shows there (``selection.data_choices``)."""
    choices = data_choices(Path(results))
    runs, _ = split_by_data(study_runs(results), choices)
    rows = latest_per_recipe(split_by_data(finished_runs(Path(results)), choices)[0])
    profiles = sorted({r.profile for r in runs if r.rel.startswith(f"{changes.HOME}/")}, key=profile_rank)
    targets = {p: target_for(p, rows.get(p, {})) for p in profiles}
    return {p: (targets[p], effects(p, runs, targets[p])) for p in profiles}


def markdown(found: dict[str, tuple[float | None, list[Effect]]]) -> str:
    """changes.md: the rules, then each profile's figure, table and lines."""
    lines = ["# Beyond the paper: Sec. 4.2.1's changes one at a time", "",
             "Each change measured two ways: left out of BN-x5, and added to BN-Baseline at BN-x5's budget; both "
             "said as the change's effect (with it against without it). Rules (fixed before the runs, "
             "`bnrepro/report/changes.py`): effects on max top-1 against two standard errors of the difference of "
             "seed means; steps to L (T, Inception's max at the profile, or the lowest max of the direction's "
             "reference seeds where one peaks below T) as a speed-up of geometric means, its interval from the "
             "evaluations' spacing (a crossing lies between two evaluations; a seed that never reaches L, after its "
             "last) widened by two standard errors of the difference of mean log steps. An effect inside its band "
             "is reported as such, not ranked.", ""]
    for profile, (target, effects_) in found.items():
        caveats = data_caveats(r.manifest for e in effects_ for side in (e.with_, e.without) for r in side.runs)
        lines += [f"## Profile `{profile}`", "", *(f"{c}\n" for c in caveats),
                  f"T = {'—' if target is None else f'{100 * target:.2f}%'} (imagenet.md's target at this profile).",
                  "", f"![changes]({figure_name(profile)}.png)", "",
                  markdown_table(table(effects_)), "", *summary_lines(effects_), ""]
    return "\n".join(lines)


def build(results: Path, out: Path) -> list[Path]:
    """Write changes.md and one figure per profile with finished study runs; [] without any."""
    found = study(results)
    if not found:
        return []
    check_writable(out)
    written = [path for profile, (_, effects_) in found.items() for path in figure(profile, effects_, out)]
    atomic_write(out / "changes.md", markdown(found))
    return [*written, out / "changes.md"]
