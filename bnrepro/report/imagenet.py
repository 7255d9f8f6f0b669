"""Fig. 2 (top-1 vs steps) and the Fig. 3 step-count table, from the files of finished ``bnrepro imagenet`` runs.

A run is finished when its manifest says ``complete`` or ``diverged``: a diverged run is a result (the paper's
Inception at 5x the learning rate is one), a running or interrupted one is not. Within each profile, each recipe with
each set of ``--set`` overrides (step budgets aside) is its own row: the latest finished run of its lowest seed (seed 0
as a rule); the latest run of each other seed is kept only for the "other seeds' max" column and the seed spread of
the claims (``bnrepro.report.claims``). Profiles are never mixed, since their data and step budgets differ. Where the
manifests carry ``compression`` (this profile's steps per paper step), steps are also given as paper-equivalent steps
(step / compression), the paper's unit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

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
    order = PAPER.profile_order  # a profile it does not name comes after, by name
    profiles = sorted(rows, key=lambda p: (order.index(p) if p in order else len(order), p))
    return {p: dict(sorted(rows[p].items(), key=lambda kv: _row_rank(kv[1]))) for p in profiles}


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


def target_for(profile: str, runs: dict[str, Run]) -> float | None:
    """The paper's 72.2% at profile ``paper``; elsewhere, as the paper defines it, the best top-1 Inception
    reaches in that profile (None without an Inception run)."""
    if profile == "paper":
        return PAPER.imagenet.target
    return runs["inception"].max_top1 if "inception" in runs else None


def steps_to(run: Run, target: float) -> int | None:
    """The first evaluated step whose top-1 is at least ``target`` (before any divergence); None if none is."""
    reached = run.curve[run.curve.top1 >= target]
    return int(reached.step.iloc[0]) if len(reached) else None


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


def other_seeds_max(run: Run) -> str:
    """The max top-1 of the row's other seeds, each with its seed; a dash where there are none."""
    return ", ".join(f"{_percent(r.max_top1)} (seed {r.seed})" for r in run.others) or "—"


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


