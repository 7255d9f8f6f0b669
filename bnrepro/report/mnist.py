"""Fig. 1 and the MNIST summary table, from the files of complete ``bnrepro mnist`` runs."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from rich.table import Table  # noqa: E402

from bnrepro.paper import PAPER  # noqa: E402
from bnrepro.report import save_figure  # noqa: E402
from bnrepro.report.text import short_commit  # noqa: E402
from bnrepro.runs import Damaged, atomic_write, check_writable, read_json, read_table, runs_of, skip  # noqa: E402

# What the paper and the one public reproduction it cites report (shared/paper/README.md, section 2) is data:
# bnrepro/paper.yaml, ``PAPER.mnist``.


def public_reproduction(variant: str) -> str:
    """The public reproduction's test accuracies of ``variant`` (its two runs, digits as it printed them), or a
    dash for a variant it did not train."""
    found = PAPER.mnist.public_reproduction.get(variant)
    return " / ".join(map(str, found)) if found else "—"


def accuracy_text(v: dict) -> str:
    """``0.9812 ± 0.0011`` over the seeds that did not diverge, or why there is no number."""
    if v["final_test_accuracy_mean"] is None:
        return "no finite result (every seed diverged or gave non-finite outputs)"
    text = f"{v['final_test_accuracy_mean']:.4f} ± {v['final_test_accuracy_std']:.4f}"
    lost = v["seeds"] - v.get("seeds_finite", v["seeds"])
    return text + (f" ({lost} diverged)" if lost else "")


def wall_text(manifest: dict) -> str:
    wall = manifest.get("wall_seconds")  # absent from runs made before it was recorded
    return "—" if wall is None else f"{wall:,.0f} s"


def between_text(metrics: pd.DataFrame) -> str:
    """Which BN statistics the evaluations between the first and the last used."""
    if "statistics" not in metrics:
        return "moving averages between (not recorded: made before Alg. 2's statistics)"
    between = metrics[(metrics.step > metrics.step.min()) & (metrics.step < metrics.step.max())]
    used = sorted(set(between.statistics))
    return f"{' and '.join(used) or 'no evaluations'} between"


def statistics_text(metrics: pd.DataFrame) -> str:
    """Which BN statistics the run's last evaluation used (runs from before Alg. 2 was computed record none)."""
    if "statistics" not in metrics:
        return "moving averages (not recorded: made before Alg. 2's statistics)"
    return str(metrics[metrics.step == metrics.step.max()].statistics.iloc[0])


def complete_runs(results: Path) -> list[Path]:
    """MNIST run folders whose manifest says complete, oldest first; one whose files cannot be read is left out with
    a line naming the file (``runs.skip``)."""
    found = []
    for folder, _ in runs_of(results, "mnist"):
        try:
            load(folder, strict=True)
        except Damaged as damage:
            skip(damage)
            continue
        found.append(folder)
    return found


def load(run_dir: Path, strict: bool = False) -> tuple[pd.DataFrame, dict, dict]:
    """metrics.csv, summary.json and manifest.json of a run, with what Fig. 1 reads of them, or with ``strict`` all
    that the report reads (``Damaged`` otherwise)."""
    return (read_table(run_dir / "metrics.csv", ("variant", "seed", "step", "test_accuracy")),
            read_json(run_dir / "summary.json", ("steps", "divergences") * strict + ("variants", "baseline")),
            read_json(run_dir / "manifest.json", ("seeds",) * strict))


def summary_table(run_dir: Path) -> Table:
    """The end-of-run table: final test accuracy per variant and how soon it reaches the baseline's."""
    _, summary, _ = load(run_dir)
    table = Table(title=f"MNIST after {summary['steps']:,} steps")
    for column in ("variant", "seeds", "final test accuracy", f"steps to {summary['baseline']}'s final"):
        table.add_column(column)
    for name, v in summary["variants"].items():
        reached = v["steps_to_baseline_final_accuracy"]
        table.add_row(f"{name} ({v['label']})", str(v["seeds"]),
                      accuracy_text(v),
                      "never" if reached is None else f"{reached:,}")
    for d in summary["divergences"]:
        table.add_row(f"{d['variant']} seed {d['seed']}", "", f"diverged at step {d['step']:,}", "")
    return table


def probe_unit(run_dir: Path) -> int:
    """The unit of the last hidden layer that Fig. 1(b, c) follows: ``eval.probe_unit`` of the run's resolved
    recipes (one for all its variants, which are trained together)."""
    resolved = yaml.safe_load((run_dir / "recipes.yaml").read_text())
    return next(iter(resolved.values()))["eval"]["probe_unit"]


