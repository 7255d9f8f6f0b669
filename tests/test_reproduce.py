"""`bnrepro reproduce`: the campaign's plan (order, finished runs kept, an interrupted one resumed, runs on other
data never kept), the commit it runs (a dirty checkout refused), its record, and a short campaign through the CLI on
generated data."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
import yaml
from conftest import FILES, write_mnist
from typer.testing import CliRunner

from bnrepro import cli, recipes
from bnrepro.cli import app
from bnrepro.data import sources
from bnrepro.engine.trainer import Interrupted
from bnrepro.errors import UserError
from bnrepro.experiments import reproduce as campaign
from bnrepro.paper import PAPER, CampaignProfile

CLEAN = "c1ea0000000000000000000000000000000000c0"


@pytest.fixture(autouse=True)
def clean_checkout(monkeypatch):
    """The checkout these tests run in may hold anyone's uncommitted work: the campaign reads a clean commit."""
    monkeypatch.setattr(campaign, "git_commit", lambda: CLEAN)


def test_the_campaign_is_every_run_at_seed_0_then_1_then_2_then_the_members():
    """Claims v2 need 3 seeds of every recipe they compare; seed-major order, so a campaign stopped part way has
    every recipe at its first seeds."""
    runs = campaign.campaign()
    names = [(Path(r.recipe).stem, r.seed, r.overrides) for r in runs]
    first = [(name, 0, ()) for name in ("inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid",
                                        "inception-sigmoid", "inception-x5")]
    first.append(("bn-x5", 0, ("train.shuffle=shards",)))
    assert names[:8] == first  # Figs. 2-3, then change 6 alone
    assert names[8:24] == [(n, seed, o) for seed in (1, 2) for n, _, o in first]
    assert [n for n, _, _ in names[-6:]] == [f"bn-x30-member{i}" for i in range(1, 7)]
    assert len(names) == 30 and len(set(names)) == len(names)


def test_the_ensemble_takes_every_validation_image_unless_told_or_the_campaign_names_a_limit():
    """The campaign's per-profile default (bnrepro/paper.yaml; none names one now), which --val-limit overrides; the
    CLI only passes it."""
    assert campaign.val_limit("cpu") is None and campaign.val_limit("cpu", 8) == 8
    assert campaign.val_limit("paper") is None and campaign.val_limit("smoke", 8) == 8
    limited = PAPER.campaign.model_copy(update={"profiles": {"cpu": CampaignProfile(val_limit=1000)}})
    assert limited.val_limit("cpu") == 1000 and limited.val_limit("paper") is None
    assert limited.val_limit_text() == "1,000 at cpu, all elsewhere"
    command = typer.main.get_command(app).commands["reproduce"]
    (option,) = [p for p in command.params if p.name == "val_limit"]
    assert option.default is None and f": {PAPER.campaign.val_limit_text()})" in option.help  # from the same data


def _fake_run(results: Path, planned: campaign.Planned, profile: str, status: str, checkpoint: bool = False,
              data: dict | None = None, legacy: bool = False) -> Path:
    """A run folder as `bnrepro imagenet` leaves it; ``data``: more manifest keys (its data's identity...);
    ``legacy``: as runs recorded before manifests carried the training digest (their recipe.yaml says it)."""
    recipe = recipes.load(planned.recipe, list(planned.overrides))
    folder = results / "imagenet" / f"{Path(planned.recipe).stem}-{len(list(results.glob('imagenet/*')))}"
    folder.mkdir(parents=True)
    started = f"2026-12-01T00:00:{len(list(results.glob('*/*'))):02d}"  # in the order they were made
    manifest = {"experiment": "imagenet", "status": status, "recipe": Path(planned.recipe).stem,
                "recipe_digest": recipe.digest, "recipe_training_digest": recipe.training_digest(profile),
                "profile": profile, "seed": planned.seed, "overrides": list(planned.overrides), "started": started,
                "git_commit": "01d", **(data or {})}
    if legacy:
        del manifest["recipe_training_digest"]
    (folder / "recipe.yaml").write_text(recipes.to_yaml(recipe))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    if status in ("complete", "diverged"):  # what a finished run also holds (the plan keeps only readable ones)
        (folder / "summary.json").write_text(json.dumps({"label": recipe.label, "max_top1": 0.5, "diverged_at": None}))
        (folder / "metrics.csv").write_text("step,train_loss,top1,top5\n0,,0.1,0.5\n")
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"")
    return folder


