"""Claims rules v1: registered before the first campaign's runs existed (profile cpu on Fashion-MNIST) and kept
unchanged in behaviour, so that their verdicts stand beside v2's. One run per recipe (the row's, its lowest seed's),
a "seed spread" of two seeds as the only noise, the target the best top-1 of Inception's lowest seed. A review of the
first campaign found them too easily swayed by one seed; rules v2 (``claims.v2``) replace them. The rules' text
(``COMMON``, ``RULES``) is printed in claims.md word for word, and the code under each follows it."""

from __future__ import annotations

from pathlib import Path

from bnrepro.errors import UserError
from bnrepro.paper import PAPER
from bnrepro.report import ensemble
from bnrepro.report.claims.common import (
    HALF_PAPER_SPEEDUP,
    HELD,
    NOT_HELD,
    NOT_RUN,
    SHARDS,
    SHARDS_ONLY,
    SPEEDUP_TEXT,
    TARGET_TEXT,
    Verdict,
    ensemble_for_claim_7,
    missing_runs,
)
from bnrepro.report.selection import Run, comparable, paper_equivalent, steps_to
from bnrepro.report.text import paper_steps_text
from bnrepro.runs import DIVERGED

SPREAD = "within seed spread"
SPREAD_RECIPES = PAPER.seed_spread  # v1's seed spread: the recipes the campaign trains a second seed of
_SPREAD_NAMES = " and ".join(f"`{name}`" for name in SPREAD_RECIPES)

COMMON = [
    f"The target is imagenet.md's: the best top-1 of this profile's `inception` run (the paper's {TARGET_TEXT} at "
    "profile "
    "`paper`). A recipe's max is its best single-crop validation top-1 over its finite evaluations; its steps to "
    "target are its first evaluated step at or above the target. Steps of two runs are compared as paper-equivalent "
    "steps (step / compression) where both manifests carry `compression`, else as this profile's steps.",
    "Seed spread s: the largest |difference of max top-1| between two seeds of the same recipe, over "
    f"{_SPREAD_NAMES}; s = 0 when neither has a second seed (then any nonzero difference decides).",
    "A claim whose runs are missing is `not run`.",
]
RULES = {
    1: "Held if BN-Baseline reaches the target at an earlier step than Inception does (at a profile other than "
       "`paper`, Inception's step of its max; an Inception that never reaches the target is later than any step); "
       "not held otherwise, also if BN-Baseline never reaches it.",
    2: f"Speed-up = Inception's steps to target / BN-x5's. Held if it is at least {HALF_PAPER_SPEEDUP:g}x (half the "
       f"paper's {SPEEDUP_TEXT}); not "
       "held otherwise, also if BN-x5 never reaches the target. If Inception never reaches the target (possible only "
       "at profile `paper`), its last evaluated step stands in, a lower bound on the speed-up.",
    3: "Two parts. (a) Starts slower: held if BN-x30's top-1 at its first evaluation after step 0 is lower than "
       "BN-x5's at its first, or BN-x30 reaches the target later than BN-x5 (or never, while BN-x5 does); not held "
       "otherwise. (b) Ends higher: d = BN-x30's max - BN-x5's max; held if d > s, within seed spread if |d| <= s, "
       "not held if d < -s. The claim is not held if a part is not held, else within seed spread if a part is, "
       "else held.",
    4: "Held if the `inception-x5` run's status is diverged; not held if it completed.",
    5: "Chance = 1 / the number of classes (the manifest's `classes`). Held if Inception-Sigmoid's max <= 2 x chance "
       "and BN-x5-Sigmoid's max >= 5 x chance (a run without a finite evaluation counts as 0%); not held otherwise; "
       "not run if neither manifest records `classes`.",
    6: f"d = BN-x5's max - the max of BN-x5 with `--set {' '.join(SHARDS.overrides)}` (shards only, no change 6). "
       "Held if "
       "d > s and d > 0; within seed spread if |d| <= s; not held if d < -s.",
    7: "From the latest ensemble run at this profile: held if its first member's 144-crop top-1 error is lower than "
       "its 1-crop top-1 error and the ensemble's 144-crop top-1 error is lower than every member's 144-crop top-1 "
       "error; not held otherwise; not run without an ensemble of two or more members evaluated at 1 and 144 crops.",
}



def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _pts(d: float) -> str:
    return f"{100 * d:+.1f} points"


def _steps(run: Run, step: float | None) -> str:
    """A step of ``run`` as the report gives it: this profile's, with its paper equivalent where recorded."""
    if step is None:
        return "never"
    equivalent = paper_equivalent(run, step)
    return f"{step:,.0f}" + ("" if equivalent is None else f" ({paper_steps_text(equivalent)} paper-equivalent)")


