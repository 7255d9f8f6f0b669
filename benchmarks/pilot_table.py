"""The table of a pilot: one row per run folder under a pilot's folder (``<name>/imagenet/<run>/``), read from the
runs' own summaries and manifests, written beside them as ``table.md`` and printed.

    python benchmarks/pilot_table.py results/pilot/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def rows(pilot: Path) -> list[dict]:
    found = []
    for summary_path in sorted(pilot.glob("*/imagenet/*/summary.json")):
        run = summary_path.parent
        summary, manifest = json.loads(summary_path.read_text()), json.loads((run / "manifest.json").read_text())
        metrics = pd.read_csv(run / "metrics.csv")
        last_fifth = metrics[metrics.step >= 0.8 * metrics.step.max()]
        found.append({"run": run.parent.parent.name, "recipe": summary["label"], "steps": summary["steps"],
                      "epochs": round(summary["steps"] * manifest["global_batch"] / manifest["train_examples"], 2),
                      "max top-1": f"{100 * summary['max_top1']:.2f}%", "at step": summary["max_top1_step"],
                      "final top-1": f"{100 * summary['final_top1']:.2f}%",
                      "gain over last 20%": f"{100 * (last_fifth.top1.max() - last_fifth.top1.iloc[0]):+.2f}",
                      "wall (s)": round(manifest.get("wall_seconds", float("nan"))),
                      "commit": manifest["git_commit"][:7], "folder": str(run.relative_to(pilot))})
    return found


def markdown(found: list[dict]) -> str:
    header = list(found[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in found]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pilot", type=Path)
    pilot = parser.parse_args().pilot
    table = markdown(rows(pilot))
    (pilot / "table.md").write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