def test_a_run_counts_by_its_own_recipe_yaml_checked_against_its_manifest(tmp_path):
    """A run's training digest comes from its recipe.yaml, checked against the manifest's whole-recipe digest: an
    edited recipe.yaml counts for nothing (as a resume refuses it); a recipe.yaml from before ImageNet recipes had
    ``eval`` is a run that evaluated with the moving averages, not today's recipe; without a recipe.yaml the
    manifest's training digest decides, and without either its whole-recipe digest."""
    runs = campaign.campaign()
    edited, pre_eval, no_yaml, bare = (_fake_run(tmp_path, runs[i], "smoke", "complete") for i in range(4))
    yaml_file = edited / "recipe.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("description: ", "description: edited ", 1))
    tree = yaml.safe_load((pre_eval / "recipe.yaml").read_text())
    del tree["eval"]
    (pre_eval / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    old = recipes.ImagenetRecipe.model_validate(tree)
    manifest = json.loads((pre_eval / "manifest.json").read_text())
    manifest.pop("recipe_training_digest")
    manifest["recipe_digest"] = recipes.recorded_digest(old, tree)  # as such a run computed it: without eval
    (pre_eval / "manifest.json").write_text(json.dumps(manifest))
    (no_yaml / "recipe.yaml").unlink()
    (bare / "recipe.yaml").unlink()
    manifest = json.loads((bare / "manifest.json").read_text())
    manifest.pop("recipe_training_digest")
    (bare / "manifest.json").write_text(json.dumps(manifest))
    found = {folder: recipes.trained(folder, json.loads((folder / "manifest.json").read_text()))
             for folder in (edited, pre_eval, no_yaml, bare)}
    assert found[edited] == recipes.Trained(None, None, "smoke")
    today = recipes.load(runs[1].recipe).training_digest("smoke")
    assert found[pre_eval].digest == old.training_digest("smoke") != today
    assert found[no_yaml].digest == recipes.load(runs[2].recipe).training_digest("smoke")
    assert found[bare].digest is None and found[bare].matches(recipes.load(runs[3].recipe))
    states = {s.run: (s.state, s.folder) for s in campaign.plan("smoke", tmp_path)}
    assert [states[r] for r in runs[:4]] == [("new", None), ("new", None), ("done", no_yaml), ("done", bare)]


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
    resumed = next(s for s in steps if s.run == runs[2])
    assert resumed.trained == 0 and resumed.todo == resumed.steps  # its (fake) checkpoint cannot be read
    torch.save({"step": 3}, paused / "checkpoint.pt")  # the step a run's checkpoint holds, as the trainer saves it
    resumed = next(s for s in campaign.plan("smoke", tmp_path) if s.run == runs[2])
    assert (resumed.trained, resumed.todo) == (3, resumed.steps - 3)
    assert states[runs[1]][0] == states[runs[3]][0] == states[runs[4]][0] == "new"
    shards_only = next(r for r in runs if r.overrides)  # bn-x5 with train.shuffle=shards: its own digest
    assert states[shards_only] == ("new", None)
    assert all(s.steps == recipes.load(s.run.recipe).profiles["smoke"].steps for s in steps)


def test_rewording_a_recipe_keeps_its_finished_runs_and_changing_what_it_trains_does_not(tmp_path, monkeypatch):
    """Runs match a recipe by its training digest: all of the resolved recipe but its prose. Rewording the base
    recipe's description and every assumption's source (all seven recipes extend it) keeps their finished runs, those
    that record the training digest and those from before it (read from their recipe.yaml); changing a trained
    value does not."""
    runs = campaign.campaign()
    recorded = _fake_run(tmp_path, runs[0], "smoke", "complete")
    legacy = _fake_run(tmp_path, runs[1], "smoke", "complete", legacy=True)
    edited = tmp_path / "recipes"
    shutil.copytree(recipes.RECIPES_DIR, edited)
    base = edited / "imagenet" / "inception.yaml"
    tree = yaml.safe_load(base.read_text())
    tree["description"] = "reworded: " + tree["description"]
    tree["assumptions"] = {key: "reworded" for key in tree["assumptions"]}
    base.write_text(yaml.safe_dump(tree, sort_keys=False))
    monkeypatch.setattr(recipes, "RECIPES_DIR", edited)
    assert recipes.load(runs[0].recipe).digest != json.loads((recorded / "manifest.json").read_text())["recipe_digest"]
    states = {s.run: (s.state, s.folder) for s in campaign.plan("smoke", tmp_path)}
    assert states[runs[0]] == ("done", recorded) and states[runs[1]] == ("done", legacy)
    child = edited / "imagenet" / "bn-baseline.yaml"  # what BN-Baseline trains, not Inception
    child.write_text(child.read_text() + "\ntrain:\n  lr: 0.002\n")
    states = {s.run: (s.state, s.folder) for s in campaign.plan("smoke", tmp_path)}
    assert runs[1].recipe.endswith("bn-baseline")
    assert states[runs[0]] == ("done", recorded) and states[runs[1]] == ("new", None)


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


def test_two_jobs_train_the_runs_one_job_trains_in_worker_processes(two_runs, tmp_path):
    """--jobs 2: the same two runs, each in a spawned worker on half the CPU threads, the same numbers (to the
    float rounding a thread count may change), the plan's order kept."""
    data = write_mnist(tmp_path / "data", n_train=96, n_test=24) / "mnist" / "raw"
    found = {}
    for jobs in (1, 2):
        results = tmp_path / f"results-{jobs}"
        args = ["reproduce", "--profile", "smoke", "--dataset-dir", str(data), "--results", str(results),
                "--device", "cpu", "--no-progress", "--val-limit", "4", "--jobs", str(jobs)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.output.index("campaign run 1/2: bn-x5") < result.output.index("campaign run 2/2: bn-x30")
        (record,) = (results / "campaign").iterdir()
        runs = json.loads((record / "manifest.json").read_text())["runs"]
        found[jobs] = [pd.read_csv(results / r["folder"] / "metrics.csv") for r in runs]
        manifests = [json.loads((results / r["folder"] / "manifest.json").read_text()) for r in runs]
        assert [m["recipe"] for m in manifests] == ["bn-x5", "bn-x30"]
        assert all(m["status"] == "complete" and m["git_commit"] == CLEAN for m in manifests)
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert all(f"{threads} threads" in json.loads(p.read_text())["device"]
               for p in (tmp_path / "results-2" / "imagenet").glob("*/manifest.json"))
    for one, two in zip(found[1], found[2]):
        pd.testing.assert_frame_equal(one, two, rtol=1e-4)


def test_a_runs_interruption_crosses_from_its_worker_process_whole():
    """A worker's Interrupted reaches the campaign with its step and folder (said in the Ctrl-C line)."""
    again = pickle.loads(pickle.dumps(Interrupted(12, Path("results/imagenet/bn-x5-1/checkpoint.pt"))))
    assert isinstance(again, Interrupted) and again.step == 12
    assert again.path == Path("results/imagenet/bn-x5-1/checkpoint.pt") and str(again) == "interrupted at step 12"


def test_while_workers_train_sigterm_or_ctrl_c_interrupts_the_campaign_and_then_the_handlers_return():
    """A campaign in the background ignores Ctrl-C (its shell set SIGINT to ignored): SIGTERM stops it as Ctrl-C."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in before:
        with pytest.raises(KeyboardInterrupt), campaign.stop_signals():
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs between bytecodes: this never ends normally
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_two_run_changes_study_trains_each_run_in_its_home_with_no_ensemble(monkeypatch, tmp_path):
    """--study changes: a run the campaign also makes trains where the campaign's runs live (so the campaign keeps
    it), the study's own under results/changes/, its record there too; no ensemble; the study's report."""
    from bnrepro.experiments import changes

    short = [campaign.Planned("imagenet/bn-x5"),
             campaign.Planned("imagenet/bn-x5", overrides=("train.lr=0.0015",), home=changes.HOME)]
    monkeypatch.setattr(changes, "runs", lambda profile, seeds: short)
    data = write_mnist(tmp_path / "data", n_train=96, n_test=24) / "mnist" / "raw"
    results = tmp_path / "results"
    result = CliRunner().invoke(app, ["reproduce", "--study", "changes", "--profile", "smoke", "--dataset-dir",
                                      str(data), "--results", str(results), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "changes study at profile smoke: 2 runs, then the report" in result.output
    (kept,) = (results / "imagenet").iterdir()
    (own,) = (results / "changes" / "imagenet").iterdir()
    assert json.loads((own / "manifest.json").read_text())["overrides"] == ["train.lr=0.0015"]
    (record,) = (results / "changes" / "campaign").iterdir()
    manifest = json.loads((record / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["ensemble"] is None
    assert [r["folder"] for r in manifest["runs"]] == [f"imagenet/{kept.name}", f"changes/imagenet/{own.name}"]
    assert not (results / "ensemble").exists() and not (results / "campaign").exists()
    assert (results / "report" / "changes.md").is_file()
    assert "train.lr=0.0015" not in (results / "report" / "imagenet.md").read_text()
    assert campaign.plan("smoke", results, None, [campaign.Planned("imagenet/bn-x5")])[0].state == "done"


def test_study_must_be_one_of_the_studies(tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "--study", "lr", "--results", str(tmp_path)])
    assert isinstance(result.exception, UserError) and "--study must be one of paper, changes" in str(result.exception)


def test_jobs_must_be_one_or_more(tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "--profile", "smoke", "--results", str(tmp_path), "--jobs", "0"])
    assert isinstance(result.exception, UserError) and "--jobs must be 1 or more" in str(result.exception)
    assert not tmp_path.joinpath("campaign").exists()  # refused before anything was written


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
    identity = sources.data_identity(data)
    assert manifest["data_identity"] == identity
    for name in ("imagenet.md", "ensemble.md", "claims.md"):
        assert (results / "report" / name).is_file(), name
        assert str(tmp_path) not in (results / "report" / name).read_text()  # no folder of this machine
    (record,) = (results / "campaign").iterdir()
    kept = json.loads((record / "manifest.json").read_text())
    assert kept["status"] == "complete" and kept["git_commit"] == CLEAN and kept["data_identity"] == identity
    assert [r["state"] for r in kept["runs"]] == ["trained", "trained"]
    assert kept["ensemble"] == f"ensemble/{ensemble.name}"
    assert f"the code of commit `{CLEAN[:12]}`" in (results / "report" / "imagenet.md").read_text()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("finished earlier, kept") == 2
    assert sorted((results / "imagenet").iterdir()) == folders and len(list((results / "ensemble").iterdir())) == 1
    latest = json.loads((sorted((results / "campaign").iterdir())[-1] / "manifest.json").read_text())
    assert [r["state"] for r in latest["runs"]] == ["kept", "kept"] and latest["other_commits"] == []
    dry = CliRunner().invoke(app, [*args, "--dry-run"])  # nothing left, the ensemble kept: no measurement, no "0 min"
    assert dry.exit_code == 0 and "no run left to train" in dry.output and "images/s" not in dry.output, dry.output
    shutil.rmtree(ensemble)  # every run done but no ensemble: its time is measured and counted, not "0 min"
    dry = CliRunner().invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0 and "training and evaluation 0 min, ensemble " in dry.output, dry.output


def test_the_estimate_measures_the_ensembles_rate_when_no_run_is_left_and_nothing_for_a_study():
    guess = campaign.estimate([], "smoke", "cpu", 8, updates=1)
    assert guess["training_and_evaluation_s"] == 0 and guess["ensemble_s"] > 0 and len(guess["images_per_second"]) == 1
    guess = campaign.estimate([], "smoke", "cpu", 8, updates=1, with_ensemble=False)
    assert guess["total_s"] == 0 and guess["images_per_second"] == {} and guess["multiply_adds"] is None


def test_a_dry_run_of_a_finished_study_says_no_run_is_left(monkeypatch, tmp_path):
    from bnrepro.experiments import changes
    monkeypatch.setattr(changes, "runs", lambda profile, seeds: [])  # every planned run done, as far as it knows
    result = CliRunner().invoke(app, ["reproduce", "--study", "changes", "--profile", "smoke", "--results",
                                      str(tmp_path), "--dry-run", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "no run left to train; only the report would be written" in result.output and "images/s" not in result.output


def test_dry_run_prints_the_plan_and_an_estimate_and_trains_nothing(two_runs, tmp_path):
    result = CliRunner().invoke(app, ["reproduce", "--profile", "smoke", "--results", str(tmp_path), "--dry-run",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert " 1. bn-x5 (seed 0)" in result.output and "estimate from a short measurement" in result.output
    assert not (tmp_path / "imagenet").exists()


# --- runs tied to their data ---------------------------------------------------------------------------------


def _altered(raw: Path) -> None:
    """Change one pixel of the training images in place: the same classes and counts, other bytes."""
    path = raw / FILES[0]
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[16] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(data)))


@pytest.fixture
def two_datasets(tmp_path) -> tuple[Path, Path]:
    """Two idx data sets with the same classes and example counts, whose bytes differ in one pixel."""
    first = write_mnist(tmp_path / "a", n_train=40, n_test=20) / "mnist" / "raw"
    second = write_mnist(tmp_path / "b", n_train=40, n_test=20) / "mnist" / "raw"
    _altered(second)
    return first, second


def test_the_data_identity_tells_apart_data_sets_that_differ_only_in_their_bytes(two_datasets, tmp_path):
    first, second = (sources.data_identity(raw) for raw in two_datasets)
    assert {k: v for k, v in first.items() if k != "digest"} == {k: v for k, v in second.items() if k != "digest"}
    assert first["digest"] != second["digest"] and first["classes"] == [str(d) for d in range(10)]
    assert (first["name"], first["format"], first["train_examples"], first["val_examples"]) == \
        ("MNIST idx files", "idx", 40, 20)
    copy = write_mnist(tmp_path / "elsewhere", n_train=40, n_test=20) / "mnist" / "raw"
    assert sources.data_identity(copy) == first  # where the files lie is not part of it


def test_the_identity_of_class_folders_is_their_listing_not_their_contents(tmp_path):
    def folders(root: Path, size: int = 3) -> Path:
        for split, n in (("train", 2), ("val", 1)):
            for name in ("cat", "dog"):
                for i in range(n):
                    (root / split / name).mkdir(parents=True, exist_ok=True)
                    (root / split / name / f"{i}.png").write_bytes(bytes(size))
        return root

    first = sources.data_identity(folders(tmp_path / "a"))
    assert (first["format"], first["classes"], first["train_examples"], first["val_examples"]) == \
        ("folders", ["cat", "dog"], 4, 2)
    assert sources.data_identity(folders(tmp_path / "b"))["digest"] == first["digest"]  # same names and sizes
    assert sources.data_identity(folders(tmp_path / "c", size=4))["digest"] != first["digest"]  # other sizes
    (tmp_path / "b" / "train" / "cat" / "0.png").rename(tmp_path / "b" / "train" / "cat" / "9.png")
    assert sources.data_identity(tmp_path / "b")["digest"] != first["digest"]  # a file renamed


def test_the_plan_keeps_only_runs_on_the_same_data(two_datasets, tmp_path):
    first, second = two_datasets
    identity = sources.data_identity(first)
    results = tmp_path / "results"
    runs = campaign.campaign()
    _fake_run(results, runs[0], "smoke", "complete", data={"data_identity": identity})
    steps = campaign.plan("smoke", results, identity)
    assert steps[0].state == "done" and steps[0].other_data == 0
    other = campaign.plan("smoke", results, sources.data_identity(second))
    assert other[0].state == "new" and other[0].other_data == 1
    assert "1 run of it on other data, not kept" in campaign.describe(other)[0]
    assert campaign.plan("smoke", results)[0].state == "done"  # no data given (a dry run): not checked


def test_a_run_without_data_identity_is_kept_only_if_its_folder_still_holds_the_same_data(two_datasets, tmp_path):
    first, second = two_datasets
    identity = sources.data_identity(first)
    runs = campaign.campaign()
    recorded = {"classes": identity["classes"], "train_examples": 40, "dataset_dir": str(first)}
    cases = {
        "the same files": (recorded, "done"),
        "other bytes": ({**recorded, "dataset_dir": str(second)}, "new"),
        "a folder that is gone": ({**recorded, "dataset_dir": str(tmp_path / "gone")}, "new"),
        "other classes": ({**recorded, "classes": ["T-shirt-top", *identity["classes"][1:]]}, "new"),
        "another count": ({**recorded, "train_examples": 60_000}, "new"),
        "no folder": ({k: v for k, v in recorded.items() if k != "dataset_dir"}, "new"),
    }
    for what, (manifest, state) in cases.items():
        results = tmp_path / what.replace(" ", "-")
        _fake_run(results, runs[0], "smoke", "complete", data=manifest)
        assert campaign.plan("smoke", results, identity)[0].state == state, what


def test_an_interrupted_run_on_other_data_is_not_resumed(two_datasets, tmp_path):
    first, second = two_datasets
    runs = campaign.campaign()
    _fake_run(tmp_path, runs[0], "smoke", "interrupted", checkpoint=True,
              data={"data_identity": sources.data_identity(first)})
    assert campaign.plan("smoke", tmp_path, sources.data_identity(first))[0].state == "resume"
    assert campaign.plan("smoke", tmp_path, sources.data_identity(second))[0].state == "new"


# --- the code's commit and the campaign's record ---------------------------------------------------------------


def test_a_dirty_checkout_is_refused_unless_allowed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(campaign, "git_commit", lambda: CLEAN + "+dirty")
    with pytest.raises(UserError, match="uncommitted changes"):
        campaign.load_code()
    assert campaign.load_code(allow_dirty=True) == CLEAN + "+dirty"
    data = write_mnist(tmp_path / "data", n_train=20, n_test=10) / "mnist" / "raw"
    monkeypatch.setattr(sys, "argv", ["bnrepro", "reproduce", "--profile", "smoke", "--dataset-dir", str(data),
                                      "--results", str(tmp_path / "results")])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("error: the checkout has uncommitted changes")
    assert "--allow-dirty" in err and len(err.strip().splitlines()) <= 2 and "Traceback" not in err
    assert not (tmp_path / "results").exists()  # refused before anything was written


def test_dry_run_needs_no_clean_checkout(monkeypatch, two_runs, tmp_path):
    monkeypatch.setattr(campaign, "git_commit", lambda: CLEAN + "+dirty")
    nothing = {"images_per_second": {}, "training_and_evaluation_s": 0, "ensemble_s": 0, "total_s": 0}
    monkeypatch.setattr(campaign, "estimate", lambda *args, **kw: nothing)
    result = CliRunner().invoke(app, ["reproduce", "--profile", "smoke", "--results", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "not checked against the data" in result.output


def test_the_record_names_the_campaigns_commit_and_runs_whose_manifest_names_another(tmp_path):
    runs = campaign.campaign()[:3]
    kept = _fake_run(tmp_path, runs[0], "smoke", "complete")  # an earlier campaign's: its own commit is right
    steps = campaign.plan("smoke", tmp_path)[:3]
    record = campaign.Record(tmp_path, "smoke", CLEAN + "+dirty", None, tmp_path, steps)
    trained = _fake_run(tmp_path, runs[1], "smoke", "complete")  # its manifest says 01d, not the campaign's code
    same = _fake_run(tmp_path, runs[2], "smoke", "complete", data={"git_commit": CLEAN + "+dirty"})
    warnings = record.finish([kept, trained, same], tmp_path / "ensemble" / "e")
    assert len(warnings) == 1 and trained.name in warnings[0] and "01d" in warnings[0]
    saved = json.loads((record.folder / "manifest.json").read_text())
    assert saved["dirty_allowed"] and saved["git_commit"] == CLEAN + "+dirty" and saved["status"] == "complete"
    assert [r["state"] for r in saved["runs"]] == ["kept", "trained", "trained"]
    assert saved["runs"][0]["folder"] == f"imagenet/{kept.name}" and saved["other_commits"] == warnings
