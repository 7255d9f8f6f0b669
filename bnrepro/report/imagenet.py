"""Fig. 2 (top-1 vs steps) and the Fig. 3 step-count table, from the files of finished ``bnrepro imagenet`` runs.

A run is finished when its manifest says ``complete`` or ``diverged``: a diverged run is a result (the paper's
Inception at 5x the learning rate is one), a running or interrupted one is not. Within each profile the latest
finished run of each recipe is shown; profiles are never mixed, since their data and step budgets differ.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bnrepro.report import save_figure  # noqa: E402
from bnrepro.runs import atomic_write, check_writable, runs_of  # noqa: E402

FINISHED = ("complete", "diverged")
PAPER_TARGET = 0.722  # Inception's best single-crop top-1: the paper's Fig. 3 counts steps to reach it
PROFILE_ORDER = ("paper", "proxy", "smoke")

# The paper's Fig. 3 table (shared/paper/README.md, section 3): steps to 72.2% (None: never) and max accuracy.
PAPER_FIG3: dict[str, tuple[float | None, float]] = {
    "inception": (31.0e6, 0.722),
    "bn-baseline": (13.3e6, 0.727),
    "bn-x5": (2.1e6, 0.730),
    "bn-x30": (2.7e6, 0.748),
    "bn-x5-sigmoid": (None, 0.698),
}
# What the paper says, outside its table, of the recipes the table leaves out (same section).
PAPER_NOTES = {
    "inception-sigmoid": "the paper's Inception with sigmoid never rose above chance (1/1000)",
    "inception-x5": "the paper's Inception at 0.0075 reached \"machine infinity\" (diverged)",
}

# Fig. 2's order, then the recipes it leaves out; each recipe keeps its colour in every figure.
RECIPE_ORDER = ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid", "inception-sigmoid", "inception-x5")
COLOURS = {"inception": "black", "bn-baseline": "tab:blue", "bn-x5": "tab:orange", "bn-x30": "tab:red",
           "bn-x5-sigmoid": "tab:green", "inception-sigmoid": "tab:purple", "inception-x5": "tab:brown"}
SPARE_COLOURS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray")


@dataclass
class Run:
    """One finished run folder, read once."""

    path: Path
    rel: str  # the folder relative to the results folder, as the report names it
    manifest: dict
    summary: dict
    metrics: pd.DataFrame

    @property
    def recipe(self) -> str:
        name = self.summary.get("recipe") or self.manifest.get("recipe") or self.path.name
        return name.removeprefix("imagenet/")

    @property
    def label(self) -> str:
        return self.summary.get("label") or self.manifest.get("label") or self.recipe

    @property
    def profile(self) -> str:
        return self.summary.get("profile") or self.manifest.get("profile") or "unknown"

    @property
    def diverged_at(self) -> int | None:
        """The step the run diverged at; a manifest that says diverged without a step gives the first NaN loss."""
        if self.summary.get("diverged_at") is not None:
            return int(self.summary["diverged_at"])
        if self.manifest.get("status") != "diverged":
            return None
        bad = self.metrics[~_finite(self.metrics.train_loss) | ~_finite(self.metrics.top1)]
        return int(bad.step.iloc[0]) if len(bad) else int(self.metrics.step.max())

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


def _finite(column: pd.Series) -> pd.Series:
    """True where a value is a finite number (a diverged run writes NaN, inf or nothing)."""
    return pd.Series(np.isfinite(pd.to_numeric(column, errors="coerce").astype(float)), index=column.index)


def finished_runs(results: Path) -> list[Run]:
    """ImageNet run folders whose manifest says complete or diverged, oldest first (by start time, then name)."""
    runs = []
    for folder, manifest in runs_of(results, "imagenet", FINISHED):
        summary_path = folder / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        runs.append(Run(folder, folder.relative_to(results).as_posix(), manifest, summary,
                        pd.read_csv(folder / "metrics.csv")))
    return runs


def latest_per_recipe(runs: list[Run]) -> dict[str, dict[str, Run]]:
    """profile -> recipe -> its latest finished run, profiles and recipes in the paper's order."""
    chosen: dict[str, dict[str, Run]] = {}
    for run in runs:  # oldest first, so a later run replaces an earlier one
        chosen.setdefault(run.profile, {})[run.recipe] = run
    profiles = sorted(chosen, key=lambda p: (PROFILE_ORDER.index(p) if p in PROFILE_ORDER else len(PROFILE_ORDER), p))
    return {p: dict(sorted(chosen[p].items(), key=lambda kv: _recipe_rank(kv[0]))) for p in profiles}


