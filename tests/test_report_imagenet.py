"""The ImageNet report (Fig. 2 curves, Fig. 3 table) on fabricated run folders: the numbers below are made up so
that steps-to-target and speed-ups can be checked by hand; no training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import markdown_rows

from bnrepro.errors import UserError
from bnrepro.paper import PAPER
from bnrepro.report import build, imagenet

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
    assert "Target accuracy: 50.0%" in md


def test_diverged_run_is_shown_as_diverged(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    row = table_rows(md, "proxy")["Inception-x5"]
    assert row["Steps to target"] == "diverged at 250"
    assert row["Max accuracy"] == "8.0%"  # over the finite evaluations before divergence
    assert row["Speed-up vs Inception"] == "—"
    assert "machine infinity" in md
    run = {r.recipe: r for r in imagenet.finished_runs(results) if r.profile == "proxy"}["inception-x5"]
    assert run.diverged_at == 250 and list(run.curve.step) == [0, 100, 200]  # the line Fig. 2 draws


def test_latest_finished_run_per_recipe_and_provenance(results, tmp_path):
    imagenet.build(results, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    proxy = md.split("## Profile `proxy`")[1].split("## Profile")[0]
    assert "`imagenet/b-inception`" in proxy and "`1ce000000000`" in proxy
    assert "fabricated proxy data for tests" in proxy
    assert "Older finished runs, not shown: `imagenet/z-older-inception`" in proxy
    assert "bn-x30" not in md and "BN-x30" not in table_rows(md, "proxy")  # running/interrupted are ignored
    chosen = imagenet.latest_per_recipe(imagenet.finished_runs(results))
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
    chosen = imagenet.latest_per_recipe(imagenet.finished_runs(results))
    assert imagenet.target_for("paper", chosen["paper"]) == 0.722  # not Inception's 0.73 here
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
    text = imagenet.markdown_table(pd.DataFrame({"a": ["x|y"], "b": [1]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_seeds_and_overrides_are_rows_of_their_own(tmp_path):
    root = tmp_path / "results"
    write_run(root, "a-inception", "inception", "proxy", STEPS, [0.0, 0.1, 0.2, 0.4, 0.5, 0.45], extra={"seed": 0})
    # a later, better seed 1 does not replace seed 0's row (nor its target): it is the other seeds' max
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
    chosen = imagenet.latest_per_recipe(imagenet.finished_runs(root))["proxy"]
    assert list(chosen) == ["inception", "bn-x5", "bn-x5 [train.shuffle=shards]"]
    assert chosen["inception"].path.name == "a-inception" and chosen["inception"].seed == 0
    assert [r.path.name for r in chosen["inception"].others] == ["b-inception-seed1"]
    assert chosen["bn-x5"].path.name == "e-bn-x5-budget" and chosen["bn-x5"].others == ()

    imagenet.build(root, tmp_path / "report")
    md = (tmp_path / "report" / "imagenet.md").read_text()
    rows = table_rows(md, "proxy")
    assert list(rows) == ["Inception", "BN-x5", "BN-x5, shards only (no change 6)"]
    assert rows["Inception"]["Max accuracy"] == "50.0%" and rows["Inception"]["Other seeds' max"] == "60.0% (seed 1)"
    assert rows["BN-x5"]["Other seeds' max"] == "—" and rows["BN-x5"]["Max accuracy"] == "71.0%"
    assert (rows["BN-x5, shards only (no change 6)"]["Steps to target"],
            rows["BN-x5, shards only (no change 6)"]["Max accuracy"]) == ("200", "70.0%")
    assert "Target accuracy: 50.0%" in md
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
    assert imagenet.paper_steps_text(31.0e6) == "31.0e6" and imagenet.paper_steps_text(4000) == "4,000"


# --- provenance without the machine's paths, commits with their +dirty, lines told apart --------------------------


def test_commits_keep_their_dirty_flag():
    assert imagenet.short_commit("bc4b6daa9bcf514e3d430eeb8cbb0c79ee266d24+dirty") == "bc4b6daa9bcf+dirty"
    assert imagenet.short_commit("017d741f6c60fa43984e92015bc6549d5f52d632") == "017d741f6c60"
    assert imagenet.short_commit(None) == "not recorded"


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
    assert imagenet.without_paths("/data/imagenet/train (3 train)") == "…/imagenet/train (3 train)"
    assert imagenet.without_paths("12 shards in ../packed (5 train)") == "12 shards (5 train)"


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
    chosen = imagenet.latest_per_recipe(imagenet.finished_runs(root))["cpu"]
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
    runs = {r.recipe: r for r in imagenet.finished_runs(tmp_path)}
    assert runs["bn-x5"].lagging.tolist() == [False, True, True, True, True, False]
    assert not runs["inception"].lagging.any()
    imagenet.build(tmp_path, tmp_path / "report")
    assert "open circles" in (tmp_path / "report" / "imagenet.md").read_text()

