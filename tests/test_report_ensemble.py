"""The ensemble report (Fig. 4 table, crop study, per-member errors) on a fabricated ensemble run folder: the class
probabilities below are chosen by hand so that each member gets a different image wrong and their mean gets
all of them right; no network runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import markdown_rows

from bnrepro.errors import UserError
from bnrepro.paper import PAPER
from bnrepro.report import build, ensemble

LABELS = [0, 1, 2, 0]  # 4 validation images of a 3-class test set
WRONG_0 = [0.3, 0.6, 0.1]  # image 0 (class 0) taken for class 1
WRONG_1 = [0.6, 0.3, 0.1]  # image 1 (class 1) taken for class 0
RIGHT = {0: [0.8, 0.1, 0.1], 1: [0.1, 0.8, 0.1], 2: [0.1, 0.1, 0.8]}
# (member, crops) -> per-image probabilities. A alone misses image 0 at 1 crop and nothing at 144 crops; B misses
# image 1 at both; the mean of A and B gets every image right (image 0: 0.55 vs 0.35, image 1: 0.55 vs 0.35).
PROBS = {
    ("member-a", 1): [WRONG_0, RIGHT[1], RIGHT[2], RIGHT[0]],
    ("member-a", 144): [RIGHT[0], RIGHT[1], RIGHT[2], RIGHT[0]],
    ("member-b", 1): [RIGHT[0], WRONG_1, RIGHT[2], RIGHT[0]],
    ("member-b", 144): [RIGHT[0], WRONG_1, RIGHT[2], RIGHT[0]],
}


def write_run(results: Path, folder: str, *, status: str = "complete", started: str = "2026-01-02T00:00:00+00:00",
              probs: dict[tuple[str, int], list[list[float]]] | None = PROBS, extra: dict | None = None) -> Path:
    """A fabricated run folder in the layout `bnrepro ensemble` writes (manifest, results.csv, probabilities)."""
    run = results / "ensemble" / folder
    (run / "probabilities").mkdir(parents=True)
    members = [{"name": name, "label": name.upper(), "run": str(results / "imagenet" / f"run-{name}"),
                "recipe_digest": "d1", "git_commit": f"{name[-1] * 4}c0mm1t0000"} for name in ("member-a", "member-b")]
    (run / "manifest.json").write_text(json.dumps({
        "experiment": "ensemble", "status": status, "started": started, "label": "BN-Inception ensemble",
        "recipe": "bn-inception", "members": members, "crops": [1, 144], "resolution": 32,
        "dataset": "fabricated 3-class data for tests", "val_images": len(LABELS), "git_commit": "e4e4b1e000000000",
        "skipped_images": 0, **(extra or {})}))
    # results.csv says something else: the report must recombine the cached probabilities, not read this
    pd.DataFrame({"members": ["member-a"], "models": [1], "crops": [1], "top1_error": [0.99], "top5_error": [0.99]}
                 ).to_csv(run / "results.csv", index=False)
    for (name, crops), p in (probs or {}).items():
        torch.save({"probs": torch.tensor(p).half(), "labels": torch.tensor(LABELS, dtype=torch.int64),
                    "indices": torch.arange(len(LABELS), dtype=torch.int64)},
                   run / "probabilities" / f"{name}-{crops}crop.pt")
    return run


def tables(md: str, section: str) -> dict[str, dict[str, str]]:
    """First column -> column -> cell of the table under ``## section`` of ensemble.md."""
    return markdown_rows(md.split(f"## {section}\n")[1].split("\n## ")[0])


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    write_run(root, "bn-inception-older", started="2026-01-01T00:00:00+00:00")
    write_run(root, "bn-inception-latest")
    return root