def _recipe_rank(recipe: str) -> tuple[int, str]:
    return (RECIPE_ORDER.index(recipe) if recipe in RECIPE_ORDER else len(RECIPE_ORDER), recipe)


def colour(recipe: str) -> str:
    """The same colour for a recipe in every figure, also for recipes this module does not know."""
    return COLOURS.get(recipe) or SPARE_COLOURS[zlib.crc32(recipe.encode()) % len(SPARE_COLOURS)]


def target_for(profile: str, runs: dict[str, Run]) -> float | None:
    """The paper's 72.2% at profile ``paper``; elsewhere, as the paper defines it, the best top-1 Inception
    reaches in that profile (None without an Inception run)."""
    if profile == "paper":
        return PAPER_TARGET
    return runs["inception"].max_top1 if "inception" in runs else None


def steps_to(run: Run, target: float) -> int | None:
    """The first evaluated step whose top-1 is at least ``target`` (before any divergence); None if none is."""
    reached = run.curve[run.curve.top1 >= target]
    return int(reached.step.iloc[0]) if len(reached) else None


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _speedup(reference: float | None, steps: float | None) -> str:
    return "—" if not reference or not steps else f"{reference / steps:,.1f}x"


def fig3_table(runs: dict[str, Run], target: float | None) -> pd.DataFrame:
    """Fig. 3 for one profile: our steps to ``target``, max accuracy and speed-up beside the paper's."""
    steps = {name: (None if target is None else steps_to(run, target)) for name, run in runs.items()}
    reference = steps.get("inception")
    paper_reference = PAPER_FIG3["inception"][0]
    rows = []
    for name, run in runs.items():
        diverged = "" if run.diverged_at is None else f"diverged at {run.diverged_at:,}"
        if target is None:
            reached = "—"
        elif steps[name] is not None:
            reached = f"{steps[name]:,}" + (f" ({diverged})" if diverged else "")
        else:
            reached = diverged or "never"
        paper_steps, paper_max = PAPER_FIG3.get(name, (None, None))
        rows.append({
            "Model": run.label,
            "Steps to target": reached,
            "Max accuracy": _percent(run.max_top1),
            "Speed-up vs Inception": _speedup(reference, steps[name]),
            "Paper: steps to 72.2%": "—" if paper_steps is None else f"{paper_steps / 1e6:.1f}e6",
            "Paper: max accuracy": _percent(paper_max),
            "Paper: speed-up": _speedup(paper_reference, paper_steps),
        })
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