def fig3_table(runs: dict[str, Run], target: float | None) -> pd.DataFrame:
    """Fig. 3 for one profile: our steps to ``target`` (also in paper-equivalent steps where the manifests carry
    ``compression``), max accuracy, the other seeds' max and the speed-up, beside the paper's."""
    steps = {name: (None if target is None else steps_to(run, target)) for name, run in runs.items()}
    inception = runs.get("inception")
    compressed = any(run.compression is not None for run in runs.values())
    rows = []
    for name, run in runs.items():
        paper = PAPER.fig3(name)  # None for a row with overrides, or a recipe the paper's table leaves out
        paper_steps, paper_max = (paper.steps, paper.max_top1) if paper else (None, None)
        row = {"Model": run.label, "Steps to target": _reached(run, steps[name], target, paper=False)}
        if compressed:
            row["Paper-equivalent steps to target"] = (_reached(run, steps[name], target, paper=True)
                                                       if run.compression is not None else "no compression recorded")
        speedup = "—"
        if inception is not None:
            speedup = _speedup(*comparable([inception, run], [steps["inception"], steps[name]]))
        row.update({
            "Max accuracy": _percent(run.max_top1),
            "Other seeds' max": other_seeds_max(run),
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


def figure_2(profile: str, runs: dict[str, Run], target: float | None, out: Path) -> list[Path]:
    """Fig. 2: single-crop validation top-1 vs training steps (paper-equivalent steps, step / compression, where
    every run's manifest carries ``compression``), one line per row, each its own colour and style (``line_styles``);
    a diverged run's line stops at its last finite evaluation, marked with an x."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    paper = bool(runs) and all(run.compression is not None for run in runs.values())  # x in paper-equivalent steps
    styles = line_styles(runs)
    marked = False
    for key, run in runs.items():
        curve = run.curve
        x = curve.step / run.compression if paper else curve.step
        label = run.label
        if run.diverged_at is not None:
            equivalent = paper_steps_text(paper_equivalent(run, run.diverged_at))
            equivalent = f", {equivalent} paper-equivalent" if paper else ""
            label += f" (diverged at step {run.diverged_at:,}{equivalent})"
        colour, style = styles[key]
        (line,) = ax.plot(x, curve.top1, color=colour, label=label, linewidth=1.5, linestyle=style)
        lagging = run.lagging
        if lagging.any():  # BN evaluated with the moving averages: the point measures their lag (README)
            ax.plot(x[lagging], curve.top1[lagging], linestyle="none", marker="o", markersize=4,
                    markerfacecolor="white", markeredgecolor=colour, markeredgewidth=1)
            marked = True
        if run.diverged_at is not None and len(curve):
            ax.plot(x.iloc[-1], curve.top1.iloc[-1], marker="x", markersize=10, markeredgewidth=2,
                    color=line.get_color())
    if marked:
        ax.plot([], [], linestyle="none", marker="o", markersize=4, markerfacecolor="white", markeredgecolor="0.3",
                label="BN with moving averages, not Alg. 2 (lagging)")
    if target is not None:
        what = "paper's target" if profile == "paper" else "target: Inception's max"
        ax.axhline(target, color="0.5", linestyle=":", linewidth=1, label=f"{what} ({100 * target:.1f}%)")
    batches = sorted({r.manifest["global_batch"] // r.manifest.get("replicas", 1) for r in runs.values()
                      if "global_batch" in r.manifest})  # a step is one mini-batch of the profile's size
    steps = "training steps" + (f" (mini-batches of {'/'.join(map(str, batches))})" if batches else "")
    if paper:
        factors = sorted({round(1 / run.compression) for run in runs.values()})
        steps = f"paper-equivalent steps (step / compression; one step here = {'/'.join(map('{:,}'.format, factors))} "
        steps += "paper steps)"
    ax.set(xlabel=steps, ylabel="validation top-1 (single crop)", ylim=(0, None))
    ax.set_title(f"Fig. 2 reproduced, profile {profile}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))  # plain up to 9,999 steps, then 1e4, 1e6...
    ax.legend(loc="lower right", fontsize=8)
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
    done = ", ".join(f"{n} {state}" for state, n in counts.items())
    earlier = f"; {len(records) - 1} earlier campaign record(s)" if len(records) > 1 else ""
    lines = [f"- Campaign (`bnrepro reproduce`): status {record.get('status')}, the code of commit `{commit}`{dirty}, "
             f"read once before it ran; data: {data_text(record)}; runs: {done}{earlier}"]
    lines += [f"  - **{without_paths(text)}**" for text in record.get("other_commits", [])]
    return lines


def profile_section(profile: str, runs: dict[str, Run], superseded: list[Run], records: list[dict] = ()) -> str:
    """One profile's Fig. 3 table, headed by its data, target, its latest campaign (``records``) and the run folders
    and commits it comes from."""
    target = target_for(profile, runs)
    datasets = sorted({data_text(r.manifest) for r in runs.values()})
    if profile == "paper":
        target_text = f"{_percent(PAPER.imagenet.target)}, the paper's (Inception's best single-crop top-1)"
    elif target is None:
        target_text = ("none: no finished `inception` run in this profile, so no steps-to-target "
                       "(the target is Inception's best top-1)")
    else:
        target_text = f"{100 * target:.1f}%, the best top-1 of this profile's `inception` run (as in the paper)"
    lines = [f"## Profile `{profile}`", "",
             f"- Data: {'; '.join(datasets)}" + (" (**the runs used different data**)" if len(datasets) > 1 else ""),
             f"- Target accuracy: {target_text}", *campaign_lines(list(records)),
             "- Runs (per recipe and overrides, the latest finished run of the lowest seed; other seeds below it):"]
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
                         f"max {_percent(other.max_top1)} (in the table's \"other seeds' max\" only)")
    lines += ["", markdown_table(fig3_table(runs, target)), ""]
    notes = [f"{runs[name].label}: {note}." for name, note in PAPER.notes.items() if name in runs]
    if notes:
        lines += ["Not in the paper's table: " + " ".join(notes), ""]
    if superseded:
        lines += ["Older finished runs, not shown: " + ", ".join(f"`{r.rel}` ({r.recipe})" for r in superseded), ""]
    lines += [f"![Fig. 2, profile {profile}]({figure_name(profile)}.png)", ""]
    return "\n".join(lines)


def rounded_speedup() -> str:
    """The sentence saying how the paper's text rounds BN-x5's speed-up of its Fig. 3 (31.0e6 / 2.1e6 = 14.8x)."""
    inception, x5 = PAPER.fig3("inception").steps, PAPER.fig3("bn-x5").steps
    return (f"Its text rounds BN-x5's {paper_steps_text(inception)} / {paper_steps_text(x5)} = "
            f"{_speedup(inception, x5)} down to \"{PAPER.imagenet.speedup_in_text:g} times fewer steps\".")


def markdown(by_profile: dict[str, dict[str, Run]], runs: list[Run], records: dict[str, list[dict]] | None = None
             ) -> str:
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
             "of its lowest seed; the other seeds' runs appear only in \"Other seeds' max\" and in the seed spread "
             "of claims.md. Speed-ups are over paper-equivalent steps where both runs carry `compression`. "
             "Data are named by data set, counts and digest (`data_identity` in a run's manifest: the idx files' "
             "bytes, or the paths and sizes of the files of shards and class folders), never by the folder they lay "
             "in, which stays in each run's `manifest.json`; commits marked `+dirty` ran with uncommitted changes.", ""]
    for profile, chosen in by_profile.items():
        superseded = [r for r in runs if r.profile == profile and r.path not in shown]
        lines.append(profile_section(profile, chosen, superseded, (records or {}).get(profile, [])))
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
    atomic_write(out / "imagenet.md", markdown(by_profile, runs, campaigns(Path(results))))
    return [*written, out / "imagenet.md"]