def test_fig4_rows_are_recombined_from_the_cached_probabilities(results, tmp_path):
    out = tmp_path / "report"
    assert ensemble.build(results, out) == [out / "ensemble.md"]
    rows = tables((out / "ensemble.md").read_text(), "Fig. 4")
    ours = [name for name in rows if name.startswith("this project:")]
    assert list(rows)[:len(PAPER.ensemble.fig4)] == [row.model for row in PAPER.ensemble.fig4]  # the paper's first
    assert ours == ["this project: BN-Inception single crop (member-a)",
                    "this project: BN-Inception multicrop (member-a)",
                    "this project: BN-Inception ensemble (bn-inception: member-a, member-b)"]
    single, multi, both = (rows[name] for name in ours)
    assert (single["Top-1 error"], single["Top-5 error"], single["Crops"], single["Models"]) == \
        ("25.00%", "0.00%", "1", "1")
    assert (multi["Top-1 error"], multi["Crops"], multi["Models"]) == ("0.00%", "144", "1")
    assert (both["Top-1 error"], both["Crops"], both["Models"]) == ("0.00%", "144", "2")
    assert single["Resolution"] == "32"  # the manifest's, not the paper's 224
    assert "99.00%" not in (tmp_path / "report" / "ensemble.md").read_text()  # results.csv was not read


def test_paper_rows_and_googlenet_crop_study(results, tmp_path):
    ensemble.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    rows = tables(md, "Fig. 4")
    assert (rows["BN-Inception single crop"]["Top-1 error"], rows["BN-Inception single crop"]["Top-5 error"]) == \
        ("25.2%", "7.82%")
    assert (rows["BN-Inception multicrop"]["Top-1 error"], rows["BN-Inception multicrop"]["Top-5 error"]) == \
        ("21.99%", "5.82%")
    assert (rows["BN-Inception ensemble"]["Top-1 error"], rows["BN-Inception ensemble"]["Top-5 error"],
            rows["BN-Inception ensemble"]["Models"]) == ("20.1%", "4.9%", "6")
    assert (rows["GoogLeNet ensemble"]["Top-1 error"], rows["GoogLeNet ensemble"]["Top-5 error"]) == ("—", "6.67%")
    crops = tables(md, "Crop study")
    assert list(crops) == ["1", "10", "144"]  # the run's schemes and GoogLeNet's
    assert (crops["1"]["1 model top-1"], crops["1"]["2 models top-1"], crops["144"]["1 model top-1"]) == \
        ("25.00%", "0.00%", "0.00%")
    assert crops["10"]["1 model top-1"] == "—"  # not evaluated in this run
    assert [crops[c]["GoogLeNet 1 model top-5"] for c in ("1", "10", "144")] == ["10.07%", "9.15%", "7.89%"]
    assert [crops[c]["GoogLeNet 7 models top-5"] for c in ("1", "10", "144")] == ["8.09%", "7.62%", "6.67%"]


def test_per_member_table_and_header(results, tmp_path):
    ensemble.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    members = tables(md, "Members")
    assert (members["member-a"]["1 crop top-1"], members["member-a"]["144 crop top-1"]) == ("25.00%", "0.00%")
    assert (members["member-b"]["1 crop top-1"], members["member-b"]["144 crop top-1"]) == ("25.00%", "25.00%")
    assert members["member-b"]["144 crop top-5"] == "0.00%"  # 3 classes: every label is in the top 5
    assert "fabricated 3-class data for tests, digest not recorded, 4 validation images" in md
    assert "`imagenet/run-member-a`, commit `aaaac0mm1t00`" in md and "commit `bbbbc0mm1t00`" in md
    assert "Ensemble run `ensemble/bn-inception-latest`" in md
    assert "Older finished ensemble runs, not shown: `ensemble/bn-inception-older`" in md
    assert "3-class dataset, not 1000-class ImageNet, so their numbers are not comparable" in md


def test_unfinished_runs_are_ignored(results, tmp_path):
    # a newer running run without probabilities: reading it would fail, so the report must pass it by
    write_run(results, "bn-inception-running", status="running", started="2026-01-03T00:00:00+00:00", probs=None)
    ensemble.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    assert "Ensemble run `ensemble/bn-inception-latest`" in md and "running" not in md

    only_unfinished = tmp_path / "unfinished"
    write_run(only_unfinished, "bn-inception-interrupted", status="interrupted", probs=None)
    assert ensemble.build(only_unfinished, tmp_path / "report2") == []
    assert not (tmp_path / "report2" / "ensemble.md").exists()
    with pytest.raises(UserError, match="no complete runs.*`bnrepro ensemble`"):
        build(only_unfinished, tmp_path / "report2")


