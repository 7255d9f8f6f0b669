"""Claims rules v2: written after a review of v1 on the first campaign and before the next campaign's runs existed,
from first principles, not fitted to any numbers: a noise band for every comparison from at least 3 seeds per recipe,
steps to target as intervals, paired McNemar tests for claim 7, and verdicts ``held``, ``not held``,
``inconclusive``, ``not testable at this scale`` and ``not run``. The rules' text (``COMMON``, ``RULES``, and what
changed from v1, ``CHANGES``) is printed in claims.md word for word, and the code under each follows it. ``band`` is
the noise band other studies of the report use too (changes.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

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
    fig3_steps,
    missing_runs,
)
from bnrepro.report.selection import Run, crossing, seed_maxes, target_for
from bnrepro.runs import DIVERGED

INCONCLUSIVE, NOT_TESTABLE = "inconclusive", "not testable at this scale"
MIN_SEEDS = 3  # two seeds give a standard deviation with one degree of freedom: too loose to be a noise estimate
ALPHA = 0.05
MIN_EPOCHS_CHANGE_6 = 3.0
# The paper's BN-x5 reached 72.2% after 2.1e6 steps of 32 images, ~52 epochs of ImageNet's 1.28e6 training images.
PAPER_BN_X5_EPOCHS = PAPER.fig3("bn-x5").steps * PAPER.imagenet.batch_size / PAPER.imagenet.train_images
_BN_X5_EPOCHS_TEXT = (f"{fig3_steps('bn-x5')} x {PAPER.imagenet.batch_size} / "
                      f"{PAPER.imagenet.train_images / 1e6:.2f}e6 = {PAPER_BN_X5_EPOCHS:.0f} epochs")
COMBINE_ORDER = (NOT_HELD, INCONCLUSIVE, NOT_TESTABLE, NOT_RUN, HELD)  # a two-part claim takes its first found

COMMON = [
    "Seeds. Each recipe (a row of imagenet.md) is judged over all its seeds, the latest finished run of each; a "
    "recipe's figure is the mean over its seeds. A seed without a finite evaluation has max top-1 0%.",
    "Noise band. A difference d of two recipes' seed means counts only beyond band = 2 * sqrt(sA^2/nA + sB^2/nB), "
    "with sA, sB the sample standard deviations (ddof = 1) over the nA, nB seeds of each recipe (two standard errors "
    f"of the difference); a seed mean against a fixed number (a threshold, the paper's {TARGET_TEXT}) has band = "
    "2 * s / "
    "sqrt(n). Each recipe's noise is its own seeds': no pooling across recipes, whose learning rates, and noise with "
    "them, differ. A comparison that needs a recipe with fewer than 3 seeds is `inconclusive` (\"fewer than 3 "
    "seeds\"): two seeds do not estimate a standard deviation.",
    "Verdicts. `held` when the compared quantity, band included, lies wholly on the claimed side; `not held` when it "
    "lies wholly on the other side; `inconclusive` when the band straddles the threshold (|d| <= band); `not testable "
    "at this scale` when the runs cannot exercise the claim (criterion in the claim's rule); `not run` when a needed "
    "run is missing. A claim of two parts is not held if a part is, else inconclusive if a part is, else not testable "
    "if a part is, else not run if a part is, else held. Figures a verdict turns on are printed with two decimals.",
    f"Target T. At profile `paper` the paper's {TARGET_TEXT}. Elsewhere Inception's maximum accuracy as the paper "
    "defines it, "
    "estimated over seeds: the mean of Inception's seeds' max single-crop top-1 (imagenet.md shows its lowest seed's, "
    "which v1 used).",
    "Steps to T. A seed's step is its first evaluation at or above T; an Inception seed's, away from profile `paper`, "
    "is its first evaluation of its own max (Inception reaches its maximum accuracy there); at `paper` an Inception "
    f"seed that never reaches {TARGET_TEXT} counts from its last evaluation on (a lower bound). Evaluations come "
    "every "
    "`eval_every` steps, so the true crossing lies after the evaluation before that step and at or before it: an "
    "interval (lo, hi]. Steps are paper-equivalent (step / compression) where every compared run records "
    "`compression`.",
    "Ratio of steps A / B: the ratio of the recipes' geometric means over seeds, i.e. a difference of seed means of "
    "log steps. The evaluations bound it to [exp(mean log lo_A - mean log hi_B), exp(mean log hi_A - mean log lo_B)]; "
    "the seed band, 2 * sqrt(sA^2/nA + sB^2/nB) with s the sample std of each recipe's log evaluated steps, widens "
    "each end (lower * exp(-band), upper * exp(band)). A ratio claim is held or not held only if the whole widened "
    "interval lies on one side of its threshold, else inconclusive.",
    "Reaching T. Steps compare only where every seed of the recipe reaches T. Where one does not, the recipe does not "
    "reach T if its seed-mean max is below T by more than the band (against Inception's seeds; 2 * s / sqrt(n) "
    f"against the fixed {TARGET_TEXT}), and whether it reaches T is inconclusive otherwise.",
]
RULES = {
    1: "Ratio Inception / BN-Baseline of steps to T. Held if the widened interval lies above 1x; not held if it lies "
       "at or below 1x, or if BN-Baseline does not reach T; inconclusive otherwise, also when whether BN-Baseline "
       "reaches T is.",
    2: f"Speed-up = Inception / BN-x5 of steps to T. Held if the widened interval lies at or above "
       f"{HALF_PAPER_SPEEDUP:g}x (half the paper's {SPEEDUP_TEXT}); not held if it lies below "
       f"{HALF_PAPER_SPEEDUP:g}x, or if BN-x5 does not reach T; inconclusive otherwise, also when "
       "whether BN-x5 reaches T is.",
    3: f"Two parts. (a) Starts slower, as the paper shows it (Fig. 3's steps to {TARGET_TEXT}): ratio BN-x30 / "
       "BN-x5 of steps "
       "to T; held if the widened interval lies above 1x, not held if at or below 1x; held if BN-x30 does not reach T "
       "while every BN-x5 seed does, not held the other way round; not testable at this scale if neither reaches T; "
       "inconclusive when whether one reaches T is. v1's other test, a lower top-1 at the first evaluation, is "
       "dropped: it is not the paper's evidence, and a single early evaluation rests on a few hundred steps of one "
       "seed. (b) Ends higher: d = BN-x30's seed-mean max - BN-x5's; held "
       "if d > band, not held if d < -band, inconclusive if |d| <= band.",
    4: "Needs 3 seeds of `inception-x5`. Held if every seed diverged (manifest status diverged), not held if none "
       "did, inconclusive if some did.",
    5: "Chance c = 1 / the number of classes (the manifest's `classes`). Inception-Sigmoid: held if its seed-mean max "
       "+ band <= 2c, not held if its seed-mean max - band > 2c. BN-x5-Sigmoid: held if its seed-mean max - band >= "
       "5c, not held if its seed-mean max + band < 5c. Band = 2 * s / sqrt(n), against a fixed threshold; "
       "inconclusive otherwise; the two parts combine as for a two-part claim; not run if no manifest records "
       "`classes`.",
    6: "Not testable at this scale if BN-x5's budget is under 3 epochs of its data (steps x the manifest's "
       "`global_batch` / its `train_examples`; inconclusive if these are not recorded): change 6 acts only when "
       "examples come back, keeping those that shared a mini-batch from sharing one again, and under 3 epochs an "
       f"example comes back at most twice (the paper's BN-x5 took {_BN_X5_EPOCHS_TEXT} to reach {TARGET_TEXT}). "
       f"Else d = BN-x5's seed-mean max - that of BN-x5 with `--set {' '.join(SHARDS.overrides)}` (shards only); "
       "held if "
       "d > band, not held if d < -band, inconclusive if |d| <= band.",
    7: "Paired exact McNemar tests on the same images: every image the latest ensemble run at this profile evaluated "
       "(the whole validation set unless its `val_limit` took a subset, which the figure then says), top-1 "
       "correctness from its cached probabilities. For condition X against Y, b = images X gets right and Y wrong, c "
       "the reverse; p = min(1, 2 * sum_{k <= min(b, c)} C(b+c, k) 0.5^(b+c)) (two-sided); alpha = 0.05. "
       "(a) Multicrop, each of the m members at 144 against 1 crop: held if every member has p < 0.05 and b > c (each "
       "must pass, so together still alpha = 0.05); not held if a member has p < 0.05 / m and b < c (Bonferroni over "
       "the m members); inconclusive otherwise. (b) The ensemble at 144 crops against its best member at 144 crops "
       "(lowest top-1 error, the first on a tie): held if p < 0.05 and b > c, not held if p < 0.05 and b < c, "
       "inconclusive otherwise. Not run without an ensemble of two or more members evaluated at 1 and 144 crops.",
}
CHANGES = [
    "Noise: v1's seed spread, the range of two seeds of two recipes applied to claims 3(b) and 6 only, becomes a "
    "band for every comparison from the compared recipes' own seeds (at least 3): a range of two values is a poor "
    "estimate of noise, and v1's other claims had none.",
    "All seeds count: v1 judged the lowest seed's run, so a verdict could rest on one run (3(b) on one BN-x30 run) "
    "and flip with another seed (3(a) with BN-x5's second seed).",
    "Steps to target are intervals (evaluations are every `eval_every` steps) over seeds, and a recipe that misses "
    "the target by less than the noise is inconclusive rather than `never` (v1's claim 2: BN-x5 missed it by 0.02 "
    "points).",
    "Claim 7 by paired McNemar tests on the images rather than by comparing error rates (v1's verdict was decided by "
    "a tie on 1,000 images).",
    "`not testable at this scale` for runs that cannot exercise a claim (claim 6 under 3 epochs of data).",
]


@dataclass
class Target:
    """v2's target T, with what its noise band needs."""

    level: float
    maxes: np.ndarray | None  # Inception's seeds' max, whose mean T is; None for the paper's fixed 72.2%
    text: str


