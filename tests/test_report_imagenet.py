"""The ImageNet report (Fig. 2 curves, Fig. 3 table) on fabricated run folders: the numbers below are made up so
that steps-to-target and speed-ups can be checked by hand; no training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from conftest import markdown_rows

from bnrepro.errors import UserError
from bnrepro.paper import PAPER
from bnrepro.report import build, imagenet
from bnrepro.report.claims import v1, v2
from bnrepro.report.selection import (
    data_name,
    finished_runs,
    latest_per_recipe,
    same_data,
    seed_maxes,
    seed_steps,
    select,
    target_for,
)
from bnrepro.report.text import markdown_table, paper_steps_text, short_commit, without_paths

NAN = math.nan
LABELS = {"inception": "Inception", "bn-baseline": "BN-Baseline", "bn-x5": "BN-x5", "bn-x30": "BN-x30",
          "inception-x5": "Inception-x5"}


def write_run(results: Path, folder: str, recipe: str, profile: str, steps: list[int], top1: list[float], *,
              status: str = "complete", started: str = "2026-01-02T00:00:00+00:00", diverged_at: int | None = None,
              commit: str = "c0ffee0000000000", extra: dict | None = None) -> Path:
    """A fabricated run folder in the layout `bnrepro imagenet` writes (manifest, metrics.csv, summary); ``extra``:
    more manifest keys (seed, overrides, compression)."""
    run = results / "imagenet" / folder
    run.mkdir(parents=True)
    label = LABELS[recipe]
    dataset = f"fabricated {profile} data for tests"
    (run / "manifest.json").write_text(json.dumps({
        "experiment": "imagenet", "status": status, "recipe": recipe, "label": label, "profile": profile,
        "dataset": dataset, "git_commit": commit, "started": started, **(extra or {})}))
    loss = [NAN if math.isnan(t) else 7.0 - t for t in top1]
    pd.DataFrame({"step": steps, "epoch": [s / 100 for s in steps], "train_loss": loss, "lr": 0.01,
                  "top1": top1, "top5": [NAN if math.isnan(t) else min(1.0, 2 * t) for t in top1]}
                 ).to_csv(run / "metrics.csv", index=False)
    finite = [(t, s) for s, t in zip(steps, top1) if not math.isnan(t)]
    best = max(finite)
    (run / "summary.json").write_text(json.dumps({
        "recipe": recipe, "label": label, "profile": profile, "steps": steps[-1], "max_top1": best[0],
        "max_top1_step": best[1], "final_top1": top1[-1], "final_top5": NAN, "diverged_at": diverged_at}))
    return run


STEPS = [0, 100, 200, 300, 400, 500]


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    # profile proxy: Inception's best is 0.50, first reached at step 400, so the target is 0.50
    write_run(root, "z-older-inception", "inception", "proxy", STEPS, [0.001, 0.3, 0.3, 0.3, 0.3, 0.3],
              started="2026-01-01T00:00:00+00:00", commit="01d0000000000000")  # superseded despite its name
    write_run(root, "b-inception", "inception", "proxy", STEPS, [0.001, 0.1, 0.2, 0.4, 0.5, 0.45],
              commit="1ce0000000000000")
    write_run(root, "c-bn-baseline", "bn-baseline", "proxy", STEPS, [0.001, 0.2, 0.5, 0.55, 0.6, 0.6])
    write_run(root, "d-bn-x5", "bn-x5", "proxy", STEPS, [0.001, 0.5, 0.6, 0.7, 0.7, 0.72])
    write_run(root, "e-inception-x5", "inception-x5", "proxy", STEPS, [0.001, 0.05, 0.08, NAN, NAN, NAN],
              status="diverged", diverged_at=250)
    write_run(root, "f-bn-x30-running", "bn-x30", "proxy", STEPS, [0.001, 0.9, 0.9, 0.9, 0.9, 0.9],
              status="running")
    write_run(root, "g-bn-x30-interrupted", "bn-x30", "proxy", STEPS, [0.001, 0.9, 0.9, 0.9, 0.9, 0.9],
              status="interrupted")
    # profile paper: the target is the paper's 72.2%, whatever Inception reaches here
    write_run(root, "p-inception", "inception", "paper", [0, 1000, 2000, 3000], [0.0, 0.5, 0.7225, 0.73])
    write_run(root, "p-bn-x5", "bn-x5", "paper", [0, 500, 1000], [0.0, 0.722, 0.74])
    # profile smoke: no Inception run, so no target
    write_run(root, "s-bn-x5", "bn-x5", "smoke", [0, 10, 20], [0.0, 0.2, 0.3])
    return root


def table_rows(md: str, profile: str) -> dict[str, dict[str, str]]:
    """Model -> column -> cell of the Fig. 3 table in ``profile``'s section of imagenet.md."""
    rows = markdown_rows(md.split(f"## Profile `{profile}`")[1].split("## Profile")[0])
    assert all(row["Model"] == model for model, row in rows.items())  # the table's first column is the model
    return rows