def figure_2(profile: str, runs: dict[str, Run], target: float | None, out: Path) -> list[Path]:
    """Fig. 2: single-crop validation top-1 vs training steps, one line per recipe; a diverged run's line
    stops at its last finite evaluation, marked with an x."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name, run in runs.items():
        curve = run.curve
        label = run.label
        if run.diverged_at is not None:
            label += f" (diverged at step {run.diverged_at:,})"
        (line,) = ax.plot(curve.step, curve.top1, color=colour(name), label=label, linewidth=1.5)
        if run.diverged_at is not None and len(curve):
            ax.plot(curve.step.iloc[-1], curve.top1.iloc[-1], marker="x", markersize=10, markeredgewidth=2,
                    color=line.get_color())
    if target is not None:
        what = "paper's target" if profile == "paper" else "target: Inception's max"
        ax.axhline(target, color="0.5", linestyle=":", linewidth=1, label=f"{what} ({100 * target:.1f}%)")
    batches = sorted({r.manifest["global_batch"] // r.manifest.get("replicas", 1) for r in runs.values()
                      if "global_batch" in r.manifest})  # a step is one mini-batch of the profile's size
    steps = "training steps" + (f" (mini-batches of {'/'.join(map(str, batches))})" if batches else "")
    ax.set(xlabel=steps, ylabel="validation top-1 (single crop)", ylim=(0, None))
    ax.set_title(f"Fig. 2 reproduced, profile {profile}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))  # plain up to 9,999 steps, then 1e4, 1e6...
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, figure_name(profile))


def profile_section(profile: str, runs: dict[str, Run], superseded: list[Run]) -> str:
    """One profile's Fig. 3 table, headed by its data, target and the run folders and commits it comes from."""
    target = target_for(profile, runs)
    datasets = sorted({str(r.manifest.get("dataset", "not recorded")) for r in runs.values()})
    if profile == "paper":
        target_text = f"{100 * PAPER_TARGET:.1f}%, the paper's (Inception's best single-crop top-1)"
    elif target is None:
        target_text = ("none: no finished `inception` run in this profile, so no steps-to-target "
                       "(the target is Inception's best top-1)")
    else:
        target_text = f"{100 * target:.1f}%, the best top-1 of this profile's `inception` run (as in the paper)"
    lines = [f"## Profile `{profile}`", "",
             f"- Data: {'; '.join(datasets)}" + (" (**the runs used different data**)" if len(datasets) > 1 else ""),
             f"- Target accuracy: {target_text}", "- Runs (latest finished run per recipe):"]
    for name, run in runs.items():
        steps = run.summary.get("steps", int(run.metrics.step.max()))
        replicas = run.manifest.get("replicas", 1)
        batch = run.manifest.get("global_batch", "not recorded")
        lines.append(f"  - {run.label} (`{name}`): `{run.rel}`, status {run.manifest.get('status')}, "
                     f"{steps:,} steps, {replicas} replica{'s' * (replicas != 1)}, global batch {batch}, "
                     f"commit `{str(run.manifest.get('git_commit', 'unknown'))[:12]}`; "
                     + deviations_list(run.summary.get("deviations", run.manifest.get("deviations")), "", indent=4))
    lines += ["", markdown_table(fig3_table(runs, target)), ""]
    notes = [f"{runs[name].label}: {note}." for name, note in PAPER_NOTES.items() if name in runs]
    if notes:
        lines += ["Not in the paper's table: " + " ".join(notes), ""]
    if superseded:
        lines += ["Older finished runs, not shown: " + ", ".join(f"`{r.rel}` ({r.recipe})" for r in superseded), ""]
    lines += [f"![Fig. 2, profile {profile}]({figure_name(profile)}.png)", ""]
    return "\n".join(lines)


def markdown(by_profile: dict[str, dict[str, Run]], runs: list[Run]) -> str:
    shown = {id(r) for chosen in by_profile.values() for r in chosen.values()}
    lines = ["# ImageNet (paper Sec. 4.2, Fig. 2 and Fig. 3)", "",
             "A step is one mini-batch of the profile's batch size, the paper's unit, however many replicas "
             "trained the run. Steps to target count evaluated steps only, so they are upper bounds within one "
             "evaluation interval. Max accuracy is the best single-crop validation top-1 over the run's finite "
             "evaluations. Each evaluation says which BN statistics it used (`statistics` in `metrics.csv`): the "
             "last one, as step 0, Alg. 2's population statistics; those between, BN's moving averages, which "
             "Alg. 2 allows for tracking accuracy. "
             "The paper's columns are its Fig. 3 (shared/paper/README.md, section 3); its step counts are "
             "for the full ImageNet setup, comparable to ours only at profile `paper`. Its text rounds BN-x5's "
             "31.0e6 / 2.1e6 = 14.8x down to \"14 times fewer steps\".", ""]
    for profile, chosen in by_profile.items():
        superseded = [r for r in runs if r.profile == profile and id(r) not in shown]
        lines.append(profile_section(profile, chosen, superseded))
    return "\n".join(lines).rstrip("\n") + "\n"


def build(results: Path, out: Path) -> list[Path]:
    runs = finished_runs(Path(results))
    if not runs:
        return []
    check_writable(out)
    by_profile = latest_per_recipe(runs)
    written = []
    for profile, chosen in by_profile.items():
        written += figure_2(profile, chosen, target_for(profile, chosen), out)
    atomic_write(out / "imagenet.md", markdown(by_profile, runs))
    return [*written, out / "imagenet.md"]
