"""The learning-rate x initial-scale sweep (``bnrepro sweep``): a heatmap pair, the stable ranges, Sec. 3.3's check.

Rules, fixed before any sweep was run:
- a cell (variant, learning rate, initial std) is *stable* if none of its seeds diverged and every seed's final
  test accuracy is at least ``STABLE_ACCURACY``;
- a variant's widest stable learning-rate range is the longest run of consecutive stable learning rates at any one
  initial std (and the widest initial-std range likewise at any one learning rate);
- the largest learning rate that reaches the baseline's Fig. 1 accuracy is the largest learning rate of any cell
  whose seeds' mean final accuracy is at least the no-BN variant's mean final accuracy in the latest complete
  ``bnrepro mnist`` run (50,000 steps).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bnrepro.report import save_figure  # noqa: E402
from bnrepro.report.text import markdown_table, short_commit  # noqa: E402
from bnrepro.runs import Damaged, atomic_write, check_writable, read_json, runs_of, skip  # noqa: E402

STABLE_ACCURACY = 0.9
LABELS = {"baseline": "Without BN", "bn": "With BN"}


def cells(summary: dict) -> pd.DataFrame:
    """One row per (variant, lr, init_std): seeds' mean final accuracy, how many diverged, stable or not."""
    members = pd.DataFrame(summary["members"])
    members["diverged"] = members["diverged_at"].notna()
    members["accuracy"] = pd.to_numeric(members["final_test_accuracy"], errors="coerce")
    grouped = members.groupby(["variant", "lr", "init_std"])
    table = grouped.agg(accuracy=("accuracy", "mean"), worst=("accuracy", "min"), diverged=("diverged", "sum"),
                        seeds=("seed", "count")).reset_index()
    table["stable"] = (table.diverged == 0) & (table.worst >= STABLE_ACCURACY)
    return table


