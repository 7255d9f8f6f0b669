"""The claims table (bnrepro.report.claims) on fabricated run folders: each rule's every verdict, v1's and v2's, on
numbers made up so that each can be checked by hand; no training, no network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import markdown_rows

from bnrepro.report import build
from bnrepro.report.claims import common, v1, v2
from bnrepro.report.selection import finished_runs, latest_per_recipe, select, target_for

COMPRESSION = 2.5e-4  # a step here stands for 4,000 paper steps
CLASSES = [f"class-{i}" for i in range(10)]  # chance 10%: Inception-Sigmoid may reach 20%, BN-x5-Sigmoid needs 50%

# The campaign where every claim holds. Inception's best is 0.80 (the target), first at step 1,400.
CAMPAIGN = {
    "inception": dict(recipe="inception", steps=[0, 100, 1400], top1=[0.1, 0.5, 0.8]),
    "inception seed 1": dict(recipe="inception", seed=1, steps=[0, 100, 1400], top1=[0.1, 0.5, 0.79]),
    "bn-baseline": dict(recipe="bn-baseline", steps=[0, 100, 700], top1=[0.1, 0.6, 0.82]),  # 700 < 1,400
    "bn-x5": dict(recipe="bn-x5", steps=[0, 100, 200], top1=[0.1, 0.7, 0.85]),  # 1,400 / 200 = 7.0x
    "bn-x5 seed 1": dict(recipe="bn-x5", seed=1, steps=[0, 100, 200], top1=[0.1, 0.7, 0.83]),  # s = 0.02
    "bn-x30": dict(recipe="bn-x30", steps=[0, 100, 300], top1=[0.1, 0.6, 0.9]),  # slower start, +5 points
    "bn-x5-sigmoid": dict(recipe="bn-x5-sigmoid", steps=[0, 100, 200], top1=[0.1, 0.4, 0.6]),  # >= 50%
    "inception-sigmoid": dict(recipe="inception-sigmoid", steps=[0, 100, 200], top1=[0.1, 0.15, 0.12]),  # <= 20%
    "inception-x5": dict(recipe="inception-x5", steps=[0, 100, 200], top1=[0.1, 0.2, float("nan")],
                         status="diverged", diverged_at=150),
    "shards only": dict(recipe="bn-x5", overrides=["train.shuffle=shards", "profiles.cpu.steps=200"],
                        steps=[0, 100, 200], top1=[0.1, 0.7, 0.82]),  # d = +3 points > s
}


def write_run(results: Path, folder: str, recipe: str, steps: list[int], top1: list[float], *, seed: int = 0,
              status: str = "complete", overrides: list[str] = (), profile: str = "cpu",
              compression: float | None = COMPRESSION, classes: list[str] | None = CLASSES,
              diverged_at: int | None = None, train_examples: int | None = 5000) -> Path:
    """A fabricated `bnrepro imagenet` run folder (manifest.json, summary.json, metrics.csv)."""
    run = results / "imagenet" / folder
    run.mkdir(parents=True)
    manifest = {"experiment": "imagenet", "status": status, "recipe": recipe, "label": recipe.upper(),
                "profile": profile, "seed": seed, "overrides": list(overrides), "replicas": 1, "global_batch": 128,
                "compression": compression, "dataset": "fabricated", "deviations": [],
                "started": "2026-01-02T00:00:00+00:00"}
    if classes is not None:
        manifest["classes"] = classes
    if train_examples is not None:
        manifest["train_examples"] = train_examples
    (run / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame({"step": steps, "optimizer_step": steps, "epoch": [s / 100 for s in steps],
                  "statistics": "moving", "train_loss": [2.0 - t for t in top1], "lr": 0.01, "top1": top1,
                  "top5": top1}).to_csv(run / "metrics.csv", index=False)
    best = max((t, s) for s, t in zip(steps, top1) if t == t)
    (run / "summary.json").write_text(json.dumps({
        "recipe": recipe, "profile": profile, "max_top1": best[0], "max_top1_step": best[1],
        "final_top1": top1[-1], "diverged_at": diverged_at, "deviations": []}))
    return run


def campaign(results: Path, drop: tuple[str, ...] = (), profile: str = "cpu", runs: dict | None = None,
             **changes: dict) -> Path:
    """The campaign ``runs`` (default: the one above) under ``results``, less ``drop``, with ``changes`` (name with _
    for space and -> fields)."""
    for name, spec in (CAMPAIGN if runs is None else runs).items():
        if name in drop:
            continue
        spec = {**spec, **changes.get(name.replace(" ", "_").replace("-", "_"), {})}
        write_run(results, f"{profile}-{name.replace(' ', '-')}", profile=profile, **spec)
    return results


# Ensemble: 4 validation images of a 3-class set; per member and crops, the images it gets wrong.
LABELS = [0, 1, 2, 0]
RIGHT = {0: [0.8, 0.1, 0.1], 1: [0.1, 0.8, 0.1], 2: [0.1, 0.1, 0.8]}


def wrong(label: int) -> list[float]:
    """Taken for the next class: 0.6 there, 0.3 on the label. Averaged with a right member's 0.8/0.1 the label wins
    (0.55 against 0.35), so an ensemble of two is wrong only where both members are."""
    probs = [0.1, 0.1, 0.1]
    probs[label], probs[(label + 1) % 3] = 0.3, 0.6
    return probs


def write_ensemble(results: Path, folder: str, bad: dict[tuple[str, int], set[int]], *, profile: str = "cpu",
                   in_recipe_yaml: bool = True, started: str = "2026-01-03T00:00:00+00:00",
                   labels: list[int] = LABELS) -> Path:
    """A fabricated `bnrepro ensemble` run folder: manifest, results.csv, cached probabilities; the profile either
    in its recipe.yaml (as `bnrepro ensemble` writes it) or in the manifest."""
    run = results / "ensemble" / folder
    (run / "probabilities").mkdir(parents=True)
    names = sorted({name for name, _ in bad})
    manifest = {"experiment": "ensemble", "status": "complete", "started": started, "recipe": "bn-inception",
                "members": [{"name": n, "run": str(results / "imagenet" / n)} for n in names],
                "crops": sorted({c for _, c in bad}), "val_images": len(labels)}
    if in_recipe_yaml:
        (run / "recipe.yaml").write_text(f"experiment: ensemble\nprofile: {profile}\n")
    else:
        manifest["profile"] = profile
    (run / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame({"members": names, "models": 1, "crops": 1, "top1_error": 0.99, "top5_error": 0.99}
                 ).to_csv(run / "results.csv", index=False)  # not read: the cache decides, as in ensemble.md
    for (name, crops), images in bad.items():
        probs = [wrong(label) if i in images else RIGHT[label] for i, label in enumerate(labels)]
        torch.save({"probs": torch.tensor(probs).half(), "labels": torch.tensor(labels, dtype=torch.int64),
                    "indices": torch.arange(len(labels), dtype=torch.int64)},
                   run / "probabilities" / f"{name}-{crops}crop.pt")
    return run


# m1: 50% at 1 crop, 25% at 144; m2: 25% at 144 on another image; their mean gets every image right (0%).
ENSEMBLE_HELD = {("m1", 1): {0, 1}, ("m1", 144): {0}, ("m2", 1): {1}, ("m2", 144): {1}}


def verdicts(results: Path, profile: str = "cpu") -> dict[int, common.Verdict]:
    rows = latest_per_recipe(finished_runs(results))[profile]
    found, _ = v1.judge(profile, rows, results)
    return {v.number: v for v in found}


def test_every_claim_held_and_the_report(tmp_path):
    results = campaign(tmp_path / "results")
    write_ensemble(results, "cpu-ensemble", ENSEMBLE_HELD)
    found = verdicts(results)
    assert {n: v.verdict for n, v in found.items()} == {n: "held" for n in range(1, 8)}
    assert "700 (2.8e6 paper-equivalent) vs Inception 1,400 (5.6e6 paper-equivalent)" in found[1].ours
    assert found[2].ours.endswith(": 7.0x")  # exactly the threshold: held
    assert "d = +3.0 points" in found[6].ours
    assert "50.00% (1 crop) -> 25.00% (144 crops)" in found[7].ours and "ensemble of 2 0.00%" in found[7].ours

    out = tmp_path / "report"
    assert out / "claims.md" in build(results, out)
    md = (out / "claims.md").read_text()
    for text in [*v1.COMMON, *v1.RULES.values()]:
        assert text in md  # the rules, as the module states them
    assert ("v1's seed spread: s = 2.0 points (inception seeds 0: 80.0%, 1: 79.0%; bn-x5 seeds 0: 85.0%, 1: 83.0%)."
            in md)
    table = markdown_rows(md.split("## Profile `cpu`")[1].split("v1's figures")[0])
    assert [row["v1 verdict"] for row in table.values()] == ["held"] * 7
    assert table["2"]["Paper"] == "2.1e6 steps, 14.8x fewer"
    # v2 beside it: two seeds of Inception and BN-x5, one of the rest, 4 images: nothing it can call
    assert [row["v2 verdict"] for row in table.values()] == ["inconclusive"] * 7
    assert table["1"]["This scale (v2)"].startswith("fewer than 3 seeds: INCEPTION has 2, BN-BASELINE has 1")
    for text in [*v2.COMMON, *v2.RULES.values(), *v2.CHANGES]:
        assert text in md
    order = ["## Rules v2", v2.COMMON[0], "## Rules v1", v1.COMMON[0], "## Profile `cpu`"]
    assert [md.index(text) for text in order] == sorted(md.index(text) for text in order)  # v2's rules first


def test_the_papers_column_and_the_rules_give_the_papers_numbers():
    """The figures come from bnrepro/paper.yaml; these are the words they gave when they were written out here."""
    assert {n: paper for n, (_, paper) in common.CLAIMS.items()} == {
        1: "13.3e6 vs 31.0e6 steps to 72.2% (2.3x)", 2: "2.1e6 steps, 14.8x fewer",
        3: "2.7e6 vs 2.1e6 steps to 72.2%; max 74.8% vs 73.0%", 4: "parameters reach \"machine infinity\"",
        5: "Inception-Sigmoid never above chance (1/1000); BN-x5-Sigmoid 69.8%", 6: "about +1%",
        7: "top-1 error 25.2% (1 crop), 21.99% (144 crops), 20.1% (6-model ensemble, 144 crops)"}
    assert common.CLAIMS[2][0] == "BN-x5 reaches it in about 14 times fewer steps than Inception"
    assert common.CLAIMS[6][0] == "Within-shard shuffling (change 6) adds about 1% accuracy"
    assert common.CLAIMS[7][0] == "Multicrop lowers the error; the 6-model ensemble lowers it further"
    assert common.HALF_PAPER_SPEEDUP == 7 and round(v2.PAPER_BN_X5_EPOCHS) == 52
    assert common.SHARDS_ONLY == "bn-x5 [train.shuffle=shards]" and v1.SPREAD_RECIPES == ("inception", "bn-x5")
    assert "at least 7x (half the paper's 14.8x)" in v1.RULES[2]
    assert "at or above 7x (half the paper's 14.8x); not held if it lies below 7x" in v2.RULES[2]
    assert "(the paper's BN-x5 took 2.1e6 x 32 / 1.28e6 = 52 epochs to reach 72.2%)" in v2.RULES[6]
    assert "over `inception` and `bn-x5`; s = 0" in v1.COMMON[1]


def test_nothing_run_is_not_run(tmp_path):
    results = tmp_path / "results"
    write_run(results, "only-bn-x5", "bn-x5", [0, 100], [0.1, 0.5])
    write_ensemble(results, "elsewhere", ENSEMBLE_HELD, profile="proxy")  # another profile's ensemble
    found = verdicts(results)
    assert {n: v.verdict for n, v in found.items()} == {n: "not run" for n in range(1, 8)}
    assert found[3].ours == "no finished run of `bn-x30`"
    assert found[7].ours == "no finished ensemble run at profile `cpu`"
    s, text = v1.seed_spread(latest_per_recipe(finished_runs(results))["cpu"])
    assert s == 0 and text.startswith("s = 0: only one seed")


def test_claim_1_not_held(tmp_path):
    later = campaign(tmp_path / "later", bn_baseline=dict(steps=[0, 100, 1400], top1=[0.1, 0.6, 0.82]))
    assert verdicts(later)[1].verdict == "not held"  # the same step as Inception: not earlier
    never = campaign(tmp_path / "never", bn_baseline=dict(top1=[0.1, 0.6, 0.79]))
    assert verdicts(never)[1].verdict == "not held" and "BN-Baseline never" in verdicts(never)[1].ours


def test_claim_2_speedup_below_half_the_papers_and_never(tmp_path):
    slow = campaign(tmp_path / "slow", bn_x5=dict(steps=[0, 100, 201], top1=[0.1, 0.7, 0.85]))
    assert verdicts(slow)[2].verdict == "not held" and verdicts(slow)[2].ours.endswith("7.0x")  # 6.97x
    never = campaign(tmp_path / "never", bn_x5=dict(top1=[0.1, 0.7, 0.79]))
    assert verdicts(never)[2].verdict == "not held" and "never reaches 80.0%" in verdicts(never)[2].ours


def test_claim_2_at_profile_paper_with_a_lower_bound(tmp_path):
    results = tmp_path / "results"  # the paper's 72.2%: Inception never reaches it, so its last step stands in
    write_run(results, "inception", "inception", [0, 1400], [0.0, 0.5], profile="paper", compression=None)
    write_run(results, "bn-x5", "bn-x5", [0, 100], [0.0, 0.73], profile="paper", compression=None)
    found = verdicts(results, "paper")
    assert found[2].verdict == "held" and found[2].ours.endswith("at least 14.0x")
    assert found[1].verdict == "not run"  # no BN-Baseline


def test_claim_3_both_parts(tmp_path):
    # starts slower by reaching the target later, though its first evaluation is higher
    later = campaign(tmp_path / "later", bn_x30=dict(steps=[0, 100, 300], top1=[0.1, 0.75, 0.9]))
    assert verdicts(later)[3].verdict == "held"
    assert "(a) starts slower: held" in verdicts(later)[3].ours
    # higher first evaluation and the target sooner: does not start slower
    faster = campaign(tmp_path / "faster", bn_x30=dict(steps=[0, 100, 150], top1=[0.1, 0.75, 0.9]))
    assert verdicts(faster)[3].verdict == "not held" and "(a) starts slower: not held" in verdicts(faster)[3].ours
    # ends 1 point higher, within s = 2 points
    close = campaign(tmp_path / "close", bn_x30=dict(top1=[0.1, 0.6, 0.86]))
    assert verdicts(close)[3].verdict == "within seed spread"
    assert "(b) ends higher: within seed spread" in verdicts(close)[3].ours
    # ends 5 points lower
    lower = campaign(tmp_path / "lower", bn_x30=dict(top1=[0.1, 0.6, 0.8]))
    assert verdicts(lower)[3].verdict == "not held" and "(-5.0 points)" in verdicts(lower)[3].ours


def test_claim_4_not_held_when_it_completes(tmp_path):
    results = campaign(tmp_path / "results", inception_x5=dict(top1=[0.1, 0.2, 0.3], status="complete",
                                                               diverged_at=None))
    assert verdicts(results)[4].verdict == "not held" and verdicts(results)[4].ours == "complete, max 30.0%"
    assert verdicts(campaign(tmp_path / "diverged"))[4].ours == "diverged at step 150 (0.6e6 paper-equivalent)"


def test_claim_5_not_held_either_way_and_without_classes(tmp_path):
    above = campaign(tmp_path / "above", inception_sigmoid=dict(top1=[0.1, 0.21, 0.12]))
    assert verdicts(above)[5].verdict == "not held"
    below = campaign(tmp_path / "below", bn_x5_sigmoid=dict(top1=[0.1, 0.4, 0.49]))
    assert verdicts(below)[5].verdict == "not held"
    unknown = campaign(tmp_path / "unknown", inception_sigmoid=dict(classes=None), bn_x5_sigmoid=dict(classes=None))
    assert verdicts(unknown)[5].verdict == "not run" and "no `classes`" in verdicts(unknown)[5].ours


def test_claim_6_within_seed_spread_and_not_held(tmp_path):
    close = campaign(tmp_path / "close", shards_only=dict(top1=[0.1, 0.7, 0.84]))  # d = +1 point <= s = 2
    assert verdicts(close)[6].verdict == "within seed spread"
    better = campaign(tmp_path / "better", shards_only=dict(top1=[0.1, 0.7, 0.9]))  # d = -5 points
    assert verdicts(better)[6].verdict == "not held"
    # without a second seed s = 0: the same +1 point holds
    one_seed = campaign(tmp_path / "one-seed", drop=("inception seed 1", "bn-x5 seed 1"),
                        shards_only=dict(top1=[0.1, 0.7, 0.84]))
    assert verdicts(one_seed)[6].verdict == "held"
    assert verdicts(campaign(tmp_path / "none", drop=("shards only",)))[6].verdict == "not run"


def test_claim_7_not_held_either_way(tmp_path):
    no_multicrop = campaign(tmp_path / "no-multicrop")  # m1 as wrong at 144 crops as at 1
    write_ensemble(no_multicrop, "e", {**ENSEMBLE_HELD, ("m1", 1): {0}}, in_recipe_yaml=False)
    assert verdicts(no_multicrop)[7].verdict == "not held"
    no_gain = campaign(tmp_path / "no-gain")  # m2 right everywhere at 144 crops: the ensemble cannot beat it
    write_ensemble(no_gain, "e", {**ENSEMBLE_HELD, ("m2", 144): set()})
    assert verdicts(no_gain)[7].verdict == "not held"
    single = campaign(tmp_path / "single")
    write_ensemble(single, "e", {("m1", 1): {0}, ("m1", 144): set()})
    assert verdicts(single)[7].verdict == "not run"


@pytest.mark.parametrize("held", [True, False])
def test_latest_ensemble_at_the_profile_is_judged(tmp_path, held):
    results = campaign(tmp_path / "results")
    write_ensemble(results, "older", ENSEMBLE_HELD if not held else {**ENSEMBLE_HELD, ("m1", 1): {0}},
                   started="2026-01-03T00:00:00+00:00")
    write_ensemble(results, "newer", ENSEMBLE_HELD if held else {**ENSEMBLE_HELD, ("m1", 1): {0}},
                   started="2026-01-04T00:00:00+00:00")
    write_ensemble(results, "newest-elsewhere", {("m1", 1): {0}, ("m1", 144): {0}, ("m2", 1): set(),
                                                 ("m2", 144): set()}, profile="proxy",
                   started="2026-01-05T00:00:00+00:00")
    found = verdicts(results)[7]
    assert found.verdict == ("held" if held else "not held") and found.ours.startswith("`ensemble/newer`")


# Rules v2 ------------------------------------------------------------------------------------------------------------

def flat(reach: int, peak: float, last: int, every: int) -> dict:
    """A curve evaluated every ``every`` steps up to ``last``: 10% at step 0, 50% before ``reach``, ``peak`` from
    ``reach`` on; so it first reaches any level in (50%, peak] at ``reach``, after the evaluation at reach - every."""
    steps = list(range(0, last + 1, every))
    return dict(steps=steps, top1=[0.1 if s == 0 else 0.5 if s < reach else peak for s in steps])


SHARDS = ["train.shuffle=shards"]
DIVERGED = dict(recipe="inception-x5", steps=[0, 100, 200], top1=[0.1, 0.2, float("nan")], status="diverged",
                diverged_at=150)
# Three seeds of every recipe, every claim held by v2. T = mean(80, 79, 81)% = 80%. Inception's seeds reach their own
# max at 1,400/1,300/1,400 (after 1,300/1,200/1,300); BN-x5 reaches 80% at 140/150/140 (after 130/140/130), so the
# speed-up is at least 1,266 / 143 = 8.8x from the evaluations alone; BN-x5's budget 200 x 128 / 5,000 = 5.12 epochs.
CAMPAIGN_V2 = {
    "inception": dict(recipe="inception", **flat(1400, 0.80, 1400, 100)),
    "inception seed 1": dict(recipe="inception", seed=1, **flat(1300, 0.79, 1400, 100)),
    "inception seed 2": dict(recipe="inception", seed=2, **flat(1400, 0.81, 1400, 100)),
    "bn-baseline": dict(recipe="bn-baseline", **flat(700, 0.82, 800, 100)),
    "bn-baseline seed 1": dict(recipe="bn-baseline", seed=1, **flat(800, 0.83, 800, 100)),
    "bn-baseline seed 2": dict(recipe="bn-baseline", seed=2, **flat(600, 0.84, 800, 100)),
    "bn-x5": dict(recipe="bn-x5", **flat(140, 0.85, 200, 10)),
    "bn-x5 seed 1": dict(recipe="bn-x5", seed=1, **flat(150, 0.84, 200, 10)),
    "bn-x5 seed 2": dict(recipe="bn-x5", seed=2, **flat(140, 0.86, 200, 10)),
    "bn-x30": dict(recipe="bn-x30", **flat(270, 0.90, 300, 10)),  # later than BN-x5, 5 points higher
    "bn-x30 seed 1": dict(recipe="bn-x30", seed=1, **flat(280, 0.89, 300, 10)),
    "bn-x30 seed 2": dict(recipe="bn-x30", seed=2, **flat(260, 0.91, 300, 10)),
    "bn-x5-sigmoid": dict(recipe="bn-x5-sigmoid", **flat(100, 0.60, 200, 100)),  # >= 50%
    "bn-x5-sigmoid seed 1": dict(recipe="bn-x5-sigmoid", seed=1, **flat(100, 0.62, 200, 100)),
    "bn-x5-sigmoid seed 2": dict(recipe="bn-x5-sigmoid", seed=2, **flat(100, 0.58, 200, 100)),
    "inception-sigmoid": dict(recipe="inception-sigmoid", steps=[0, 100, 200], top1=[0.1, 0.15, 0.12]),  # <= 20%
    "inception-sigmoid seed 1": dict(recipe="inception-sigmoid", seed=1, steps=[0, 100, 200], top1=[0.1, 0.14, 0.1]),
    "inception-sigmoid seed 2": dict(recipe="inception-sigmoid", seed=2, steps=[0, 100, 200], top1=[0.1, 0.16, 0.1]),
    "inception-x5": DIVERGED,
    "inception-x5 seed 1": {**DIVERGED, "seed": 1},
    "inception-x5 seed 2": {**DIVERGED, "seed": 2},
    "shards only": dict(recipe="bn-x5", overrides=SHARDS, **flat(140, 0.82, 200, 10)),  # 3 points under BN-x5
    "shards only seed 1": dict(recipe="bn-x5", seed=1, overrides=SHARDS, **flat(140, 0.81, 200, 10)),
    "shards only seed 2": dict(recipe="bn-x5", seed=2, overrides=SHARDS, **flat(140, 0.83, 200, 10)),
}
# 40 images, two members: each fixes 12 images at 144 crops and breaks none (b 12, c 0, p = 2 / 4096); together
# they get every image right at 144 crops, 8 fewer errors than the best member m1 (b 8, c 0, p = 2 / 256).
IMAGES_40 = [i % 3 for i in range(40)]
ENSEMBLE_V2_HELD = {("m1", 1): set(range(0, 20)), ("m1", 144): set(range(0, 8)),
                    ("m2", 1): set(range(20, 40)), ("m2", 144): set(range(20, 28))}


def v2_campaign(results: Path, drop: tuple[str, ...] = (), **changes: dict) -> Path:
    return campaign(results, drop, runs=CAMPAIGN_V2, **changes)


def verdicts_v2(results: Path, profile: str = "cpu") -> dict[int, common.Verdict]:
    rows = latest_per_recipe(finished_runs(results))[profile]
    found, _ = v2.judge(profile, rows, results)
    return {v.number: v for v in found}


def log_mean(*steps: float) -> float:
    return sum(math.log(s) for s in steps) / len(steps)


def test_mcnemar_against_a_hand_computation():
    assert v2.mcnemar(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0386
    assert v2.mcnemar(2, 10) == v2.mcnemar(10, 2)
    assert v2.mcnemar(0, 0) == 1.0 and v2.mcnemar(3, 3) == 1.0  # 2 * 42 / 64 > 1: capped
    assert v2.mcnemar(12, 0) == pytest.approx(2 / 4096)
    assert 0 < v2.mcnemar(700, 500) < 1e-8 and v2.mcnemar(1000, 1000) == 1.0  # no underflow past 1,074
    x = pd.Series([True, True, False, False, True], index=[0, 1, 2, 3, 9])
    y = pd.Series([False, True, True, False], index=[0, 1, 2, 3])  # image 9 has no pair: left out
    assert v2.paired(x, y) == (1, 1, 4, 1.0)


def test_band_against_a_hand_computation():
    a, b = np.array([0.90, 0.88, 0.86]), np.array([0.85, 0.83, 0.84, 0.82])
    # sA^2 = (0.02^2 + 0 + 0.02^2) / 2 = 4e-4; sB^2 = (0.015^2 + 0.005^2 + 0.005^2 + 0.015^2) / 3 = 5e-4 / 3
    assert v2.band(a, b) == pytest.approx(2 * math.sqrt(4e-4 / 3 + 5e-4 / 3 / 4))
    assert v2.band(np.array([0.60, 0.62, 0.58])) == pytest.approx(2 * 0.02 / math.sqrt(3))  # against a number


def test_v2_every_claim_held_and_its_figures(tmp_path):
    results = v2_campaign(tmp_path / "results")
    write_ensemble(results, "e", ENSEMBLE_V2_HELD, labels=IMAGES_40)
    found = verdicts_v2(results)
    assert {n: v.verdict for n, v in found.items()} == {n: "held" for n in range(1, 8)}, found
    # claim 2 by hand: geometric means of evaluated steps, the evaluations' interval, the band of log steps
    inception, x5 = (1400, 1300, 1400), (140, 150, 140)
    point = math.exp(log_mean(*inception) - log_mean(*x5))
    low, high = math.exp(log_mean(1300, 1200, 1300) - log_mean(*x5)), math.exp(log_mean(*inception) - log_mean(130,
                                                                                                              140, 130))
    w = v2.band(np.log(inception), np.log(x5))
    assert w == pytest.approx(2 * math.sqrt(math.log(1400 / 1300) ** 2 / 9 + math.log(150 / 140) ** 2 / 9))
    assert (f"= {point:.2f}x (evaluations: {low:.2f}x to {high:.2f}x; with the seed band ±{w:.2f} in log steps: "
            f"{low * math.exp(-w):.2f}x to {high * math.exp(w):.2f}x; threshold at least 7x)") in found[2].ours
    assert low * math.exp(-w) > 7
    assert "steps to T 80.00%: INCEPTION 1,400/1,300/1,400 (seeds 0/1/2) vs BN-X5 140/150/140" in found[2].ours
    # claim 6: d = 85% - 82% with band 2 * sqrt(0.01^2 / 3 + 0.01^2 / 3) = 1.63 points, two decimals
    assert "5.12 epochs" in found[6].ours and "d = +3.00 points, band ±1.63 points" in found[6].ours
    assert "(b 12, c 0, p 0.000488)" in found[7].ours and "(b 8, c 0, p 0.00781)" in found[7].ours
    assert "40 validation images, alpha 0.05" in found[7].ours and "best member m1 20.00%" in found[7].ours


def test_v2_not_run(tmp_path):
    results = tmp_path / "results"
    write_run(results, "only-bn-x5", "bn-x5", [0, 100], [0.1, 0.5])
    found = verdicts_v2(results)
    assert {n: v.verdict for n, v in found.items()} == {n: "not run" for n in range(1, 8)}
    assert found[3].ours == "no finished run of `bn-x30`"


def test_v2_fewer_than_three_seeds_is_inconclusive_where_v1_decided(tmp_path):
    results = campaign(tmp_path / "results")  # v1's campaign: two seeds of Inception and BN-x5, one of the rest
    v1, v2 = verdicts(results), verdicts_v2(results)
    assert all(v1[n].verdict == "held" for n in range(1, 7))
    assert all(v2[n].verdict == "inconclusive" and "fewer than 3 seeds" in v2[n].ours for n in range(1, 7))
    assert "max BN-X30 90.00% (seed 0) vs BN-X5 85.00%/83.00% (seeds 0/1, mean 84.00%): d = +6.00 points" in v2[3].ours


def test_v1_keeps_the_lowest_seeds_max_as_its_target_where_v2_and_imagenet_md_take_the_mean(tmp_path):
    results = campaign(tmp_path / "results")  # Inception's seeds: 80% (seed 0), 79% (seed 1)
    rows = latest_per_recipe(finished_runs(results))["cpu"]
    assert v1.target("cpu", rows) == 0.80 == rows["inception"].max_top1
    assert v2.target("cpu", rows).level == target_for("cpu", rows) == pytest.approx(0.795)
    assert v1.target("paper", rows) == v2.target("paper", rows).level == 0.722


def test_v2_claim_2_missed_by_less_than_the_noise_is_inconclusive(tmp_path):
    """The review's case: BN-x5's seed 0 misses T by 0.02 points; v1 says never, v2 that it cannot tell."""
    results = v2_campaign(tmp_path / "results", bn_x5=flat(140, 0.7998, 200, 10),
                          bn_x5_seed_1=flat(150, 0.81, 200, 10), bn_x5_seed_2=flat(140, 0.80, 200, 10))
    assert verdicts(results)[2].verdict == "not held"
    found = verdicts_v2(results)[2]
    assert found.verdict == "inconclusive"
    assert ("BN-X5: 2 of 3 seeds reach T 80.00%; max 79.98%/81.00%/80.00% (seeds 0/1/2, mean 80.33%), d = +0.33 points "
            "vs band ±1.34 points") in found.ours


def test_v2_claim_2_not_held_and_inconclusive(tmp_path):
    below = v2_campaign(tmp_path / "below", bn_x5=flat(140, 0.70, 200, 10), bn_x5_seed_1=flat(150, 0.71, 200, 10),
                        bn_x5_seed_2=flat(140, 0.72, 200, 10))  # far under T: does not reach it
    assert verdicts_v2(below)[2].verdict == "not held" and "0 of 3 seeds reach T" in verdicts_v2(below)[2].ours
    # every seed at 220 (after 210): at most 1,366 / 210 = 6.5x, x exp(band of Inception's log steps 0.05) < 7
    slow = v2_campaign(tmp_path / "slow", **{k: flat(220, p, 300, 10) for k, p in
                                             (("bn_x5", 0.85), ("bn_x5_seed_1", 0.84), ("bn_x5_seed_2", 0.86))})
    assert verdicts_v2(slow)[2].verdict == "not held"
    # at 190 (after 180): between 6.7x and 7.6x: the threshold inside
    near = v2_campaign(tmp_path / "near", **{k: flat(190, p, 300, 10) for k, p in
                                             (("bn_x5", 0.85), ("bn_x5_seed_1", 0.84), ("bn_x5_seed_2", 0.86))})
    assert verdicts_v2(near)[2].verdict == "inconclusive"


def test_v2_claim_1_not_held_when_bn_baseline_does_not_reach_the_target(tmp_path):
    results = v2_campaign(tmp_path / "results", bn_baseline=flat(700, 0.70, 800, 100),
                          bn_baseline_seed_1=flat(700, 0.71, 800, 100), bn_baseline_seed_2=flat(700, 0.72, 800, 100))
    assert verdicts_v2(results)[1].verdict == "not held"


def test_v2_claim_3_parts(tmp_path):
    close = v2_campaign(tmp_path / "close", bn_x30=flat(270, 0.86, 300, 10), bn_x30_seed_1=flat(280, 0.84, 300, 10),
                        bn_x30_seed_2=flat(260, 0.85, 300, 10))  # ends level with BN-x5: d = 0
    found = verdicts_v2(close)[3]
    assert found.verdict == "inconclusive"
    assert "(a) starts slower: held" in found.ours and "(b) ends higher: inconclusive" in found.ours
    faster = v2_campaign(tmp_path / "faster", bn_x30=flat(100, 0.90, 300, 10), bn_x30_seed_1=flat(110, 0.89, 300, 10),
                         bn_x30_seed_2=flat(100, 0.91, 300, 10))
    assert verdicts_v2(faster)[3].verdict == "not held" and "(a) starts slower: not held" in verdicts_v2(faster)[3].ours
    # neither reaches T (80%): steps to it cannot be compared, whatever (b) says
    low = v2_campaign(tmp_path / "low", **{k: flat(100, p, 300, 10) for k, p in
                                           (("bn_x5", 0.70), ("bn_x5_seed_1", 0.71), ("bn_x5_seed_2", 0.72),
                                            ("bn_x30", 0.75), ("bn_x30_seed_1", 0.74), ("bn_x30_seed_2", 0.76))})
    found = verdicts_v2(low)[3]
    assert found.verdict == "not testable at this scale"
    assert "(a) starts slower: not testable at this scale" in found.ours and "(b) ends higher: held" in found.ours


def test_v2_claim_4_mixed_and_none(tmp_path):
    complete = dict(top1=[0.1, 0.2, 0.3], status="complete", diverged_at=None)
    mixed = v2_campaign(tmp_path / "mixed", inception_x5_seed_1=complete)
    assert verdicts_v2(mixed)[4].verdict == "inconclusive" and verdicts_v2(mixed)[4].ours.startswith("2 of 3 seeds")
    none = v2_campaign(tmp_path / "none", inception_x5=complete, inception_x5_seed_1=complete,
                       inception_x5_seed_2=complete)
    assert verdicts_v2(none)[4].verdict == "not held"


def test_v2_claim_5_inconclusive_and_not_held(tmp_path):
    near = v2_campaign(tmp_path / "near", inception_sigmoid=dict(top1=[0.1, 0.19, 0.1]),
                       inception_sigmoid_seed_1=dict(top1=[0.1, 0.21, 0.1]),
                       inception_sigmoid_seed_2=dict(top1=[0.1, 0.20, 0.1]))  # 20% +- 1.15 points
    assert verdicts_v2(near)[5].verdict == "inconclusive"
    above = v2_campaign(tmp_path / "above", inception_sigmoid=dict(top1=[0.1, 0.30, 0.1]),
                        inception_sigmoid_seed_1=dict(top1=[0.1, 0.31, 0.1]),
                        inception_sigmoid_seed_2=dict(top1=[0.1, 0.29, 0.1]))
    assert verdicts_v2(above)[5].verdict == "not held"


def test_v2_claim_6_not_testable_inconclusive_not_held(tmp_path):
    short = v2_campaign(tmp_path / "short", **{k: {**CAMPAIGN_V2[k.replace("_", " ").replace("bn x5", "bn-x5")],
                                                  "train_examples": 60_000}
                                               for k in ("bn_x5", "bn_x5_seed_1", "bn_x5_seed_2")})
    found = verdicts_v2(short)[6]
    assert found.verdict == "not testable at this scale" and "= 0.43 epochs, under 3" in found.ours
    assert verdicts(short)[6].verdict == "held"  # v1 had no such criterion
    level = v2_campaign(tmp_path / "level", shards_only=flat(140, 0.85, 200, 10),
                        shards_only_seed_1=flat(140, 0.84, 200, 10), shards_only_seed_2=flat(140, 0.86, 200, 10))
    assert verdicts_v2(level)[6].verdict == "inconclusive"
    better = v2_campaign(tmp_path / "better", shards_only=flat(140, 0.90, 200, 10),
                         shards_only_seed_1=flat(140, 0.89, 200, 10), shards_only_seed_2=flat(140, 0.91, 200, 10))
    assert verdicts_v2(better)[6].verdict == "not held"
    unknown = v2_campaign(tmp_path / "unknown", bn_x5=dict(train_examples=None))
    assert verdicts_v2(unknown)[6].verdict == "inconclusive" and "not recorded" in verdicts_v2(unknown)[6].ours


def test_v2_claim_7_by_mcnemar(tmp_path):
    tie = v2_campaign(tmp_path / "tie")  # 4 images: no difference can be significant
    write_ensemble(tie, "e", ENSEMBLE_HELD)
    assert verdicts(tie)[7].verdict == "held" and verdicts_v2(tie)[7].verdict == "inconclusive"
    worse = v2_campaign(tmp_path / "worse")  # m1 breaks 12 images at 144 crops: p = 2 / 4096 < 0.05 / 2
    write_ensemble(worse, "e", {**ENSEMBLE_V2_HELD, ("m1", 1): set(range(0, 8)), ("m1", 144): set(range(0, 20))},
                   labels=IMAGES_40)
    found = verdicts_v2(worse)[7]
    assert found.verdict == "not held"
    assert "(a) multicrop: not held" in found.ours and "(b) ensemble: held" in found.ours
    assert "m1 20.00% -> 50.00% (b 0, c 12, p 0.000488)" in found.ours
    no_gain = v2_campaign(tmp_path / "no-gain")  # m2 right everywhere at 144 crops: as good as the ensemble
    write_ensemble(no_gain, "e", {**ENSEMBLE_V2_HELD, ("m2", 144): set()}, labels=IMAGES_40)
    assert verdicts(no_gain)[7].verdict == "not held"  # v1: not lower than every member
    assert verdicts_v2(no_gain)[7].verdict == "inconclusive" and "(b 0, c 0, p 1)" in verdicts_v2(no_gain)[7].ours


def test_v2_at_profile_paper_inception_never_reaching_is_a_lower_bound(tmp_path):
    results = tmp_path / "results"  # 72.2% fixed; Inception's three seeds end at 50%: from their last step on
    for seed in range(3):
        write_run(results, f"inception-{seed}", "inception", [0, 1400], [0.0, 0.5], seed=seed, profile="paper",
                  compression=None)
        write_run(results, f"bn-x5-{seed}", "bn-x5", [0, 100, 200], [0.0, 0.6 + 0.1 * (seed != 1), 0.74],
                  seed=seed, profile="paper", compression=None)  # reaches 72.2% at 100/200/100
    found = verdicts_v2(results, "paper")
    assert found[2].verdict == "held" and "to ∞" in found[2].ours  # 1,400 / 200 at worst, no upper bound
    assert "INCEPTION never/never/never" in found[2].ours and found[1].verdict == "not run"


# One data set per profile --------------------------------------------------------------------------------------------

def test_claims_judge_only_the_runs_and_ensemble_on_the_profiles_chosen_data(tmp_path):
    """A newer campaign at the same profile on other data: its record chooses its data; the older runs (the full
    campaign above, on "fabricated" data) and an ensemble on other data are judged nowhere."""
    results = campaign(tmp_path / "results")
    write_ensemble(results, "old-ensemble", ENSEMBLE_HELD)
    manifest = results / "ensemble" / "old-ensemble" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "dataset": "fabricated"}))
    identity = {"name": "CIFAR-10 python batches", "format": "cifar", "classes": CLASSES, "train_examples": 5000,
                "val_examples": 1000, "digest": "c1" * 32}
    record = results / "campaign" / "cpu-new"
    record.mkdir(parents=True)
    (record / "manifest.json").write_text(json.dumps({
        "experiment": "campaign", "status": "running", "started": "2026-01-05T00:00:00+00:00", "profile": "cpu",
        "data_identity": identity, "plan": []}))
    new = write_run(results, "cpu-new-inception", "inception", [0, 100], [0.1, 0.3])
    (new / "manifest.json").write_text(json.dumps({**json.loads((new / "manifest.json").read_text()),
                                                   "data_identity": identity}))
    shown, other = select(results)
    rows = latest_per_recipe(shown)["cpu"]
    assert list(rows) == ["inception"] and rows["inception"].max_top1 == 0.3 and len(other) == len(CAMPAIGN)
    assert common.ensemble_at(results, "cpu") is None  # the ensemble is on "fabricated" data too
    build(results, tmp_path / "report")
    md = (tmp_path / "report" / "claims.md").read_text()
    cpu = md.split("## Profile `cpu`")[1]
    assert f"{len(CAMPAIGN)} finished runs at this profile on other data (fabricated): not judged" in cpu
    assert "v2's target T: 30.00%" in cpu and "no finished ensemble run at profile `cpu`" in cpu
    ensemble_md = (tmp_path / "report" / "ensemble.md").read_text()
    assert "Made before this campaign, on other data (fabricated), not shown: `ensemble/old-ensemble`" in ensemble_md
