"""`bnrepro reproduce`: the campaign's plan (order, finished runs kept, an interrupted one resumed) and a short
campaign through the CLI on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_mnist
from typer.testing import CliRunner

from bnrepro import recipes
from bnrepro.cli import app
from bnrepro.experiments import imagenet
from bnrepro.experiments import reproduce as campaign


def test_the_campaign_is_figures_2_3_then_the_changes_alone_and_the_seeds_then_the_members():
    runs = campaign.campaign()
    names = [(Path(r.recipe).stem, r.seed, r.overrides) for r in runs]
    assert names[:7] == [(name, 0, ()) for name in ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid",
                                                     "inception-sigmoid", "inception-x5")]
    assert ("bn-x5", 0, ("train.shuffle=shards",)) in names  # change 6 alone
    assert ("inception", 1, ()) in names and ("bn-x5", 1, ()) in names  # the seed spread
    assert [n for n, _, _ in names[-6:]] == [f"bn-x30-member{i}" for i in range(1, 7)]
    assert len(set(names)) == len(names)


def _fake_run(results: Path, planned: campaign.Planned, profile: str, status: str, checkpoint: bool = False) -> Path:
    recipe = recipes.load(planned.recipe, list(planned.overrides))
    folder = results / "imagenet" / f"{Path(planned.recipe).stem}-{len(list(results.glob('imagenet/*')))}"
    folder.mkdir(parents=True)
    started = f"2026-12-01T00:00:{len(list(results.glob('*/*'))):02d}"  # in the order they were made
    manifest = {"experiment": "imagenet", "status": status, "recipe": Path(planned.recipe).stem,
                "recipe_digest": recipe.digest, "profile": profile, "seed": planned.seed,
                "overrides": list(planned.overrides), "started": started}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if checkpoint:
        (folder / imagenet.CHECKPOINT).write_bytes(b"")
    return folder


def test_the_plan_keeps_finished_runs_resumes_interrupted_ones_and_starts_the_rest(tmp_path):
    runs = campaign.campaign()
    done = _fake_run(tmp_path, runs[0], "smoke", "complete")
    diverged = _fake_run(tmp_path, runs[6], "smoke", "diverged")  # inception-x5: a diverged run is a result
    paused = _fake_run(tmp_path, runs[2], "smoke", "interrupted", checkpoint=True)
    _fake_run(tmp_path, runs[3], "smoke", "interrupted")  # no checkpoint: nothing to resume, start again
    _fake_run(tmp_path, runs[1], "cpu", "complete")  # another profile
    other_seed = campaign.Planned(runs[4].recipe, seed=7)
    _fake_run(tmp_path, other_seed, "smoke", "complete")  # another seed
    steps = campaign.plan("smoke", tmp_path)
    assert [s.run for s in steps] == runs
    states = {s.run: (s.state, s.folder) for s in steps}
    assert states[runs[0]] == ("done", done) and states[runs[6]] == ("done", diverged)
    assert states[runs[2]] == ("resume", paused)
    assert states[runs[1]][0] == states[runs[3]][0] == states[runs[4]][0] == "new"
    shards_only = next(r for r in runs if r.overrides)  # bn-x5 with train.shuffle=shards: its own digest
    assert states[shards_only] == ("new", None)
    assert all(s.steps == recipes.load(s.run.recipe).profiles["smoke"].steps for s in steps)


def test_a_changed_recipe_is_trained_again(tmp_path, monkeypatch):
    runs = campaign.campaign()
    _fake_run(tmp_path, runs[0], "smoke", "complete")
    assert campaign.plan("smoke", tmp_path)[0].state == "done"
    monkeypatch.setattr(campaign, "campaign", lambda: [campaign.Planned(runs[0].recipe, overrides=("train.lr=0.1",))])
    assert campaign.plan("smoke", tmp_path)[0].state == "new"  # another digest: not the run that was kept


@pytest.fixture
def two_runs(monkeypatch):
    """The campaign cut to two runs (the ensemble then averages the two), so it trains in seconds."""
    short = [campaign.Planned("imagenet/bn-x5"), campaign.Planned("imagenet/bn-x30")]
    monkeypatch.setattr(campaign, "campaign", lambda: short)
    return short


def test_a_two_run_campaign_through_the_cli_trains_evaluates_reports_and_then_keeps_everything(two_runs, tmp_path):
    data = write_mnist(tmp_path / "data", n_train=96, n_test=24) / "mnist" / "raw"
    results = tmp_path / "results"
    args = ["reproduce", "--profile", "smoke", "--dataset-dir", str(data), "--results", str(results), "--device",
            "cpu", "--no-progress", "--val-limit", "8"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "campaign run 1/2: bn-x5 (seed 0)" in first.output and "campaign run 2/2: bn-x30 (seed 0)" in first.output
    folders = sorted((results / "imagenet").iterdir())
    assert len(folders) == 2
    assert all(json.loads((f / "manifest.json").read_text())["status"] == "complete" for f in folders)
    (ensemble,) = (results / "ensemble").iterdir()
    manifest = json.loads((ensemble / "manifest.json").read_text())
    assert manifest["val_images"] == 8 and manifest["crops"] == [1, 10, 144]
    assert {m["run"] for m in manifest["members"]} == {str(f) for f in folders}
    for name in ("imagenet.md", "ensemble.md", "claims.md"):
        assert (results / "report" / name).is_file(), name
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier, kept") == 2
    assert sorted((results / "imagenet").iterdir()) == folders and len(list((results / "ensemble").iterdir())) == 1


def test_dry_run_prints_the_plan_and_an_estimate_and_trains_nothing(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "--profile", "smoke", "--results", str(tmp_path), "--dry-run",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert " 1. bn-x5 (seed 0)" in result.output and "estimate from a short measurement" in result.output
    assert not (tmp_path / "imagenet").exists()