def figure_1(run_dir: Path, out: Path) -> list[Path]:
    """Fig. 1: (a) test accuracy vs steps (mean and min-max band over seeds); (b, c) the 15/50/85th
    percentiles of one sigmoid input of the last hidden layer, without and with BN (first seed)."""
    metrics, summary, _ = load(run_dir)
    names = list(summary["variants"])
    percentiles = [c for c in metrics.columns if c.startswith("p") and c[1:].replace(".", "").isdigit()]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.2 * (1 + len(names)), 3.4))
    styles = {True: dict(color="tab:blue"), False: dict(color="tab:gray", linestyle="--")}
    for name in names:
        is_baseline = name == summary["baseline"]
        curve = metrics[metrics.variant == name].groupby("step")["test_accuracy"]
        label = summary["variants"][name]["label"]
        axes[0].plot(curve.mean().index, curve.mean(), label=label, **styles[not is_baseline])
        axes[0].fill_between(curve.min().index, curve.min(), curve.max(), alpha=0.25,
                             color=styles[not is_baseline]["color"])
    axes[0].set(title="(a) test accuracy", xlabel="training steps", ylim=(0.7, 1.0), yticks=[0.7, 0.8, 0.9, 1.0])
    axes[0].legend(loc="lower right")
    first_seed = int(metrics.seed.min())
    for ax, name, letter in zip(axes[1:], names, "bcdefg"):
        one = metrics[(metrics.variant == name) & (metrics.seed == first_seed)]
        for column, shade in zip(percentiles, ("0.55", "0.0", "0.55")):
            ax.plot(one.step, one[column], color=shade, linewidth=1.2)
        ax.set(title=f"({letter}) {summary['variants'][name]['label']}: sigmoid input",
               xlabel="training steps", ylim=(-4, 4), yticks=[-2, 0, 2])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(3, 3))
    fig.suptitle(f"Fig. 1 reproduced: {len(metrics.seed.unique())} seed(s), run {run_dir.name}; "
                 f"(b, c) show percentiles {', '.join(p[1:] for p in percentiles)} of unit {probe_unit(run_dir)}, "
                 f"seed {first_seed}",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, "fig1_mnist")


def markdown(runs: list[Path]) -> str:
    latest = runs[-1]
    metrics, summary, manifest = load(latest)
    found = summary.get("deviations", manifest.get("deviations"))
    lines = ["# MNIST (paper Sec. 4.1, Fig. 1)", "", PAPER.mnist.note, "",
             f"Latest complete run: `{latest.name}` ({summary['steps']:,} steps, seeds {manifest['seeds']}, "
             f"device {manifest['device']}, commit `{short_commit(manifest.get('git_commit'))}`, "
             f"{wall_text(manifest)}); "
             + ("deviations from the paper: not recorded" if found is None else
                f"deviations from the paper: {'; '.join(found) if found else 'none'}") + ".", "",
             "BN's statistics at inference: Alg. 2's population statistics are the mean of the batch means and of "
             "the unbiased batch variances over `eval.population_batches` training mini-batches; the final "
             "accuracies and Fig. 1's first and last points use them, and the points between use what the run's "
             "`eval.statistics` chose (population, or BN's moving averages, which Alg. 2 allows for tracking "
             f"accuracy but which lag the weights). This run: {between_text(metrics)}; final row: "
             f"{statistics_text(metrics)}.", "",
             "| variant | seeds | final test accuracy (mean ± std) | steps to the baseline's final accuracy "
             "| public reproduction cited by the paper's notes |",
             "|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        reached = v["steps_to_baseline_final_accuracy"]
        lines.append(f"| {v['label']} (`{name}`) | {v['seeds']} | {accuracy_text(v)} | "
                     f"{'never' if reached is None else f'{reached:,}'} | "
                     f"{public_reproduction(name)} |")
    if summary["divergences"]:
        lines += ["", "Diverged (NaN/inf loss): " + ", ".join(
            f"{d['variant']} seed {d['seed']} at step {d['step']:,}" for d in summary["divergences"])]
    lines += ["", "![Fig. 1](fig1_mnist.png)", "", "## Every complete MNIST run", "",
              "| run | steps | seeds | variant: final accuracy | final BN statistics | engine | wall |",
              "|---|---|---|---|---|---|---|"]
    for run in runs:
        frame, s, m = load(run)
        finals = "; ".join(f"{n}: {accuracy_text(v)}" for n, v in s["variants"].items())
        engine = m.get("engine", "torch")  # runs from before the native engine record none: torch was the only one
        lines.append(f"| `{run.name}` | {s['steps']:,} | {len(m['seeds'])} | {finals} | {statistics_text(frame)} | "
                     f"{engine} | {wall_text(m)} |")
    return "\n".join(lines) + "\n"


def build(results: Path, out: Path) -> list[Path]:
    runs = complete_runs(results)
    if not runs:
        return []
    check_writable(out)
    written = figure_1(runs[-1], out)
    atomic_write(out / "mnist.md", markdown(runs))
    return [*written, out / "mnist.md"]
