"""The claims table (bnrepro.report.claims) on fabricated run folders: each rule's every verdict, on numbers made up
so that each can be checked by hand; no training, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import markdown_rows

from bnrepro.report import build, claims, imagenet

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
              diverged_at: int | None = None) -> Path:
    """A fabricated `bnrepro imagenet` run folder (manifest.json, summary.json, metrics.csv)."""
    run = results / "imagenet" / folder
    run.mkdir(parents=True)
    manifest = {"experiment": "imagenet", "status": status, "recipe": recipe, "label": recipe.upper(),
                "profile": profile, "seed": seed, "overrides": list(overrides), "replicas": 1, "global_batch": 128,
                "compression": compression, "dataset": "fabricated", "deviations": [],
                "started": "2026-01-02T00:00:00+00:00"}
    if classes is not None:
        manifest["classes"] = classes
    (run / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame({"step": steps, "optimizer_step": steps, "epoch": [s / 100 for s in steps],
                  "statistics": "moving", "train_loss": [2.0 - t for t in top1], "lr": 0.01, "top1": top1,
                  "top5": top1}).to_csv(run / "metrics.csv", index=False)
    best = max((t, s) for s, t in zip(steps, top1) if t == t)
    (run / "summary.json").write_text(json.dumps({
        "recipe": recipe, "profile": profile, "max_top1": best[0], "max_top1_step": best[1],
        "final_top1": top1[-1], "diverged_at": diverged_at, "deviations": []}))
    return run


def campaign(results: Path, drop: tuple[str, ...] = (), profile: str = "cpu", **changes: dict) -> Path:
    """The campaign above under ``results``, less ``drop``, with ``changes`` (name with _ for space -> fields)."""
    for name, spec in CAMPAIGN.items():
        if name in drop:
            continue
        spec = {**spec, **changes.get(name.replace(" ", "_").replace("-", "_"), {})}
        write_run(results, f"{profile}-{name.replace(' ', '-')}", profile=profile, **spec)
    return results


# Ensemble: 4 validation images of a 3-class set; per member and crops, the images it gets wrong.
LABELS = [0, 1, 2, 0]
RIGHT = {0: [0.8, 0.1, 0.1], 1: [0.1, 0.8, 0.1], 2: [0.1, 0.1, 0.8]}
WRONG = {0: [0.3, 0.6, 0.1], 1: [0.6, 0.3, 0.1]}  # image 0 taken for class 1, image 1 for class 0


def write_ensemble(results: Path, folder: str, wrong: dict[tuple[str, int], set[int]], *, profile: str = "cpu",
                   in_recipe_yaml: bool = True, started: str = "2026-01-03T00:00:00+00:00") -> Path:
    """A fabricated `bnrepro ensemble` run folder: manifest, results.csv, cached probabilities; the profile either
    in its recipe.yaml (as `bnrepro ensemble` writes it) or in the manifest."""
    run = results / "ensemble" / folder
    (run / "probabilities").mkdir(parents=True)
    names = sorted({name for name, _ in wrong})
    manifest = {"experiment": "ensemble", "status": "complete", "started": started, "recipe": "bn-inception",
                "members": [{"name": n, "run": str(results / "imagenet" / n)} for n in names],
                "crops": sorted({c for _, c in wrong}), "val_images": len(LABELS)}
    if in_recipe_yaml:
        (run / "recipe.yaml").write_text(f"experiment: ensemble\nprofile: {profile}\n")
    else:
        manifest["profile"] = profile
    (run / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame({"members": names, "models": 1, "crops": 1, "top1_error": 0.99, "top5_error": 0.99}
                 ).to_csv(run / "results.csv", index=False)  # not read: the cache decides, as in ensemble.md
    for (name, crops), bad in wrong.items():
        probs = [WRONG[i] if i in bad else RIGHT[label] for i, label in enumerate(LABELS)]
        torch.save({"probs": torch.tensor(probs).half(), "labels": torch.tensor(LABELS, dtype=torch.int64),
                    "indices": torch.arange(len(LABELS), dtype=torch.int64)},
                   run / "probabilities" / f"{name}-{crops}crop.pt")
    return run


# m1: 50% at 1 crop, 25% at 144; m2: 25% at 144 on another image; their mean gets every image right (0%).
ENSEMBLE_HELD = {("m1", 1): {0, 1}, ("m1", 144): {0}, ("m2", 1): {1}, ("m2", 144): {1}}


def verdicts(results: Path, profile: str = "cpu") -> dict[int, claims.Verdict]:
    rows = imagenet.latest_per_recipe(imagenet.finished_runs(results))[profile]
    found, _ = claims.judge(profile, rows, results)
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
    for text in [*claims.COMMON, *claims.RULES.values()]:
        assert text in md  # the rules, as the module states them
    assert "Seed spread: s = 2.0 points (inception seeds 0: 80.0%, 1: 79.0%; bn-x5 seeds 0: 85.0%, 1: 83.0%)." in md
    table = markdown_rows(md.split("## Profile `cpu`")[1])
    assert [row["Verdict"] for row in table.values()] == ["held"] * 7
    assert table["2"]["Paper"] == "2.1e6 steps, 14.8x fewer"


def test_nothing_run_is_not_run(tmp_path):
    results = tmp_path / "results"
    write_run(results, "only-bn-x5", "bn-x5", [0, 100], [0.1, 0.5])
    write_ensemble(results, "elsewhere", ENSEMBLE_HELD, profile="proxy")  # another profile's ensemble
    found = verdicts(results)
    assert {n: v.verdict for n, v in found.items()} == {n: "not run" for n in range(1, 8)}
    assert found[3].ours == "no finished run of `bn-x30`"
    assert found[7].ours == "no finished ensemble run at profile `cpu`"
    s, text = claims.seed_spread(imagenet.latest_per_recipe(imagenet.finished_runs(results))["cpu"])
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