def test_writes_a_figure_per_profile_and_the_table(results, tmp_path):
    out = tmp_path / "report"
    written = imagenet.build(results, out)
    expected = [out / f"fig2_imagenet_{p}.{s}" for p in ("paper", "proxy", "smoke") for s in ("png", "svg")]
    assert written == [*expected, out / "imagenet.md"]
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    assert (out / "fig2_imagenet_proxy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (out / "fig2_imagenet_proxy.svg").read_text()
    assert "<svg" in svg and "training steps" in svg and "diverged at step 250" in svg
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_steps_to_target_and_speedups_by_hand(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    rows = table_rows(md, "proxy")
    assert list(rows) == ["Inception", "BN-Baseline", "BN-x5", "Inception-x5"]  # paper's order; BN-x30 unfinished
    assert rows["Inception"]["Steps to target"] == "400"
    assert rows["Inception"]["Max accuracy"] == "50.0%"
    assert rows["Inception"]["Speed-up vs Inception"] == "1.0x"
    assert (rows["BN-Baseline"]["Steps to target"], rows["BN-Baseline"]["Speed-up vs Inception"]) == ("200", "2.0x")
    assert (rows["BN-x5"]["Steps to target"], rows["BN-x5"]["Speed-up vs Inception"]) == ("100", "4.0x")
    assert rows["BN-x5"]["Max accuracy"] == "72.0%"
    # one Inception seed: the target is its max, as before the mean over seeds
    assert "Target accuracy: 50.0%, the best top-1 of this profile's `inception` run (claims v2's T; as in the " \
        "paper, Inception's maximum)" in md
    proxy = latest_per_recipe(finished_runs(results))["proxy"]
    assert target_for("proxy", proxy) == proxy["inception"].max_top1 == 0.5
    assert "target: Inception's max (50.0%)" in (tmp_path / "report" / "fig2_imagenet_proxy.svg").read_text()


def test_diverged_run_is_shown_as_diverged(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    row = table_rows(md, "proxy")["Inception-x5"]
    assert row["Steps to target"] == "diverged at 250"
    assert row["Max accuracy"] == "8.0%"  # over the finite evaluations before divergence
    assert row["Speed-up vs Inception"] == "—"
    assert "machine infinity" in md
    run = {r.recipe: r for r in finished_runs(results) if r.profile == "proxy"}["inception-x5"]
    assert run.diverged_at == 250 and list(run.curve.step) == [0, 100, 200]  # the line Fig. 2 draws


def test_latest_finished_run_per_recipe_and_provenance(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    proxy = md.split("## Profile `proxy`")[1].split("## Profile")[0]
    assert "`imagenet/b-inception`" in proxy and "`1ce000000000`" in proxy
    assert "fabricated proxy data for tests" in proxy
    assert "Older finished runs, not shown: `imagenet/z-older-inception`" in proxy
    assert "bn-x30" not in md and "BN-x30" not in table_rows(md, "proxy")  # running/interrupted are ignored
    chosen = latest_per_recipe(finished_runs(results))
    assert chosen["proxy"]["inception"].path.name == "b-inception"
    assert list(chosen) == ["paper", "proxy", "smoke"]


def test_paper_columns(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    rows = table_rows((tmp_path / "report" / "imagenet.md").read_text(), "proxy")
    assert (rows["Inception"]["Paper: steps to 72.2%"], rows["Inception"]["Paper: max accuracy"],
            rows["Inception"]["Paper: speed-up"]) == ("31.0e6", "72.2%", "1.0x")
    assert (rows["BN-Baseline"]["Paper: steps to 72.2%"], rows["BN-Baseline"]["Paper: speed-up"]) == ("13.3e6", "2.3x")
    assert (rows["BN-x5"]["Paper: steps to 72.2%"], rows["BN-x5"]["Paper: max accuracy"],
            rows["BN-x5"]["Paper: speed-up"]) == ("2.1e6", "73.0%", "14.8x")
    assert (rows["Inception-x5"]["Paper: steps to 72.2%"], rows["Inception-x5"]["Paper: max accuracy"]) == ("—", "—")
    assert (PAPER.fig3("bn-x30").steps, PAPER.fig3("bn-x30").max_top1) == (2.7e6, 0.748)
    assert (PAPER.fig3("bn-x5-sigmoid").steps, PAPER.fig3("bn-x5-sigmoid").max_top1) == (None, 0.698)


def test_paper_profile_uses_the_papers_target(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    chosen = latest_per_recipe(finished_runs(results))
    assert target_for("paper", chosen["paper"]) == 0.722  # not Inception's 0.73 here
    rows = table_rows(md, "paper")
    assert rows["Inception"]["Steps to target"] == "2,000" and rows["Inception"]["Max accuracy"] == "73.0%"
    assert (rows["BN-x5"]["Steps to target"], rows["BN-x5"]["Speed-up vs Inception"]) == ("500", "4.0x")
    assert "Target accuracy: 72.2%, the paper's" in md


def test_profile_without_inception_has_no_target(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    smoke = md.split("## Profile `smoke`")[1]
    assert "no finished `inception` run" in smoke
    row = table_rows(md, "smoke")["BN-x5"]
    assert (row["Steps to target"], row["Max accuracy"], row["Speed-up vs Inception"]) == ("—", "30.0%", "—")


def test_report_build_with_only_imagenet_runs(results, tmp_path):
    out = tmp_path / "report"
    written = build(results, out)  # no results/mnist folder: the MNIST part writes nothing
    assert out / "imagenet.md" in written and not (out / "mnist.md").exists()


def test_report_build_without_finished_runs_is_a_user_error(tmp_path):
    root = tmp_path / "results"
    write_run(root, "running", "bn-x5", "proxy", STEPS, [0.0] * 6, status="running")
    with pytest.raises(UserError, match="no complete runs.*`bnrepro mnist` or `bnrepro imagenet`"):
        build(root, tmp_path / "report")


def test_markdown_table_escapes_pipes():
    text = markdown_table(pd.DataFrame({"a": ["x|y"], "b": [1]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_seeds_and_overrides_are_rows_of_their_own(tmp_path):
    root = tmp_path / "results"
    write_run(root, "a-inception", "inception", "proxy", STEPS, [0.0, 0.1, 0.2, 0.4, 0.5, 0.45], extra={"seed": 0})
    # a later, better seed 1 does not replace seed 0's row: it is one of the row's other seeds
    write_run(root, "b-inception-seed1", "inception", "proxy", STEPS, [0.0, 0.2, 0.3, 0.6, 0.6, 0.6],
              started="2026-01-03T00:00:00+00:00", extra={"seed": 1})
    write_run(root, "c-inception-seed1-older", "inception", "proxy", STEPS, [0.0] * 6,
              started="2026-01-01T00:00:00+00:00", extra={"seed": 1})
    write_run(root, "d-bn-x5", "bn-x5", "proxy", STEPS, [0.0, 0.5, 0.6, 0.7, 0.7, 0.72], extra={"seed": 0})
    # a step budget is no new row: this later run replaces d-bn-x5
    write_run(root, "e-bn-x5-budget", "bn-x5", "proxy", STEPS, [0.0, 0.5, 0.6, 0.7, 0.7, 0.71],
              started="2026-01-03T00:00:00+00:00", extra={"seed": 0, "overrides": ["profiles.proxy.steps=500"]})
    write_run(root, "f-bn-x5-shards", "bn-x5", "proxy", STEPS, [0.0, 0.4, 0.5, 0.6, 0.7, 0.7],
              started="2026-01-04T00:00:00+00:00",
              extra={"seed": 0, "overrides": ["train.shuffle=shards", "profiles.proxy.steps=500"]})
    chosen = latest_per_recipe(finished_runs(root))["proxy"]
    assert list(chosen) == ["inception", "bn-x5", "bn-x5 [train.shuffle=shards]"]
    assert chosen["inception"].path.name == "a-inception" and chosen["inception"].seed == 0
    assert [r.path.name for r in chosen["inception"].others] == ["b-inception-seed1"]
    assert chosen["bn-x5"].path.name == "e-bn-x5-budget" and chosen["bn-x5"].others == ()

    imagenet.build(root, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    rows = table_rows(md, "proxy")
    assert list(rows) == ["Inception", "BN-x5", "BN-x5, shards only (no change 6)"]
    # two seeds of Inception: their mean and range; the target is the mean of their max, (50 + 60) / 2 = 55%, and
    # each Inception seed counts to its own max: seed 0's 50% at 400, seed 1's 60% at 300
    assert rows["Inception"]["Max accuracy"] == "55.0% (50.0-60.0, 2 seeds)" and rows["Inception"]["Seeds"] == "0/1"
    assert rows["Inception"]["Steps to target"] == "346 (300-400, 2 seeds)"  # sqrt(300 x 400), a geometric mean
    assert rows["BN-x5"]["Seeds"] == "0" and rows["BN-x5"]["Max accuracy"] == "71.0%"
    assert rows["BN-x5"]["Steps to target"] == "200"  # 60% at 200 (50% at 100 is under 55%)
    assert rows["BN-x5"]["Speed-up vs Inception"] == "1.7x"  # 346 / 200
    assert (rows["BN-x5, shards only (no change 6)"]["Steps to target"],
            rows["BN-x5, shards only (no change 6)"]["Max accuracy"]) == ("300", "70.0%")
    assert "Target accuracy: 55.0%, the mean over Inception's 2 seeds of their best top-1 (claims v2's T; as in the " \
        "paper, Inception's maximum): 50.0%/60.0% (seeds 0/1)" in md
    assert "seed 1: `imagenet/b-inception-seed1`" in md
    assert "Older finished runs, not shown: `imagenet/c-inception-seed1-older` (inception), `imagenet/d-bn-x5`" in md
    assert "Paper-equivalent steps to target" not in md  # no manifest carries a compression


def test_compressed_profile_counts_paper_equivalent_steps(tmp_path):
    root = tmp_path / "results"
    cpu = {"compression": 2.5e-4, "global_batch": 128, "replicas": 1}  # a step stands for 4,000 paper steps
    write_run(root, "inception", "inception", "cpu", [0, 400, 800], [0.1, 0.5, 0.6], extra=cpu)
    write_run(root, "bn-x5", "bn-x5", "cpu", [0, 400, 800], [0.1, 0.7, 0.8], extra=cpu)
    write_run(root, "inception-x5", "inception-x5", "cpu", [0, 400, 800], [0.1, 0.2, NAN], status="diverged",
              diverged_at=500, extra=cpu)
    out = tmp_path / "report"
    imagenet.build(root, out)
    rows = table_rows((out / "imagenet.md").read_text(), "cpu")
    assert (rows["Inception"]["Steps to target"], rows["Inception"]["Paper-equivalent steps to target"]) == \
        ("800", "3.2e6")
    assert (rows["BN-x5"]["Steps to target"], rows["BN-x5"]["Paper-equivalent steps to target"],
            rows["BN-x5"]["Speed-up vs Inception"]) == ("400", "1.6e6", "2.0x")
    assert rows["Inception-x5"]["Paper-equivalent steps to target"] == "diverged at 2.0e6"
    svg = (out / "fig2_imagenet_cpu.svg").read_text()
    assert "paper-equivalent steps" in svg and "4,000 paper steps" in svg
    assert "compression 0.00025 (a step stands for 4,000 paper steps)" in (out / "imagenet.md").read_text()
    assert paper_steps_text(31.0e6) == "31.0e6" and paper_steps_text(4000) == "4,000"


# --- provenance without the machine's paths, commits with their +dirty, lines told apart --------------------------


def test_commits_keep_their_dirty_flag():
    assert short_commit("bc4b6daa9bcf514e3d430eeb8cbb0c79ee266d24+dirty") == "bc4b6daa9bcf+dirty"
    assert short_commit("017d741f6c60fa43984e92015bc6549d5f52d632") == "017d741f6c60"
    assert short_commit(None) == "not recorded"


def test_the_report_names_the_data_and_its_digest_never_a_folder_of_the_machine(tmp_path):
    root = tmp_path / "results"
    legacy = "Fashion-MNIST idx files in /home/someone/data/fashion-mnist/raw (60,000 train, 10,000 val, 10 classes)"
    write_run(root, "a-inception", "inception", "cpu", STEPS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5],
              commit="bc4b6daa9bcf514e3d430eeb8cbb0c79ee266d24+dirty",
              extra={"dataset": legacy, "dataset_dir": "/home/someone/data/fashion-mnist/raw"})
    identity = {"name": "Fashion-MNIST idx files", "format": "idx", "classes": [str(c) for c in range(10)],
                "train_examples": 60_000, "val_examples": 10_000, "digest": "6401d756d98e30e1f3adae5fa7bf4b8a"}
    write_run(root, "b-bn-x5", "bn-x5", "cpu", STEPS, [0.1, 0.5, 0.6, 0.6, 0.6, 0.6],
              extra={"dataset": legacy, "dataset_dir": "/home/someone/data/fashion-mnist/raw",
                     "data_identity": identity})
    imagenet.build(root, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    assert "/home" not in md and "someone" not in md
    assert "Fashion-MNIST idx files (60,000 train, 10,000 val, 10 classes), digest not recorded" in md  # the old run
    assert "Fashion-MNIST idx files (60,000 train, 10,000 val, 10 classes), digest `6401d756d98e`" in md
    assert "commit `bc4b6daa9bcf+dirty`" in md
    assert without_paths("/data/imagenet/train (3 train)") == "…/imagenet/train (3 train)"
    assert without_paths("12 shards in ../packed (5 train)") == "12 shards (5 train)"


def test_the_latest_campaign_is_said_with_its_commit_and_runs_whose_manifest_disagrees(results, tmp_path):
    record = results / "campaign" / "proxy-1"
    record.mkdir(parents=True)
    (record / "manifest.json").write_text(json.dumps({
        "experiment": "campaign", "status": "complete", "started": "2026-01-03T00:00:00+00:00", "profile": "proxy",
        "git_commit": "abcdef0123456789abcdef+dirty", "data_identity": None, "dataset": "x",
        "runs": [{"folder": "imagenet/b-inception", "state": "kept"}, {"folder": "imagenet/d-bn-x5", "state": "new"}],
        "other_commits": ["imagenet/d-bn-x5: its manifest names commit c0ffee, but the campaign trained it with the "
                          "code of abcdef+dirty"]}))
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    proxy = md.split("## Profile `proxy`")[1].split("## Profile")[0]
    assert "the code of commit `abcdef012345+dirty` (**a checkout with uncommitted changes**" in proxy
    assert "runs: 1 kept, 1 trained" in proxy and "imagenet/d-bn-x5: its manifest names commit c0ffee" in proxy
    assert "Campaign" not in md.split("## Profile `proxy`")[0] + md.split("## Profile `smoke`")[1]


def test_every_line_of_fig_2_differs_in_colour_or_style_however_many_rows(tmp_path):
    root = tmp_path / "results"
    recipes = [*PAPER.recipe_order, *(f"bn-x30-member{i}" for i in range(1, 13))]
    for i, recipe in enumerate(recipes):
        LABELS.setdefault(recipe, recipe)
        write_run(root, f"{i:02d}-{recipe}", recipe, "cpu", STEPS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5 + i / 100])
    write_run(root, "99-variant", "bn-x5", "cpu", STEPS, [0.1] * 6, extra={"overrides": ["train.shuffle=shards"]})
    chosen = latest_per_recipe(finished_runs(root))["cpu"]
    styles = imagenet.line_styles(chosen)
    assert len(chosen) == 20 and len(set(styles.values())) == 20
    assert styles["inception"] == ("black", "-") and styles["bn-x5 [train.shuffle=shards]"] == ("tab:orange", "--")
    members = [styles[key] for key in chosen if key.startswith("bn-x30-member")]  # in row order
    assert len({c for c, _ in members[:6]}) == 6 and len({s for _, s in members[:4]}) == 4  # both change each row
    assert all(colour not in PAPER.colours.values() for colour, _ in members)
    assert imagenet.build(root, tmp_path / "report")


def test_bn_points_evaluated_with_moving_averages_are_marked_and_said(tmp_path):
    """A BN run's moving-average rows lag the weights; Fig. 2 marks them and the text says so. A network without
    BN has no averages to lag, whatever its rows say."""
    for folder, recipe, bn in (("bn-x5-a", "bn-x5", True), ("inception-a", "inception", False)):
        run = write_run(tmp_path, folder, recipe, "cpu", STEPS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
        metrics = pd.read_csv(run / "metrics.csv")
        metrics["statistics"] = ["population", "moving", "moving", "moving", "moving", "population"]
        metrics.to_csv(run / "metrics.csv", index=False)
        (run / "recipe.yaml").write_text(f"model:\n  batch_norm: {str(bn).lower()}\n")
    runs = {r.recipe: r for r in finished_runs(tmp_path)}
    assert runs["bn-x5"].lagging.tolist() == [False, True, True, True, True, False]
    assert not runs["inception"].lagging.any()
    imagenet.build(tmp_path, tmp_path / "report")
    assert "open circles" in (tmp_path / "report" / "imagenet.md").read_text()



# --- one data set per profile: a campaign on new data beside an older one under the same profile name ---------------

CIFAR = {"name": "CIFAR-10 python batches", "format": "cifar", "classes": [str(c) for c in range(10)],
         "train_examples": 50_000, "val_examples": 10_000, "digest": "c1fa" * 16}
FASHION = "Fashion-MNIST idx files in /data/fashion-mnist (60,000 train, 10,000 val, 10 classes)"  # no digest: older


def write_campaign(results: Path, profile: str, identity: dict | None, started: str, plan: list[str] = ()) -> Path:
    """A `bnrepro reproduce` campaign record as results/campaign/<profile>-<time>/manifest.json holds it."""
    record = results / "campaign" / f"{profile}-{started[:10]}"
    record.mkdir(parents=True)
    (record / "manifest.json").write_text(json.dumps({
        "experiment": "campaign", "status": "running", "started": started, "profile": profile,
        "git_commit": "abc0000000000000", "data_identity": identity,
        "plan": [{"run": Path(f).name, "state": "done", "folder": f} for f in plan]}))
    return record


@pytest.fixture
def two_campaigns(tmp_path):
    """Profile cpu: an older Fashion-MNIST campaign (manifests from before data_identity) and a newer CIFAR-10 one
    (two seeds of BN-x5), whose record was written between them; profile proxy apart."""
    root = tmp_path / "results"
    old = {"dataset": FASHION, "classes": CIFAR["classes"], "train_examples": 60_000}
    write_run(root, "old-inception", "inception", "cpu", STEPS, [0.1, 0.5, 0.7, 0.8, 0.9, 0.9],
              started="2026-01-01T00:00:00+00:00", extra=old)
    write_run(root, "old-bn-x5", "bn-x5", "cpu", STEPS, [0.1, 0.8, 0.9, 0.9, 0.9, 0.9],
              started="2026-01-01T01:00:00+00:00", extra=old)
    new = {"dataset": "CIFAR-10 python batches in /data/cifar (50,000 train)", "data_identity": CIFAR}
    write_run(root, "new-inception", "inception", "cpu", STEPS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5],
              started="2026-01-05T00:00:00+00:00", extra=new)
    write_run(root, "new-bn-x5", "bn-x5", "cpu", STEPS, [0.1, 0.4, 0.5, 0.6, 0.6, 0.6],
              started="2026-01-05T01:00:00+00:00", extra=new)
    write_run(root, "new-bn-x5-seed1", "bn-x5", "cpu", STEPS, [0.1, 0.3, 0.5, 0.5, 0.5, 0.6],
              started="2026-01-05T02:00:00+00:00", extra={**new, "seed": 1})
    write_run(root, "p-bn-x5", "bn-x5", "proxy", STEPS, [0.1, 0.2, 0.3, 0.3, 0.3, 0.3])
    return root


def test_a_profile_shows_only_its_latest_campaigns_data(two_campaigns, tmp_path):
    write_campaign(two_campaigns, "cpu", CIFAR, "2026-01-04T00:00:00+00:00")
    shown, other = select(two_campaigns)
    assert sorted(r.path.name for r in other) == ["old-bn-x5", "old-inception"]
    assert "p-bn-x5" in [r.path.name for r in shown]  # another profile: untouched
    out = tmp_path / "report"
    imagenet.build(two_campaigns, out)
    md = (out / "imagenet.md").read_text()
    cpu = md.split("## Profile `cpu`")[1].split("## Profile")[0]
    rows = table_rows(md, "cpu")
    assert list(rows) == ["Inception", "BN-x5"]
    assert rows["Inception"]["Max accuracy"] == "50.0%" and rows["BN-x5"]["Seeds"] == "0/1"  # CIFAR-10's, not 90%
    assert "- Data: CIFAR-10 python batches (50,000 train, 10,000 val, 10 classes), digest `c1fac1fac1fa` (this " \
           "profile's latest campaign's data)" in cpu
    assert ("Made before this campaign, on other data (Fashion-MNIST idx files), not shown: `imagenet/old-inception` "
            "(inception, seed 0), `imagenet/old-bn-x5` (bn-x5, seed 0)") in cpu
    assert "Older finished runs" not in cpu and "Fashion" not in cpu.split("Made before")[0]
    assert "90.0%" not in (out / "fig2_imagenet_cpu.svg").read_text()  # the old runs' lines are not drawn


def test_without_a_campaign_record_the_latest_runs_data_is_shown(two_campaigns, tmp_path):
    imagenet.build(two_campaigns, tmp_path / "report")
    cpu = (tmp_path / "report" / "imagenet.md").read_text().split("## Profile `cpu`")[1]
    assert "(the data of this profile's latest run)" in cpu
    assert "On other data than the profile's latest run (Fashion-MNIST idx files), not shown:" in cpu
    # a record without data (no data folder given) chooses nothing: the latest run still does
    write_campaign(two_campaigns, "cpu", None, "2026-01-06T00:00:00+00:00")
    assert sorted(r.path.name for r in select(two_campaigns)[1]) == ["old-bn-x5", "old-inception"]


def test_the_campaign_chooses_even_against_a_later_run_and_keeps_the_runs_it_lists(two_campaigns, tmp_path):
    # the latest record is on Fashion-MNIST and lists old-bn-x5 as kept: `reproduce` matched it to its data
    fashion = {**CIFAR, "name": "Fashion-MNIST idx files", "train_examples": 60_000, "digest": "f0" * 32}
    write_campaign(two_campaigns, "cpu", fashion, "2026-01-04T12:00:00+00:00", plan=["imagenet/old-bn-x5"])
    shown, other = select(two_campaigns)
    assert {r.path.name for r in shown if r.profile == "cpu"} == {"old-inception", "old-bn-x5"}
    assert {r.path.name for r in other} == {"new-inception", "new-bn-x5", "new-bn-x5-seed1"}
    imagenet.build(two_campaigns, tmp_path / "report")
    cpu = (tmp_path / "report" / "imagenet.md").read_text().split("## Profile `cpu`")[1]
    assert "On other data than this campaign's (CIFAR-10 python batches), not shown:" in cpu  # made after it began


def test_a_profile_whose_campaign_has_no_finished_run_yet_still_names_the_runs_left_out(two_campaigns, tmp_path):
    for name in ("new-inception", "new-bn-x5", "new-bn-x5-seed1"):
        manifest = two_campaigns / "imagenet" / name / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"complete"', '"interrupted"'))
    write_campaign(two_campaigns, "cpu", CIFAR, "2026-01-04T00:00:00+00:00")
    written = imagenet.build(two_campaigns, tmp_path / "report")
    assert tmp_path / "report" / "fig2_imagenet_cpu.png" not in written
    cpu = (tmp_path / "report" / "imagenet.md").read_text().split("## Profile `cpu`")[1]
    assert "Runs: no finished run on this data yet." in cpu and "Made before this campaign" in cpu


def test_data_compare_by_digest_else_by_what_the_older_manifest_records():
    legacy = {"dataset": FASHION, "classes": CIFAR["classes"], "train_examples": 60_000}
    identity = {"data_identity": {**CIFAR, "name": "Fashion-MNIST idx files", "train_examples": 60_000}}
    assert data_name(legacy) == "Fashion-MNIST idx files"
    assert same_data(legacy, identity)  # the same name, classes and count: no digest to contradict
    assert not same_data({**legacy, "train_examples": 50_000}, identity)
    assert not same_data(legacy, {"data_identity": CIFAR})
    assert not same_data(identity, {"data_identity": {**identity["data_identity"], "digest": "0" * 64}})
    assert same_data({}, identity)  # a manifest that names no data contradicts nothing


# --- several seeds: Fig. 2's mean line and min-max band, the table's mean and range ----------------------------------


def three_seeds(root: Path) -> None:
    """Three BN-x5 seeds: seed 2 evaluates one step the others do not (150) and diverges at 250 (NaN at 300)."""
    write_run(root, "x5-0", "bn-x5", "cpu", [0, 100, 200, 300], [0.1, 0.4, 0.5, 0.6], extra={"seed": 0})
    write_run(root, "x5-1", "bn-x5", "cpu", [0, 100, 200, 300], [0.2, 0.5, 0.6, 0.7], extra={"seed": 1})
    write_run(root, "x5-2", "bn-x5", "cpu", [0, 100, 150, 200, 300], [0.0, 0.3, 0.35, 0.4, NAN],
              status="diverged", diverged_at=250, extra={"seed": 2})


def test_seed_curve_is_the_mean_min_and_max_over_the_finite_seeds_at_the_common_steps(tmp_path):
    three_seeds(tmp_path)
    row = latest_per_recipe(finished_runs(tmp_path))["cpu"]["bn-x5"]
    frame = imagenet.seed_curve(row)
    assert list(frame.index) == [0, 100, 200, 300]  # 150: seed 2's alone
    assert frame["mean"].tolist() == pytest.approx([0.1, 0.4, 0.5, 0.65])  # at 300 seed 2 has diverged: 2 seeds
    assert frame["min"].tolist() == pytest.approx([0.0, 0.3, 0.4, 0.6])
    assert frame["max"].tolist() == pytest.approx([0.2, 0.5, 0.6, 0.7])
    assert frame["n"].tolist() == [3, 3, 3, 2]


def test_fig_2_draws_the_seed_mean_with_its_band_and_says_so(tmp_path, monkeypatch):
    three_seeds(tmp_path)
    write_run(tmp_path, "inception", "inception", "cpu", [0, 100, 200, 300], [0.1, 0.2, 0.3, 0.4])
    drawn = {}
    monkeypatch.setattr(imagenet, "save_figure", lambda fig, out, name: drawn.setdefault("fig", fig) and [])
    rows = latest_per_recipe(finished_runs(tmp_path))["cpu"]
    imagenet.figure_2("cpu", rows, 0.4, tmp_path)
    ax = drawn["fig"].axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    mean = lines["BN-x5 (mean of 3 seeds, band: min-max; 1 of 3 diverged)"]
    assert list(mean.get_xdata()) == [0, 100, 200, 300]
    assert list(mean.get_ydata()) == pytest.approx([0.1, 0.4, 0.5, 0.65])
    assert list(lines["Inception"].get_ydata()) == [0.1, 0.2, 0.3, 0.4]  # one seed: its run, as before
    plt.close(drawn["fig"])
    (band,) = ax.collections  # fill_between: one band, for the row of several seeds
    corners = band.get_paths()[0].vertices
    assert {tuple(v) for v in corners} >= {(0, 0.0), (300, 0.6), (0, 0.2), (300, 0.7)}
    assert sum(line.get_marker() == "x" for line in ax.lines) == 1  # seed 2's last finite evaluation
    assert tuple(next(line for line in ax.lines if line.get_marker() == "x").get_xydata()[0]) == (200, 0.4)
    caption = imagenet.figure_caption("cpu", rows)
    assert "mean top-1 over its seeds" in caption and "from the lowest to the highest seed" in caption


def test_fig_3_gives_a_row_of_several_seeds_as_mean_and_range(tmp_path):
    cpu = {"compression": 2.5e-4}  # a step stands for 4,000 paper steps
    steps = [0, 100, 200, 300]
    # Inception: max 50%, 52% and 56%, so the target is their mean, 52.67%; each seed counts to its own max, reached
    # at 200, 300 and 300
    for seed, top1 in enumerate([[0.1, 0.3, 0.5, 0.5], [0.1, 0.4, 0.5, 0.52], [0.1, 0.5, 0.55, 0.56]]):
        write_run(tmp_path, f"inception-{seed}", "inception", "cpu", steps, top1, extra={**cpu, "seed": seed})
    # BN-x5: seed 0 reaches 52.67% at 200; seed 1 never; seed 2 reaches it at 100, then diverges at 150
    write_run(tmp_path, "x5-0", "bn-x5", "cpu", steps, [0.1, 0.5, 0.6, 0.7], extra={**cpu, "seed": 0})
    write_run(tmp_path, "x5-1", "bn-x5", "cpu", steps, [0.1, 0.45, 0.49, 0.49], extra={**cpu, "seed": 1})
    write_run(tmp_path, "x5-2", "bn-x5", "cpu", steps, [0.1, 0.6, NAN, NAN], status="diverged", diverged_at=150,
              extra={**cpu, "seed": 2})
    write_run(tmp_path, "baseline", "bn-baseline", "cpu", steps, [0.1, 0.3, 0.5, 0.55], extra=cpu)
    imagenet.build(tmp_path, tmp_path / "report")
    rows = table_rows((tmp_path / "report" / "imagenet.md").read_text(), "cpu")
    inception, x5, baseline = rows["Inception"], rows["BN-x5"], rows["BN-Baseline"]
    assert inception["Max accuracy"] == "52.7% (50.0-56.0, 3 seeds)" and inception["Seeds"] == "0/1/2"
    assert inception["Steps to target"] == "262 (200-300, 3 seeds)"  # (200 x 300 x 300) ** (1/3): all reach it
    assert inception["Paper-equivalent steps to target"] == "1.0e6 (0.8e6-1.2e6, 3 seeds)"
    assert inception["Speed-up vs Inception"] == "1.0x"
    assert x5["Max accuracy"] == "59.7% (49.0-70.0, 3 seeds)"
    assert x5["Steps to target"] == \
        "141 (100-200, 2 of 3 seeds; seed 1 never; seed 2 diverged at 150 after reaching it)"  # sqrt(100 x 200)
    assert x5["Paper-equivalent steps to target"].endswith("seed 2 diverged at 0.6e6 after reaching it)")
    assert x5["Speed-up vs Inception"] == "1.9x"  # 262 / 141, geometric means over the seeds that reach the target
    # one seed: counted to the target like any row other than Inception
    assert (baseline["Steps to target"], baseline["Max accuracy"], baseline["Seeds"]) == ("300", "55.0%", "0")
    assert baseline["Speed-up vs Inception"] == "0.9x"  # 262 / 300


def test_a_row_whose_seeds_never_reach_the_target_says_which_diverged(tmp_path):
    for seed in range(3):
        write_run(tmp_path, f"i{seed}", "inception", "cpu", STEPS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.9 if seed == 0 else 0.5],
                  extra={"seed": seed})
        top1 = [0.1, 0.2, 0.3, NAN, NAN, NAN] if seed else [0.1, 0.2, 0.3, 0.3, 0.3, 0.3]
        write_run(tmp_path, f"x{seed}", "inception-x5", "cpu", STEPS, top1, status="diverged" if seed else "complete",
                  diverged_at=250 if seed else None, extra={"seed": seed})
    imagenet.build(tmp_path, tmp_path / "report")
    row = table_rows((tmp_path / "report" / "imagenet.md").read_text(), "cpu")["Inception-x5"]
    assert row["Steps to target"] == "never (3 seeds; seed 1 diverged at 250; seed 2 diverged at 250)"
    assert row["Max accuracy"] == "30.0% (30.0-30.0, 3 seeds)" and row["Speed-up vs Inception"] == "—"
    svg = (tmp_path / "report" / "fig2_imagenet_cpu.svg").read_text()
    assert "mean of 3 seeds, band: min-max; 2 of 3 diverged" in svg


def test_the_target_is_the_mean_of_inceptions_seeds_max_each_inception_seed_counting_to_its_own(tmp_path, monkeypatch):
    steps = [0, 100, 200, 300]
    # Inception's seeds' max: 79% (first at 200), 80% (first at 100), 81% (at 300); T = their mean, 80%, which seed 0
    # never reaches: counted to T, Inception's row would read "2 of 3 seeds"; counted as claims v2 counts them, each
    # seed to its own max, all 3 reach it
    for seed, top1 in enumerate([[0.1, 0.5, 0.79, 0.79], [0.1, 0.8, 0.8, 0.7], [0.1, 0.5, 0.6, 0.81]]):
        write_run(tmp_path, f"inception-{seed}", "inception", "cpu", steps, top1, extra={"seed": seed})
    write_run(tmp_path, "bn-x5", "bn-x5", "cpu", steps, [0.1, 0.8, 0.9, 0.9])  # 80% at 100: T, less its rounding
    rows = latest_per_recipe(finished_runs(tmp_path))["cpu"]
    target = target_for("cpu", rows)
    assert target == pytest.approx(0.80) and target == float(seed_maxes(rows["inception"]).mean())
    # claims v2's T is this one; v1 keeps its own, the lowest seed's max
    assert v2.target("cpu", rows).level == target and v1.target("cpu", rows) == 0.79
    assert [seed_steps(r, target, own_max=True) for r in rows["inception"].seeds] == [200, 100, 300]
    assert [seed_steps(r, target) for r in rows["inception"].seeds] == [None, 100, 300]

    imagenet.build(tmp_path, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    table = table_rows(md, "cpu")
    assert table["Inception"]["Steps to target"] == "182 (100-300, 3 seeds)"  # (200 x 100 x 300) ** (1/3)
    assert table["Inception"]["Max accuracy"] == "80.0% (79.0-81.0, 3 seeds)"
    assert (table["BN-x5"]["Steps to target"], table["BN-x5"]["Speed-up vs Inception"]) == ("100", "1.8x")
    assert "Target accuracy: 80.0%, the mean over Inception's 3 seeds of their best top-1 (claims v2's T; as in the " \
        "paper, Inception's maximum): 79.0%/80.0%/81.0% (seeds 0/1/2). Inception's steps to target are each seed's " \
        "first evaluation of its own best" in md
    assert "claims.md's rules v1 keep their own target, the best top-1 of Inception's lowest seed" in md

    drawn = {}
    monkeypatch.setattr(imagenet, "save_figure", lambda fig, out, name: drawn.setdefault("fig", fig) and [])
    imagenet.figure_2("cpu", rows, target, tmp_path)
    lines = {line.get_label(): line for line in drawn["fig"].axes[0].lines}
    plt.close(drawn["fig"])
    assert list(lines["target: mean of Inception's 3 seeds' max (80.0%)"].get_ydata()) == pytest.approx([0.8, 0.8])
    assert "The dotted grey line is the target: the mean over Inception's seeds" in imagenet.figure_caption("cpu", rows)


def test_cifar10_from_image_files_is_said_to_be_a_re_encoding_and_the_original_batches_are_not(tmp_path):
    """Issue 21: every report on CIFAR-10 read from a folder copy (shared/data/cifar10's JPEGs) says its accuracies are
    not comparable with published CIFAR-10 figures; on the original batches, or on other data, nothing is said."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    folders = {**CIFAR, "name": "class folders 'cifar10'", "format": "folders", "classes": classes}
    for name, identity, said in [("folders", folders, True), ("batches", {**CIFAR, "classes": classes}, False),
                                 ("other", {**folders, "train_examples": 49_000}, False)]:
        root = tmp_path / name / "results"
        for recipe in ("inception", "bn-x5"):
            write_run(root, recipe, recipe, "cpu", STEPS, [0.1, 0.5, 0.6, 0.6, 0.6, 0.6],
                      extra={"data_identity": identity})
        build(root, tmp_path / name / "report")
        for page in ("imagenet.md", "claims.md"):
            md = (tmp_path / name / "report" / page).read_text()
            assert ("not comparable with published CIFAR-10 figures" in md) is said, (name, page)