def _three_way(d: float, s: float) -> str:
    """held if d > s (and d > 0), within seed spread if |d| <= s, not held if d < -s."""
    if abs(d) <= s:
        return SPREAD
    return HELD if d > s and d > 0 else NOT_HELD


def seed_spread(rows: dict[str, Run]) -> tuple[float, str]:
    """s, and a sentence saying where it comes from."""
    s, parts = 0.0, []
    for recipe in SPREAD_RECIPES:
        row = rows.get(recipe)
        if row is None:
            continue
        found = [(r.seed, r.max_top1) for r in (row, *row.others) if r.max_top1 is not None]
        if len(found) > 1:
            values = [m for _, m in found]
            s = max(s, max(values) - min(values))
            parts.append(f"{recipe} seeds " + ", ".join(f"{seed}: {_pct(m)}" for seed, m in found))
    if not parts:
        only = " and of ".join(f"`{name}`" for name in SPREAD_RECIPES)
        return 0.0, (f"s = 0: only one seed of {only} (or neither run), so the seed spread is "
                     "unknown and any nonzero difference decides.")
    return s, f"s = {100 * s:.1f} points ({'; '.join(parts)})."



def claim_1(rows: dict[str, Run], target: float | None) -> Verdict:
    if (missing := missing_runs(rows, "inception", "bn-baseline")) or target is None:
        return missing or Verdict(0, "no target", NOT_RUN)
    inception, baseline = rows["inception"], rows["bn-baseline"]
    si, sb = steps_to(inception, target), steps_to(baseline, target)
    ci, cb = comparable([inception, baseline], [si, sb])
    held = cb is not None and (ci is None or cb < ci)
    return Verdict(1, f"BN-Baseline {_steps(baseline, sb)} vs Inception {_steps(inception, si)} steps to "
                      f"{_pct(target)}", HELD if held else NOT_HELD)


def claim_2(rows: dict[str, Run], target: float | None) -> Verdict:
    if (missing := missing_runs(rows, "inception", "bn-x5")) or target is None:
        return missing or Verdict(0, "no target", NOT_RUN)
    inception, x5 = rows["inception"], rows["bn-x5"]
    si, s5 = steps_to(inception, target), steps_to(x5, target)
    bound = si is None  # Inception never reached the paper's target: its last evaluated step stands in
    reference = int(inception.curve.step.max()) if bound and len(inception.curve) else si
    ci, c5 = comparable([inception, x5], [reference, s5])
    if c5 is None or not ci:
        return Verdict(2, f"BN-x5 never reaches {_pct(target)} (Inception: {_steps(inception, si)})", NOT_HELD)
    speedup = ci / c5
    return Verdict(2, f"BN-x5 {_steps(x5, s5)} vs Inception {_steps(inception, si)} steps to {_pct(target)}: "
                      f"{'at least ' if bound else ''}{speedup:,.1f}x",
                   HELD if speedup >= HALF_PAPER_SPEEDUP else NOT_HELD)


def _first_after_zero(run: Run) -> tuple[int, float] | None:
    later = run.curve[run.curve.step > 0]
    return (int(later.step.iloc[0]), float(later.top1.iloc[0])) if len(later) else None


def claim_3(rows: dict[str, Run], target: float | None, s: float) -> Verdict:
    if missing := missing_runs(rows, "bn-x30", "bn-x5"):
        return missing
    x30, x5 = rows["bn-x30"], rows["bn-x5"]
    f30, f5 = _first_after_zero(x30), _first_after_zero(x5)
    lower_first = f30 is not None and f5 is not None and f30[1] < f5[1]
    s30 = s5 = None
    if target is not None:
        s30, s5 = steps_to(x30, target), steps_to(x5, target)
    c30, c5 = comparable([x30, x5], [s30, s5])
    later = c5 is not None and (c30 is None or c30 > c5)
    start = HELD if lower_first or later else NOT_HELD
    first = ("first evaluation after step 0: " + (f"{_pct(f30[1])} at {f30[0]:,}" if f30 else "none") + " vs "
             + (f"{_pct(f5[1])} at {f5[0]:,}" if f5 else "none"))
    to_target = "" if target is None else f"; steps to {_pct(target)}: {_steps(x30, s30)} vs {_steps(x5, s5)}"
    if x30.max_top1 is None or x5.max_top1 is None:
        end, ends = NOT_HELD, "max: " + _pct(x30.max_top1) + " vs " + _pct(x5.max_top1)
    else:
        d = x30.max_top1 - x5.max_top1
        end, ends = _three_way(d, s), f"max {_pct(x30.max_top1)} vs {_pct(x5.max_top1)} ({_pts(d)})"
    verdict = NOT_HELD if NOT_HELD in (start, end) else SPREAD if SPREAD in (start, end) else HELD
    return Verdict(3, f"(a) starts slower: {start} (BN-x30 vs BN-x5 {first}{to_target}); "
                      f"(b) ends higher: {end} ({ends})", verdict)