def _longest_run(flags: list[bool]) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True, the first such run on a tie; None if none."""
    best, start = None, None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = (start, i - 1)
            start = None
    return best


def widest(table: pd.DataFrame, variant: str, along: str, across: str) -> tuple[float, float, float] | None:
    """The widest stable range of ``along`` at any one value of ``across``: (low, high, that value)."""
    rows = table[table.variant == variant]
    found = None
    for value, group in rows.groupby(across):
        group = group.sort_values(along)
        run = _longest_run(group.stable.tolist())
        if run is None:
            continue
        low, high = group[along].iloc[run[0]], group[along].iloc[run[1]]
        if found is None or high / low > found[1] / found[0]:
            found = (low, high, value)
    return found


def baseline_accuracy(results: Path) -> tuple[float, str] | None:
    """The no-BN variant's final mean accuracy in the latest complete MNIST run, and that run's folder name."""
    runs = runs_of(results, "mnist")
    if not runs:
        return None
    folder = runs[-1][0]
    try:
        summary = read_json(folder / "summary.json", ("variants",))
    except Damaged as damage:
        skip(damage)
        return None
    base = summary.get("baseline")
    value = summary["variants"].get(base, {}).get("final_test_accuracy_mean") if base else None
    return None if value is None else (float(value), folder.name)


def heatmaps(table: pd.DataFrame, out: Path, title: str) -> list[Path]:
    """Final test accuracy over learning rate x initial std, without and with BN; diverged cells marked."""
    lrs, stds = sorted(table.lr.unique()), sorted(table.init_std.unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True, layout="constrained")
    for ax, variant in zip(axes, ("baseline", "bn")):
        grid = np.full((len(stds), len(lrs)), np.nan)
        marks = []
        for row in table[table.variant == variant].itertuples():
            i, j = stds.index(row.init_std), lrs.index(row.lr)
            grid[i, j] = row.accuracy
            if row.diverged:
                marks.append((j, i, f"{row.diverged}/{row.seeds}"))
        image = ax.imshow(grid, origin="lower", vmin=0.1, vmax=1.0, cmap="viridis", aspect="auto")
        for j, i, text in marks:  # x and how many seeds diverged
            ax.text(j, i, f"x {text}", ha="center", va="center", color="red", fontsize=8, fontweight="bold")
        for row in table[table.variant == variant].itertuples():
            if not np.isnan(row.accuracy) and not row.diverged:
                ax.text(lrs.index(row.lr), stds.index(row.init_std), f"{100 * row.accuracy:.0f}", ha="center",
                        va="center", fontsize=7, color="white" if row.accuracy < 0.6 else "black")
        ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], rotation=45)
        ax.set_yticks(range(len(stds)), [f"{v:g}" for v in stds])
        ax.set_title(LABELS.get(variant, variant), fontsize=10)
        ax.set_xlabel("learning rate")
    axes[0].set_ylabel("initial weight std")
    fig.colorbar(image, ax=axes, label="final test accuracy (mean over seeds)")
    fig.suptitle(title + "; x: some seed diverged (NaN/inf loss)", fontsize=9)
    return save_figure(fig, out, "sweep_mnist")


def markdown(folder: Path, summary: dict, manifest: dict, table: pd.DataFrame, results: Path) -> str:
    target = baseline_accuracy(results)
    lines = ["# Learning-rate and initial-scale ranges (beyond the paper: Sec. 3.3's claims on MNIST)", "",
             f"Run `{folder.name}`: {summary['steps']:,} steps, {len(summary['members'])} models (learning rates "
             f"{', '.join(f'{v:g}' for v in manifest['grid']['lrs'])}; initial stds "
             f"{', '.join(f'{v:g}' for v in manifest['grid']['init_stds'])}; seeds {manifest['seeds']}), trained "
             f"as one stack on the {manifest['engine']} engine in {manifest.get('wall_seconds', 0):,.0f} s, commit "
             f"`{short_commit(manifest.get('git_commit'))}`.", "",
             "Rules (fixed before the run): a cell is stable if no seed diverged and every seed's final test "
             f"accuracy is at least {STABLE_ACCURACY:.0%}; a widest range is the longest run of consecutive stable "
             "grid values at one value of the other axis; the largest learning rate reaching the baseline's "
             "Fig. 1 accuracy is the largest of any cell whose mean final accuracy is at least the no-BN network's "
             "after 50,000 steps in the latest `bnrepro mnist` run"
             + (f" ({target[0]:.4f}, run `{target[1]}`)." if target else " (no such run here)."), "",
             "![sweep](sweep_mnist.png)", "",
             "| variant | stable cells | widest stable learning-rate range | widest stable initial-std range | "
             "largest learning rate reaching the baseline's Fig. 1 accuracy |", "|---|---|---|---|---|"]
    for variant in ("baseline", "bn"):
        rows = table[table.variant == variant]
        lr_range, std_range = widest(table, variant, "lr", "init_std"), widest(table, variant, "init_std", "lr")
        reached = rows[rows.accuracy >= target[0]] if target else rows.iloc[:0]
        lines.append(
            f"| {LABELS[variant]} | {int(rows.stable.sum())} of {len(rows)} | "
            + ("none" if lr_range is None else f"{lr_range[0]:g} to {lr_range[1]:g} ({lr_range[1] / lr_range[0]:,.0f}x)"
               f" at std {lr_range[2]:g}") + " | "
            + ("none" if std_range is None else f"{std_range[0]:g} to {std_range[1]:g} "
               f"({std_range[1] / std_range[0]:,.0f}x) at lr {std_range[2]:g}") + " | "
            + ("none" if not len(reached) else f"{reached.lr.max():g}") + " |")
    check = summary.get("scale_invariance")
    lines += ["", "## Sec. 3.3 on a trained BN network", ""]
    if not check:
        lines.append("No BN member finished without diverging: nothing to check.")
    else:
        m = check["member"]
        lines += [f"The BN network at learning rate {m['lr']:g}, initial std {m['init_std']:g}, seed {m['seed']}, "
                  "after training; every hidden layer's weights W scaled by a, training-mode outputs and loss "
                  "gradients on 256 test examples, relative to a = 1 (float64). The paper: BN((aW)u) = BN(Wu), and "
                  "the gradient with respect to aW is 1/a that with respect to W.", "",
                  "| BN epsilon | a | max output change | max change of a x gradient |", "|---|---|---|---|"]
        for name, label in (("eps_0", "0 (the identity exactly)"), ("eps_recipe", "the recipe's")):
            for a, values in check[name].items():
                lines.append(f"| {label} | {a.removeprefix('a=')} | {values['output']:.1e} | "
                             f"{values['gradient_times_a']:.1e} |")
    table_rows = table.assign(accuracy=table.accuracy.map(lambda v: "—" if np.isnan(v) else f"{100 * v:.1f}%"))
    lines += ["", "## Every cell", "", markdown_table(table_rows[["variant", "lr", "init_std", "accuracy",
                                                                "diverged", "seeds", "stable"]]), ""]
    return "\n".join(lines)


def _summary(folder: Path) -> dict | None:
    """A sweep's summary.json, or ``None`` (said in a line, ``runs.skip``) where it cannot be read as one."""
    try:
        return read_json(folder / "summary.json", ("steps", "members"))
    except Damaged as damage:
        skip(damage)
        return None


def build(results: Path, out: Path) -> list[Path]:
    """sweep.md and the heatmap pair for the latest complete sweep whose summary can be read; [] when there is none."""
    runs = runs_of(Path(results), "sweep")
    if not runs:
        return []
    check_writable(out)
    latest = next(((folder, manifest, summary) for folder, manifest in reversed(runs)
                   if (summary := _summary(folder)) is not None), None)
    if latest is None:
        return []
    folder, manifest, summary = latest
    table = cells(summary)
    written = heatmaps(table, out, f"bnrepro sweep, run {folder.name}: {summary['steps']:,} steps")
    atomic_write(out / "sweep.md", markdown(folder, summary, manifest, table, Path(results)))
    return [*written, out / "sweep.md"]