@dataclass
class Steps:
    """One recipe's steps to T (to L in the changes study), per seed: the interval (lo, hi] its crossing lies in,
    and the step counted."""

    lo: np.ndarray  # comparable units (paper-equivalent where recorded)
    hi: np.ndarray  # inf: never reached (an Inception seed at profile paper)
    at: np.ndarray  # the evaluated step the seed counts at: hi, or its last evaluation where it never reaches T


def _pct2(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pts2(d: float, sign: bool = True) -> str:
    return f"{100 * d:{'+' if sign else ''}.2f} points"


def _x(r: float) -> str:
    return "∞" if math.isinf(r) else f"{r:.2f}x"


def _p(p: float) -> str:
    return f"p {p:.3g}"


def seeds(row: Run) -> list[Run]:
    """The row's run and its other seeds' (the latest finished run of each seed), by seed."""
    return row.seeds


def band(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """2 * sqrt(sA^2/nA + sB^2/nB) (ddof = 1): two standard errors of a difference of seed means; ``b`` None gives
    2 * s / sqrt(n), one seed mean against a fixed number."""
    with np.errstate(invalid="ignore"):
        return 2 * math.sqrt(sum(np.var(x, ddof=1) / len(x) for x in (a, b) if x is not None))


def _per_seed(row: Run, values: np.ndarray) -> str:
    """Accuracies per seed and their mean, as v2 prints them."""
    runs = seeds(row)
    mean = f", mean {_pct2(values.mean())}" if len(runs) > 1 else ""
    which = "/".join(str(r.seed) for r in runs)
    return f"{'/'.join(_pct2(v) for v in values)} (seed{'s' * (len(runs) > 1)} {which}{mean})"


def _few_seeds(rows: dict[str, Run], *keys: str) -> str | None:
    """The reason "fewer than 3 seeds" where a needed recipe has fewer, else None."""
    short = [f"{rows[k].label} has {len(seeds(rows[k]))}" for k in keys if len(seeds(rows[k])) < MIN_SEEDS]
    return f"fewer than {MIN_SEEDS} seeds: {', '.join(short)}" if short else None


def combine(*verdicts: str) -> str:
    """A claim of several parts: not held, inconclusive, not testable, not run, held, the first one present."""
    return next(v for v in COMBINE_ORDER if v in verdicts)


def target(profile: str, rows: dict[str, Run]) -> Target | None:
    """T (``selection.target_for``, which imagenet.md and Fig. 2 show too): the paper's 72.2% at profile paper, else the
    mean of Inception's seeds' max (None without Inception)."""
    level = target_for(profile, rows)
    if level is None:
        return None
    if profile == "paper":
        return Target(level, None, f"{_pct2(level)}, the paper's (a fixed number: no noise)")
    values = seed_maxes(rows["inception"])
    which = "/".join(str(r.seed) for r in seeds(rows["inception"]))
    return Target(level, values, f"{_pct2(level)}, the mean of Inception's max top-1 over its "
                                 f"seeds: {'/'.join(_pct2(v) for v in values)} (seeds {which})")


def _seed_steps(row: Run, target: Target | None, in_paper_steps: bool) -> Steps | None:
    """Per seed steps to T (``target`` None: each seed's own max, Inception away from profile paper); None if a seed
    never reaches it, unless T is the paper's fixed 72.2% and ``row`` is Inception (then a lower bound)."""
    lo, hi, at = [], [], []
    for run in seeds(row):
        level = (run.max_top1 if run.max_top1 is not None else math.inf) if target is None else target.level
        found = crossing(run, level)
        if found is None:
            if target is None or target.maxes is not None or row.recipe != "inception" or not len(run.curve):
                return None
            last = int(run.curve.step.iloc[-1])
            found = (last, None)
        f = 1 / run.compression if in_paper_steps else 1.0
        lo.append(found[0] * f)
        hi.append(math.inf if found[1] is None else found[1] * f)
        at.append((found[1] if found[1] is not None else found[0]) * f)
    return Steps(np.array(lo, float), np.array(hi, float), np.array(at, float))


@dataclass
class Ratio:
    """A ratio num / den of steps over seeds, as these rules take it: the ratio of geometric means (``point``, in
    log steps), the bounds the evaluations' intervals allow (``low``, ``high``, log steps), the seed band of log
    steps, and the interval it widens them to (``lower``, ``upper``, as ratios). The changes study takes its
    speed-ups the same way."""

    point: float
    low: float
    high: float
    band: float
    lower: float
    upper: float


def ratio_of(num: Steps, den: Steps) -> Ratio:
    """num / den: the difference of mean log steps, its bounds from each seed's interval (num's earliest over den's
    latest, and the reverse), widened by two standard errors of the difference (``band``)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        point = float(np.log(num.at).mean() - np.log(den.at).mean())
        low = float(np.log(num.lo).mean() - np.log(den.hi).mean())
        high = float(np.log(num.hi).mean() - np.log(den.lo).mean())
        w = band(np.log(num.at), np.log(den.at))
        return Ratio(point, low, high, w, float(np.exp(low - w)), float(np.exp(high + w)))


def _ratio(num: Steps, den: Steps, threshold: float, at_least: bool) -> tuple[str, str]:
    """num / den (``ratio_of``) and the verdict against ``threshold`` (reached ``at_least``, or exceeded)."""
    r = ratio_of(num, den)
    if r.lower >= threshold if at_least else r.lower > threshold:
        verdict = HELD
    elif r.upper < threshold if at_least else r.upper <= threshold:
        verdict = NOT_HELD
    else:
        verdict = INCONCLUSIVE
    return verdict, (f"{_x(float(np.exp(r.point)))} (evaluations: {_x(float(np.exp(r.low)))} to "
                     f"{_x(float(np.exp(r.high)))}; with the seed band ±{r.band:.2f} in log steps: {_x(r.lower)} to "
                     f"{_x(r.upper)}; threshold {'at least ' if at_least else 'above '}{threshold:g}x)")


def _reach(row: Run, target: Target, name: str) -> tuple[str, str]:
    """"all" if every seed reaches T; else "below" (seed-mean max under T by more than the band) or "unclear"."""
    values = seed_maxes(row)
    reached = sum(crossing(r, target.level) is not None for r in seeds(row))
    if reached == len(values):
        return "all", ""
    d, w = values.mean() - target.level, band(values, target.maxes)
    return ("below" if d < -w else "unclear",
            f"{name}: {reached} of {len(values)} seeds reach T {_pct2(target.level)}; max {_per_seed(row, values)}, "
            f"d = {_pts2(d)} vs band ±{_pts2(w, sign=False)}")


def _steps_shown(rows: dict[str, Run], target: Target, *keys: str) -> str:
    """Each row's evaluated step of reaching T per seed (Inception's, away from profile paper, of its own max)."""
    parts = []
    for key in keys:
        runs, own = seeds(rows[key]), key == "inception" and target.maxes is not None
        found = [crossing(r, (r.max_top1 or math.inf) if own else target.level) for r in runs]
        parts.append(f"{rows[key].label} {'/'.join('never' if f is None else f'{f[1]:,}' for f in found)} (seed"
                     f"{'s' * (len(runs) > 1)} {'/'.join(str(r.seed) for r in runs)})")
    return f"steps to T {_pct2(target.level)}: " + " vs ".join(parts)


def _step_ratio(rows: dict[str, Run], target: Target, num: str, den: str, threshold: float,
                at_least: bool) -> tuple[str, str]:
    """Verdict and text of a ratio claim on steps to T, row ``num`` over row ``den``, both reaching T."""
    runs = seeds(rows[num]) + seeds(rows[den])
    in_paper_steps = all(r.compression is not None for r in runs)
    own = target if target.maxes is None else None  # Inception counts to its own max away from profile paper
    a = _seed_steps(rows[num], own if num == "inception" else target, in_paper_steps)
    b = _seed_steps(rows[den], own if den == "inception" else target, in_paper_steps)
    if a is None or b is None:
        return INCONCLUSIVE, "a seed has no finite evaluation"
    verdict, ratio = _ratio(a, b, threshold, at_least)
    return verdict, f"{_steps_shown(rows, target, num, den)}; {rows[num].label} / {rows[den].label} = {ratio}"


def _faster_than_inception(rows: dict[str, Run], target: Target | None, key: str, threshold: float,
                           at_least: bool) -> tuple[str, str]:
    """Claims 1 and 2: Inception's steps to T over ``key``'s, against ``threshold``."""
    if missing := missing_runs(rows, "inception", key):
        return NOT_RUN, missing.ours
    if target is None:
        return NOT_RUN, "no target"
    if few := _few_seeds(rows, "inception", key):
        return INCONCLUSIVE, f"{few}; {_steps_shown(rows, target, 'inception', key)}"
    state, why = _reach(rows[key], target, rows[key].label)
    if state != "all":
        return (NOT_HELD if state == "below" else INCONCLUSIVE), why
    return _step_ratio(rows, target, "inception", key, threshold, at_least)


def claim_1(rows: dict[str, Run], target: Target | None) -> Verdict:
    verdict, text = _faster_than_inception(rows, target, "bn-baseline", 1.0, at_least=False)
    return Verdict(1, text, verdict)


def claim_2(rows: dict[str, Run], target: Target | None) -> Verdict:
    verdict, text = _faster_than_inception(rows, target, "bn-x5", HALF_PAPER_SPEEDUP, at_least=True)
    return Verdict(2, text, verdict)


def _max_difference(rows: dict[str, Run], a: str, b: str) -> tuple[str, str]:
    """d = row a's seed-mean max - row b's, against the band: held above it, not held below -band."""
    va, vb = seed_maxes(rows[a]), seed_maxes(rows[b])
    d = float(va.mean() - vb.mean())
    said = f"max {rows[a].label} {_per_seed(rows[a], va)} vs {rows[b].label} {_per_seed(rows[b], vb)}: d = {_pts2(d)}"
    if few := _few_seeds(rows, a, b):
        return INCONCLUSIVE, f"{few}; {said}"
    w = band(va, vb)
    return HELD if d > w else NOT_HELD if d < -w else INCONCLUSIVE, f"{said}, band ±{_pts2(w, sign=False)}"


def _starts_slower(rows: dict[str, Run], target: Target | None) -> tuple[str, str]:
    """Claim 3(a): BN-x30's steps to T over BN-x5's."""
    if target is None:
        return NOT_RUN, "no target (no `inception` run)"
    if few := _few_seeds(rows, "bn-x30", "bn-x5", *(["inception"] if target.maxes is not None else [])):
        return INCONCLUSIVE, f"{few}; {_steps_shown(rows, target, 'bn-x30', 'bn-x5')}"
    (s30, why30), (s5, why5) = _reach(rows["bn-x30"], target, "BN-x30"), _reach(rows["bn-x5"], target, "BN-x5")
    why = "; ".join(w for w in (why30, why5) if w)
    if "unclear" in (s30, s5):
        return INCONCLUSIVE, why
    if s30 == s5 == "below":
        return NOT_TESTABLE, f"neither reaches T, so their steps to it cannot be compared: {why}"
    if "below" in (s30, s5):
        return (HELD if s30 == "below" else NOT_HELD), why
    return _step_ratio(rows, target, "bn-x30", "bn-x5", 1.0, at_least=False)


def claim_3(rows: dict[str, Run], target: Target | None) -> Verdict:
    if missing := missing_runs(rows, "bn-x30", "bn-x5"):
        return Verdict(3, missing.ours, NOT_RUN)
    start, starts = _starts_slower(rows, target)
    end, ends = _max_difference(rows, "bn-x30", "bn-x5")
    return Verdict(3, f"(a) starts slower: {start} ({starts}); (b) ends higher: {end} ({ends})", combine(start, end))


def claim_4(rows: dict[str, Run]) -> Verdict:
    if missing := missing_runs(rows, "inception-x5"):
        return Verdict(4, missing.ours, NOT_RUN)
    runs = seeds(rows["inception-x5"])
    found = ", ".join(f"seed {r.seed} {r.manifest.get('status')}" + ("" if r.diverged_at is None else
                                                                      f" at step {r.diverged_at:,}") for r in runs)
    if few := _few_seeds(rows, "inception-x5"):
        return Verdict(4, f"{few} ({found})", INCONCLUSIVE)
    diverged = sum(r.manifest.get("status") == DIVERGED for r in runs)
    verdict = HELD if diverged == len(runs) else NOT_HELD if diverged == 0 else INCONCLUSIVE
    return Verdict(4, f"{diverged} of {len(runs)} seeds diverged: {found}", verdict)


def _against(values: np.ndarray, limit: float, above: bool) -> str:
    """A seed mean against a fixed ``limit`` with band 2 * s / sqrt(n): at or above it (``above``), or at or below."""
    m, w = float(values.mean()), band(values)
    if above:
        return HELD if m - w >= limit else NOT_HELD if m + w < limit else INCONCLUSIVE
    return HELD if m + w <= limit else NOT_HELD if m - w > limit else INCONCLUSIVE


def claim_5(rows: dict[str, Run]) -> Verdict:
    if missing := missing_runs(rows, "inception-sigmoid", "bn-x5-sigmoid"):
        return Verdict(5, missing.ours, NOT_RUN)
    isig, bsig = rows["inception-sigmoid"], rows["bn-x5-sigmoid"]
    classes = next((r.manifest["classes"] for r in seeds(isig) + seeds(bsig) if r.manifest.get("classes")), None)
    if not classes:
        return Verdict(5, "the manifests record no `classes`, so chance is unknown", NOT_RUN)
    chance = 1 / len(classes)
    vi, vb = seed_maxes(isig), seed_maxes(bsig)
    text = (f"chance {_pct2(chance)} ({len(classes)} classes); Inception-Sigmoid max {_per_seed(isig, vi)}, limit "
            f"{_pct2(2 * chance)}; BN-x5-Sigmoid max {_per_seed(bsig, vb)}, at least {_pct2(5 * chance)}")
    if few := _few_seeds(rows, "inception-sigmoid", "bn-x5-sigmoid"):
        return Verdict(5, f"{few}; {text}", INCONCLUSIVE)
    text += f"; bands ±{_pts2(band(vi), sign=False)} and ±{_pts2(band(vb), sign=False)}"
    return Verdict(5, text, combine(_against(vi, 2 * chance, above=False), _against(vb, 5 * chance, above=True)))


def epochs(run: Run) -> float | None:
    """The run's budget in epochs of its data: steps x global batch / training examples (None if not recorded)."""
    steps = run.summary.get("steps") or (int(run.metrics.step.max()) if len(run.metrics) else None)
    batch, examples = run.manifest.get("global_batch"), run.manifest.get("train_examples")
    return steps * batch / examples if steps and batch and examples else None


def claim_6(rows: dict[str, Run]) -> Verdict:
    if missing := missing_runs(rows, "bn-x5", SHARDS_ONLY):
        return Verdict(6, missing.ours, NOT_RUN)
    x5 = rows["bn-x5"]
    budget = epochs(x5)
    if budget is None:
        return Verdict(6, "BN-x5's budget in epochs is not recorded (`global_batch`, `train_examples`)", INCONCLUSIVE)
    said = (f"BN-x5's budget {x5.summary.get('steps') or int(x5.metrics.step.max()):,} steps x "
            f"{x5.manifest['global_batch']} / {x5.manifest['train_examples']:,} examples = {budget:.2f} epochs")
    if budget < MIN_EPOCHS_CHANGE_6:
        return Verdict(6, f"{said}, under {MIN_EPOCHS_CHANGE_6:g}: mini-batch mates hardly meet again "
                          f"(paper: ~{PAPER_BN_X5_EPOCHS:.0f} epochs)", NOT_TESTABLE)
    verdict, text = _max_difference(rows, "bn-x5", SHARDS_ONLY)
    return Verdict(6, f"{said}; {text}", verdict)


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value on the discordant pairs: p = min(1, 2 * sum_{k<=min(b,c)} C(b+c,k) / 2^(b+c)),
    in exact arithmetic (0.5^n underflows a float past n = 1,074)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def paired(x: pd.Series, y: pd.Series) -> tuple[int, int, int, float]:
    """McNemar of per-image correctness x against y on their common images: b (x right, y wrong), c, images, p."""
    x, y = x.align(y, join="inner")
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    return b, c, len(x), mcnemar(b, c)


def _multicrop(run: ensemble.EnsembleRun, correct: dict[tuple[str, int], pd.Series]) -> tuple[str, str]:
    """Claim 7(a): each member at 144 against 1 crop."""
    m, passed, worse, parts = len(run.members), 0, False, []
    for member in run.members:
        many, one = correct[(member, 144)], correct[(member, 1)]
        b, c, _, p = paired(many, one)
        passed += p < ALPHA and b > c
        worse |= p < ALPHA / m and b < c
        parts.append(f"{member} {_pct2(1 - one.mean())} -> {_pct2(1 - many.mean())} (b {b}, c {c}, {_p(p)})")
    verdict = HELD if passed == m else NOT_HELD if worse else INCONCLUSIVE
    return verdict, "top-1 error at 1 -> 144 crops, b right only at 144, c only at 1: " + "; ".join(parts)


def _ensemble_gain(run: ensemble.EnsembleRun, correct: dict[tuple[str, int], pd.Series]) -> tuple[str, str]:
    """Claim 7(b): the ensemble at 144 crops against its best member at 144 crops."""
    best = min(run.members, key=lambda m: 1 - correct[(m, 144)].mean())  # min keeps the first on a tie
    together = ensemble.top1_correct(run, run.members, 144)
    b, c, _, p = paired(together, correct[(best, 144)])
    verdict = HELD if p < ALPHA and b > c else NOT_HELD if p < ALPHA and b < c else INCONCLUSIVE
    return verdict, (f"top-1 error at 144 crops, b right only by the ensemble, c only by the member: ensemble of "
                     f"{len(run.members)} {_pct2(1 - together.mean())} vs best "
                     f"member {best} {_pct2(1 - correct[(best, 144)].mean())} (b {b}, c {c}, {_p(p)})")


def claim_7(results: Path, profile: str) -> Verdict:
    run = ensemble_for_claim_7(results, profile)
    if isinstance(run, Verdict):
        return run
    try:
        correct = {(m, c): ensemble.top1_correct(run, [m], c) for m in run.members for c in (1, 144)}
        (multi, multis), (gain, gains) = _multicrop(run, correct), _ensemble_gain(run, correct)
    except UserError as err:
        return Verdict(7, f"`{run.rel}`: {err}", NOT_RUN)
    images = len(correct[(run.members[0], 1)])
    subset = f", a subset (`val_limit` {run.manifest['val_limit']:,})" if run.subset_note() else ""
    return Verdict(7, f"`{run.rel}`, {images:,} validation images{subset}, alpha {ALPHA:g}. (a) multicrop: {multi} "
                      f"({multis}); (b) ensemble: {gain} ({gains})", combine(multi, gain))


def judge(profile: str, rows: dict[str, Run], results: Path) -> tuple[list[Verdict], str]:
    """Every claim's v2 verdict at ``profile``, and T's sentence."""
    t = target(profile, rows)
    verdicts = [claim_1(rows, t), claim_2(rows, t), claim_3(rows, t), claim_4(rows), claim_5(rows), claim_6(rows),
                claim_7(results, profile)]
    return verdicts, (t.text if t else "none: no finished `inception` run at this profile")