def test_report_build_with_only_an_ensemble_run(results, tmp_path):
    out = tmp_path / "report"
    assert build(results, out) == [out / "ensemble.md"]  # no mnist or imagenet runs: those parts write nothing
    assert not (out / "mnist.md").exists() and not (out / "imagenet.md").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_imagenet_scale_runs_get_no_comparability_warning():
    assert ensemble.comparability(1000, 50_000) is None
    assert "not comparable" in ensemble.comparability(3, 4)
    assert "50,000" in ensemble.comparability(1000, 10_000)


def test_members_table_has_the_ensemble_and_googlenet_at_1_10_144_crops(results, tmp_path):
    ensemble.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    rows = tables(md, "Members")
    assert list(rows) == ["member-a", "member-b", "ensemble (2 models)", "GoogLeNet, 1 model (top-5 only)",
                          "GoogLeNet, 7 models (top-5 only)"]
    assert (rows["ensemble (2 models)"]["1 crop top-1"], rows["ensemble (2 models)"]["144 crop top-1"]) == \
        ("0.00%", "0.00%")
    assert rows["member-a"]["10 crop top-1"] == "—"  # not evaluated in this run
    assert [rows["GoogLeNet, 1 model (top-5 only)"][f"{c} crop top-5"] for c in (1, 10, 144)] == \
        ["10.07%", "9.15%", "7.89%"]
    assert [rows["GoogLeNet, 7 models (top-5 only)"][f"{c} crop top-5"] for c in (1, 10, 144)] == \
        ["8.09%", "7.62%", "6.67%"]
    assert rows["GoogLeNet, 7 models (top-5 only)"]["144 crop top-1"] == "—"
    assert "subset" not in md  # the whole (fabricated) validation set


