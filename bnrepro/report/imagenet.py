"""Fig. 2 (top-1 vs steps) and the Fig. 3 step-count table, from the files of finished ``bnrepro imagenet`` runs.

The runs, their rows and the one data set each profile shows are those of ``bnrepro.report.selection``, the selection
claims.md, ensemble.md and changes.md share: per profile, one row per recipe and set of ``--set`` overrides. A row of
several seeds is drawn as their mean with a min-max band (``seed_curve``) and tabled as their mean with its range.
Where the manifests carry ``compression`` (this profile's steps per paper step), steps are also given as
paper-equivalent steps (step / compression), the paper's unit.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bnrepro.paper import PAPER  # noqa: E402
from bnrepro.report import save_figure  # noqa: E402
from bnrepro.report.selection import (  # noqa: E402
    DataChoice,
    Run,
    campaigns,
    counts_own_max,
    data_choices,
    finished_runs,
    latest_per_recipe,
    other_data_line,
    paper_equivalent,
    profile_rank,
    seed_maxes,
    seed_steps,
    split_by_data,
    target_for,
)
from bnrepro.report.text import (  # noqa: E402
    data_caveats,
    data_text,
    deviations_list,
    markdown_table,
    paper_steps_text,
    short_commit,
    without_paths,
)
from bnrepro.runs import atomic_write, check_writable  # noqa: E402

# The paper's Fig. 3 and target and the recipes' colours are data: bnrepro/paper.yaml, read by bnrepro.paper.
LINE_STYLES = ("-", "--", "-.", ":")


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
    manifests = [r.manifest for row in runs.values() for r in row.seeds] or ([choice.reference] if choice else [])
    return (f"- Data: {'; '.join(datasets)}{source}"
            + (" (**the runs used different data**)" if len(datasets) > 1 else "")
            + "".join(f". {c}" for c in data_caveats(manifests)))


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
