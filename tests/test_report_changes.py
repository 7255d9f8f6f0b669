"""The changes study's report (bnrepro.report.changes) and plan, on fabricated run folders: every verdict of its
rules on numbers chosen so each can be checked by hand; no training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from test_claims import write_run

from bnrepro import recipes
from bnrepro.experiments import changes, reproduce
from bnrepro.report import build
from bnrepro.report import changes as report

# Curves: evaluations at steps 0, 1000, 2000, 3000, 4000, each seed's top-1 there.
STEPS = [0, 1000, 2000, 3000, 4000]
INCEPTION = [[0.1, 0.3, 0.5, 0.6, 0.6], [0.1, 0.3, 0.5, 0.58, 0.61], [0.1, 0.3, 0.5, 0.59, 0.59]]  # T = 0.60
X5 = [[0.1, 0.61, 0.64, 0.65, 0.65], [0.1, 0.60, 0.63, 0.66, 0.66], [0.1, 0.62, 0.64, 0.64, 0.64]]  # at T by 1000
WITHOUT_LR = [[0.1, 0.4, 0.55, 0.60, 0.60], [0.1, 0.4, 0.56, 0.59, 0.61], [0.1, 0.4, 0.55, 0.58, 0.59]]
WITHOUT_DROPOUT = [[0.1, 0.61, 0.64, 0.66, 0.66], [0.1, 0.60, 0.63, 0.65, 0.65], [0.1, 0.62, 0.63, 0.64, 0.64]]
BASELINE = [[0.1, 0.3, 0.45, 0.55, 0.55], [0.1, 0.3, 0.45, 0.50, 0.56], [0.1, 0.3, 0.45, 0.54, 0.54]]  # L = 0.54
BASELINE_LR = [[0.1, 0.56, 0.60, 0.62, 0.62], [0.1, 0.55, 0.60, 0.61, 0.61], [0.1, 0.57, 0.60, 0.63, 0.63]]


def planned(direction: str, change: int = 0, reference: bool = False) -> reproduce.Planned:
    (found,) = [v for v in changes.variants("cpu", 1) if v.direction == direction and v.change == change]
    return found.reference if reference else found.run


def write(results: Path, run: reproduce.Planned, curves: list[list[float]], name: str) -> None:
    """Each seed of ``run`` as a finished run in its study home, its manifest carrying the planned digests."""
    recipe = recipes.load(run.recipe, list(run.overrides))
    digests = {"recipe_digest": recipe.digest, "recipe_training_digest": recipe.training_digest("cpu")}
    home = results / run.home if run.home else results
    for seed, top1 in enumerate(curves):
        folder = write_run(home, f"{name}-{seed}", Path(run.recipe).stem, STEPS, top1, seed=seed,
                           overrides=list(run.overrides))
        for file, extra in (("manifest.json", digests), ("summary.json", {"label": run.name})):
            recorded = json.loads((folder / file).read_text())
            (folder / file).write_text(json.dumps({**recorded, **extra}))


def study(results: Path) -> Path:
    runs = {(r.recipe, r.overrides): r for r in changes.runs("cpu", 1)}  # with their homes

    def home(run: reproduce.Planned) -> reproduce.Planned:
        return runs[(run.recipe, run.overrides)]
    for seed, top1 in enumerate(INCEPTION):
        write_run(results, f"inception-{seed}", "inception", STEPS, top1, seed=seed)
    write(results, home(planned("leave one out", 1, reference=True)), X5, "x5")
    write(results, home(planned("leave one out", 1)), WITHOUT_LR, "x5-lr")
    write(results, home(planned("leave one out", 2)), WITHOUT_DROPOUT, "x5-dropout")
    write(results, home(planned("add one in", 1, reference=True)), BASELINE, "baseline")
    write(results, home(planned("add one in", 1)), BASELINE_LR, "baseline-lr")
    return results


def effect(found: list[report.Effect], change: int, direction: str) -> report.Effect:
    (hit,) = [e for e in found if e.change == change and e.direction == direction]
    return hit


def test_every_verdict_by_hand(tmp_path):
    found = report.study(study(tmp_path))
    assert list(found) == ["cpu"]
    target, effects = found["cpu"]
    assert math.isclose(target, 0.60)
    assert len(effects) == 14
    lr_out = effect(effects, 1, "leave one out")
    d, w, verdict = lr_out.accuracy()  # with (BN-x5): 0.65, 0.66, 0.64; without: 0.60, 0.61, 0.59
    assert math.isclose(d, 0.05) and verdict == report.HELPS
    assert lr_out.level == 0.60  # every BN-x5 seed peaks above T
    speed = lr_out.speed()  # with: (0, 1000] each; without: (2000, 3000], (3000, 4000], never: (4000, inf)
    assert (speed.never_with, speed.never_without) == (0, 1)
    assert math.isclose(speed.ratio, (3000 * 4000 * 4000) ** (1 / 3) / 1000)
    w = 2 * math.sqrt(np.var(np.log([3000, 4000, 4000]), ddof=1) / 3)  # with's seeds all at 1000: no spread
    assert math.isclose(speed.low, (2000 * 3000 * 4000) ** (1 / 3) / 1000 * math.exp(-w)) and math.isinf(speed.high)
    assert speed.verdict == report.FASTER  # the never-reaching seed counts as far as its lower bound shows
    dropout = effect(effects, 2, "leave one out")
    assert dropout.accuracy()[2] == report.NOISE and dropout.speed().verdict == report.NOISE
    lr_in = effect(effects, 1, "add one in")
    assert math.isclose(lr_in.level, 0.54)  # a BN-Baseline seed peaks at 0.54 < T
    assert lr_in.accuracy()[2] == report.HELPS
    speed = lr_in.speed()  # with: 1000 each; without (BN-Baseline): 3000, 4000, 3000
    assert math.isclose(speed.ratio, (3000 * 4000 * 3000) ** (1 / 3) / 1000) and speed.verdict == report.FASTER
    assert effect(effects, 3, "add one in").accuracy()[2] == report.MISSING


def test_the_report_shows_the_study_apart_from_fig_2(tmp_path):
    results = study(tmp_path)
    written = build(results, tmp_path / "report")
    assert tmp_path / "report" / "changes.md" in written and tmp_path / "report" / "changes_cpu.png" in written
    lines = [line for line in (tmp_path / "report" / "changes.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    lr = [r for r in rows if r["Change"] == "1. learning rate x5"]
    assert [r["Measured"] for r in lr] == ["leave one out", "add one in"]
    assert lr[0]["Max"] == report.HELPS and lr[1]["Steps"] == report.FASTER
    speed = lr[0]["Speed-up to L (without / with)"]  # a seed without that never reaches L: no upper end
    assert speed.endswith("x–∞); 1 seed without never reach L") and "inf" not in speed, speed
    imagenet_md = (tmp_path / "report" / "imagenet.md").read_text()
    assert "train.lr=0.0015" not in imagenet_md and "train.lr=0.0075" not in imagenet_md  # not in Fig. 2/3


def test_the_studys_plan_keeps_the_campaigns_runs_and_homes_its_own(tmp_path):
    results = study(tmp_path)
    steps = reproduce.plan("cpu", results, None, changes.runs("cpu", 1))
    by_name = {s.run.name: s for s in steps}
    x5 = by_name[planned("leave one out", 1, reference=True).name]
    assert x5.state == "done" and x5.folder.parent == results / "imagenet"  # the campaign's, kept
    lr = by_name[planned("leave one out", 1).name]
    assert lr.state == "done" and lr.folder.parent == results / "changes" / "imagenet"
    assert by_name[planned("leave one out", 3).name].state == "new"
    assert all(s.run.home == "changes" for s in steps if s.run.recipe == changes.BASELINE)
    campaign = reproduce.plan("cpu", results)  # and the campaign keeps the BN-x5 runs trained by either
    assert [s.state for s in campaign if s.run.name == x5.run.name] == ["done"]
