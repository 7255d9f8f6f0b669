"""`bnrepro ensemble` on CPU with small trained members: 1/10/144 crops, averaging, the probability cache and
its recombination, agreement with the trainer's own evaluation, and bad members (clear error, exit code 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import SHARED_DATA
from test_cli import cli_env, run_many
from test_imagenet import write_images

from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.errors import UserError
from bnrepro.evaluate import ensemble as evaluation
from bnrepro.experiments import imagenet as experiment

MEMBERS = ["imagenet/ensemble/bn-x30-member1", "imagenet/ensemble/bn-x30-member6"]  # plain, and per-activation BN
SMOKE = ["profile=smoke", f"members=[{', '.join(MEMBERS)}]"]


def train(recipe: str, data: Path, out: Path, steps: int = 3) -> Path:
    options = experiment.Options(data, device="cpu", workers=0, show_progress=False)
    return experiment.run(recipe, "smoke", [f"profiles.smoke.steps={steps}"], options, out, SINGLE_PROCESS)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    data = write_images(root / "data", ["cat", "dog", "owl"], {"train": 8, "val": 4})
    runs = [train(name, data, root / "results") for name in MEMBERS]
    return root, data, runs


@pytest.fixture(scope="module")
def evaluated(trained):
    root, data, _ = trained
    run = evaluation.run("ensemble/bn-inception", SMOKE + ["crops=[1, 10, 144]"], root / "results", data,
                         root / "results", "cpu", 0, show_progress=False)
    return run


def test_every_member_and_the_ensemble_get_a_row_per_crop_scheme(evaluated):
    results = pd.read_csv(evaluated / "results.csv")
    assert len(results) == 3 * 3  # (2 members + ensemble) x (1, 10, 144 crops)
    assert set(results["crops"]) == {1, 10, 144} and set(results["models"]) == {1, 2}
    assert ((results["top1_error"] >= results["top5_error"]) & (results["top1_error"] <= 1)).all()
    manifest = json.loads((evaluated / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["val_images"] == 12
    assert [m["name"] for m in manifest["members"]] == ["bn-x30-member1", "bn-x30-member6"]


def test_the_ensemble_is_the_mean_of_the_cached_member_probabilities(evaluated):
    cached = evaluation.load_cache(evaluated)
    a, b = cached[("bn-x30-member1", 144)], cached[("bn-x30-member6", 144)]
    assert a["probs"].shape == (12, 3) and torch.allclose(a["probs"].float().sum(1), torch.ones(12), atol=1e-2)
    mean, labels = evaluation.combine(cached, ["bn-x30-member1", "bn-x30-member6"], 144)
    torch.testing.assert_close(mean, (a["probs"].float() + b["probs"].float()) / 2)
    results = pd.read_csv(evaluated / "results.csv")
    row = results[(results.models == 2) & (results.crops == 144)].iloc[0]
    assert (row.top1_error, row.top5_error) == pytest.approx(evaluation.errors(mean, labels))
    recombined = evaluation.table(cached, ["bn-x30-member6"], [10])  # any subset, without running a network
    assert recombined.iloc[0].top1_error == pytest.approx(
        results[(results.members == "bn-x30-member6") & (results.crops == 10)].iloc[0].top1_error)


def test_single_crop_agrees_with_the_trainers_own_evaluation(trained, evaluated):
    """1 crop through the folded (Alg. 2) network = the trainer's last single-crop evaluation of that run."""
    _, _, runs = trained
    results = pd.read_csv(evaluated / "results.csv")
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        row = results[(results.members == summary["recipe"]) & (results.crops == 1)].iloc[0]
        assert 1 - row.top1_error == pytest.approx(summary["final_top1"], abs=1 / 12 + 1e-9)


def test_members_come_from_explicit_run_folders_too(trained, tmp_path):
    root, data, runs = trained
    run = evaluation.run("ensemble/bn-inception", ["profile=smoke", "crops=[1]"], tmp_path, data, tmp_path, "cpu",
                         0, member_runs=runs[:1], show_progress=False)
    assert pd.read_csv(run / "results.csv")["members"].tolist() == ["bn-x30-member1"]


def test_a_missing_run_checkpoint_or_mismatched_member_is_a_clear_error(trained, tmp_path):
    root, data, runs = trained
    with pytest.raises(UserError, match="no finished run of 'bn-x30-member2'"):
        evaluation.run("ensemble/bn-inception", ["profile=smoke"], root / "results", data, tmp_path, "cpu", 0,
                       show_progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(runs[0], broken)
    (broken / "checkpoint.pt").unlink()
    with pytest.raises(UserError, match="no checkpoint"):
        evaluation.load_member(broken, torch.device("cpu"))
    recipe = yaml.safe_load((broken / "recipe.yaml").read_text())
    recipe["model"]["per_activation_bn"] = True  # the recipe no longer describes the saved network
    (broken / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.copy(runs[0] / "checkpoint.pt", broken / "checkpoint.pt")
    with pytest.raises(UserError, match="does not fit"):
        evaluation.load_member(broken, torch.device("cpu"))
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        evaluation.load_member(broken, torch.device("cpu"))


def test_bad_ensemble_input_through_the_cli_is_one_line_and_exit_code_2(trained, tmp_path):
    root, data, runs = trained
    common = ["ensemble", "--results", str(root / "results"), "--out", str(tmp_path), "--device", "cpu",
              "--workers", "0", "--no-progress"]
    found = run_many({
        "no-data": common,
        "no-member-run": [*common, "--dataset-dir", str(data), "--set", "profile=smoke"],
        "not-a-run": [*common, "--dataset-dir", str(data), "--member", str(tmp_path)],
    }, cli_env(tmp_path / "cache"))
    for name, message in [("no-data", "--dataset-dir"), ("no-member-run", "no finished run"),
                          ("not-a-run", "not a `bnrepro imagenet` run folder")]:
        assert found[name].returncode == 2, found[name].stderr
        assert message in found[name].stderr and "Traceback" not in found[name].stderr


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-sample").is_dir(), reason="shared/data/imagenet-sample is absent")
def test_the_real_imagenet_sample_is_evaluated_with_standard_labels(tmp_path):
    """A member trained on folders named by wnid has the 1000 classes; the 250 real photos keep their labels."""
    data = write_images(tmp_path / "data", ["n01440764", "n01494475"], {"train": 4, "val": 1})
    run = train(MEMBERS[0], data, tmp_path / "results", steps=1)
    out = evaluation.run("ensemble/bn-inception", ["profile=smoke", "crops=[1]"], tmp_path, SHARED_DATA /
                         "imagenet-sample", tmp_path, "cpu", 0, member_runs=[run], show_progress=False)
    cached = evaluation.load_cache(out)[("bn-x30-member1", 1)]
    assert cached["probs"].shape == (250, 1000)
    assert cached["labels"].tolist() == list(range(0, 1000, 4)) and cached["indices"].tolist() == list(range(250))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_gives_the_cpus_errors(trained, evaluated, tmp_path):
    root, data, _ = trained
    run = evaluation.run("ensemble/bn-inception", SMOKE + ["crops=[1, 10, 144]"], root / "results", data, tmp_path,
                         "cuda", 2, show_progress=False)
    on_gpu, on_cpu = (evaluation.load_cache(r) for r in (run, evaluated))
    for key, part in on_cpu.items():  # bf16 autocast on the GPU: probabilities agree to about 1e-2
        torch.testing.assert_close(on_gpu[key]["probs"].float(), part["probs"].float(), atol=3e-2, rtol=0)