def claim_4(rows: dict[str, Run]) -> Verdict:
    if missing := missing_runs(rows, "inception-x5"):
        return missing
    run = rows["inception-x5"]
    if run.manifest.get("status") == DIVERGED:
        return Verdict(4, f"diverged at step {_steps(run, run.diverged_at)}", HELD)
    return Verdict(4, f"{run.manifest.get('status')}, max {_pct(run.max_top1)}", NOT_HELD)


def claim_5(rows: dict[str, Run]) -> Verdict:
    if missing := missing_runs(rows, "inception-sigmoid", "bn-x5-sigmoid"):
        return missing
    isig, bsig = rows["inception-sigmoid"], rows["bn-x5-sigmoid"]
    classes = isig.manifest.get("classes") or bsig.manifest.get("classes")
    if not classes:
        return Verdict(5, "the manifests record no `classes`, so chance is unknown", NOT_RUN)
    chance = 1 / len(classes)
    i_max, b_max = isig.max_top1 or 0.0, bsig.max_top1 or 0.0  # a run without a finite evaluation: 0%
    held = i_max <= 2 * chance and b_max >= 5 * chance
    return Verdict(5, f"chance {_pct(chance)} ({len(classes)} classes); Inception-Sigmoid max {_pct(i_max)} "
                      f"(limit {_pct(2 * chance)}); BN-x5-Sigmoid max {_pct(b_max)} (at least {_pct(5 * chance)})",
                   HELD if held else NOT_HELD)


def claim_6(rows: dict[str, Run], s: float) -> Verdict:
    if missing := missing_runs(rows, "bn-x5", SHARDS_ONLY):
        return missing
    x5, shards = rows["bn-x5"], rows[SHARDS_ONLY]
    if x5.max_top1 is None or shards.max_top1 is None:
        return Verdict(6, f"max {_pct(x5.max_top1)} vs {_pct(shards.max_top1)}", NOT_HELD)
    d = x5.max_top1 - shards.max_top1
    return Verdict(6, f"BN-x5 {_pct(x5.max_top1)} vs shards only {_pct(shards.max_top1)}: d = {_pts(d)}",
                   _three_way(d, s))


def _top1_error(run: ensemble.EnsembleRun, members: list[str], crops: int) -> float:
    """The top-1 error ensemble.md gives (the same ranking of the same cached probabilities)."""
    return 1.0 - float(ensemble.top1_correct(run, members, crops).mean())



def claim_7(results: Path, profile: str) -> Verdict:
    run = ensemble_for_claim_7(results, profile)
    if isinstance(run, Verdict):
        return run
    first = run.members[0]
    try:
        one, many = _top1_error(run, [first], 1), _top1_error(run, [first], 144)
        members = {m: _top1_error(run, [m], 144) for m in run.members}
        together = _top1_error(run, run.members, 144)
    except UserError as err:
        return Verdict(7, f"`{run.rel}`: {err}", NOT_RUN)
    held = many < one and all(together < e for e in members.values())
    return Verdict(7, f"`{run.rel}`, top-1 error: {first} {one:.2%} (1 crop) -> {many:.2%} (144 crops); ensemble of "
                      f"{len(run.members)} {together:.2%} vs members' 144-crop {min(members.values()):.2%} (best) to "
                      f"{max(members.values()):.2%}", HELD if held else NOT_HELD)


def target(profile: str, rows: dict[str, Run]) -> float | None:
    """v1's target, as registered: the paper's 72.2% at profile ``paper``; elsewhere the best top-1 of the row's
    `inception` run, that of Inception's lowest seed (None without one, or without a finite evaluation). imagenet.md
    showed it until it took v2's T (``selection.target_for``), the mean over Inception's seeds."""
    if profile == "paper":
        return PAPER.imagenet.target
    return rows["inception"].max_top1 if "inception" in rows else None


def judge(profile: str, rows: dict[str, Run], results: Path) -> tuple[list[Verdict], str]:
    """Every claim's verdict at ``profile``, and the seed spread's sentence."""
    level = target(profile, rows)
    s, spread = seed_spread(rows)
    verdicts = [claim_1(rows, level), claim_2(rows, level), claim_3(rows, level, s), claim_4(rows),
                claim_5(rows), claim_6(rows, s), claim_7(results, profile)]
    for number, verdict in enumerate(verdicts, start=1):
        verdict.number = number
    return verdicts, spread