def test_a_validation_subset_is_said_beside_the_tables(tmp_path):
    root = tmp_path / "results"
    write_run(root, "subset", extra={"val_limit": 4, "profile": "cpu"})
    ensemble.build(root, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    note = "This run evaluated a subset of the validation images: the first 4 images of the split (`val_limit` 4)"
    for section in ("Fig. 4", "Crop study", "Members"):
        assert note in md.split(f"## {section}\n")[1].split("\n## ")[0]
    assert "4 validation images (3 classes, a subset: `val_limit` 4)" in md and "Profile cpu." in md

    whole = tmp_path / "whole"  # a limit above the split's size: the whole split, no note
    write_run(whole, "all", extra={"val_limit": 10})
    ensemble.build(whole, tmp_path / "report2")
    assert "subset" not in (tmp_path / "report2" / "ensemble.md").read_text()


def test_profile_from_the_runs_recipe_yaml(tmp_path):
    run = write_run(tmp_path / "results", "from-yaml")
    (run / "recipe.yaml").write_text("experiment: ensemble\nprofile: proxy\n")
    assert ensemble.finished_runs(tmp_path / "results")[0].profile == "proxy"


def test_the_profile_is_the_manifests_first_then_the_recipe_yamls_then_the_first_members(tmp_path):
    """``bnrepro ensemble`` has not written ``profile`` into its manifest so far: the report falls back on the run's
    recipe.yaml, then on its first member's manifest, and a file that is missing, damaged or of another shape is
    no profile rather than an error."""
    results = tmp_path / "results"
    run = write_run(results, "fallbacks", extra={"profile": "smoke"})
    (run / "recipe.yaml").write_text("experiment: ensemble\nprofile: proxy\n")
    assert ensemble.finished_runs(results)[0].profile == "smoke"  # the manifest's, when it has one
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["profile"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    member = Path(manifest["members"][0]["run"])
    member.mkdir(parents=True)
    (member / "manifest.json").write_text(json.dumps({"profile": "cpu"}))
    for damaged in (b"- a list\n", b"profile: [unclosed\n", b"\xff\xfe not utf-8"):
        (run / "recipe.yaml").write_bytes(damaged)
        assert ensemble.finished_runs(results)[0].profile == "cpu"  # the first member's
    for damaged in ("[1, 2]", "{not json", ""):
        (member / "manifest.json").write_text(damaged)
        assert ensemble.finished_runs(results)[0].profile is None
    manifest["members"][0]["run"] = None  # no folder named at all
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert ensemble.finished_runs(results)[0].profile is None


def test_no_folder_of_the_machine_is_named_and_commits_keep_their_dirty_flag(tmp_path):
    root = tmp_path / "results"
    run = write_run(root, "elsewhere", extra={"dataset": "Fashion-MNIST idx files in /home/someone/raw, 4 images "
                                                        "(first)", "git_commit": "e4e4b1e000000000abc+dirty"})
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["members"][0]["run"] = "/home/someone/other-results/imagenet/run-member-a"  # outside this results folder
    manifest["members"][1]["git_commit"] = "bbbbc0mm1t000000+dirty"
    (run / "manifest.json").write_text(json.dumps(manifest))
    ensemble.build(root, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    assert "/home" not in md and "someone" not in md and str(tmp_path) not in md
    assert "`…/imagenet/run-member-a`" in md and "Data: Fashion-MNIST idx files, 4 images (first)" in md
    assert "commit `bbbbc0mm1t00+dirty`" in md
    assert "Ensemble run `ensemble/elsewhere`, commit `e4e4b1e00000+dirty`" in md


def test_the_views_are_said_distinct_views_counted_and_an_older_single_crop_flagged(tmp_path):
    root = tmp_path / "results"
    write_run(root, "older", extra={"dataset": "MNIST idx files in raw, 4 images (first)"})
    ensemble.build(root, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    assert "The single crop of this run predates" in md and "0.20 grey levels" in md
    assert "Distinct views of the 28 x 28 validation images at 32 px: 1 of 1, 48 of 144" in md

    newer = tmp_path / "newer"
    run = write_run(newer, "newer", extra={"image_size": [30, 44], "data_identity": {
        "name": "class folders 'x'", "classes": ["a", "b", "c"], "train_examples": 9, "val_examples": 4,
        "digest": "0123456789abcdef"}})
    manifest = json.loads((run / "manifest.json").read_text())
    for member, view in zip(manifest["members"], ("float", "uint8")):
        member["single_crop_view"] = view
    (run / "manifest.json").write_text(json.dumps(manifest))
    ensemble.build(newer, tmp_path / "report2")
    md = (tmp_path / "report2" / "ensemble.md").read_text()
    assert "predates" not in md and "member-a resampled in float" in md and "member-b resized in uint8" in md
    assert "Distinct views of the 30 x 44 validation images at 32 px: 1 of 1, 140 of 144" in md
    assert "Data: class folders 'x' (9 train, 4 val, 3 classes), digest `0123456789ab`" in md


def test_an_ensemble_on_other_data_than_its_profiles_runs_is_left_out(tmp_path):
    """imagenet.md's choice of data at a profile (its latest run's here) holds for ensembles too: the later ensemble,
    on other data, is named, not shown; the earlier one, on the runs' data, is the report's."""
    results = tmp_path / "results"
    cifar = {"name": "CIFAR-10 python batches", "format": "cifar", "classes": ["a", "b", "c"], "train_examples": 50,
             "val_examples": 4, "digest": "c1" * 32}
    run = results / "imagenet" / "inception"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"experiment": "imagenet", "status": "complete", "profile": "cpu",
                                                   "data_identity": cifar}))
    write_run(results, "on-cifar", extra={"profile": "cpu", "data_identity": cifar})
    fashion = {**cifar, "name": "Fashion-MNIST idx files", "digest": "f0" * 32}
    write_run(results, "on-fashion", started="2026-01-03T00:00:00+00:00",
              extra={"profile": "cpu", "data_identity": fashion})
    shown, other = ensemble.select(results)
    assert [r.rel for r in shown] == ["ensemble/on-cifar"] and [r.rel for r in other] == ["ensemble/on-fashion"]
    ensemble.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    assert "Ensemble run `ensemble/on-cifar`" in md
    assert ("On other data than the profile's latest run (Fashion-MNIST idx files), not shown: `ensemble/on-fashion` "
            "(profile cpu)") in md
    (results / "ensemble" / "on-cifar" / "manifest.json").unlink()  # only the one on other data is left
    ensemble.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "ensemble.md").read_text()
    assert "No finished ensemble run on the data the report shows" in md and "`ensemble/on-fashion`" in md
