"""The real command line, each command its own process (exit codes, stdout/stderr, run folders).

The Ctrl-C tests start the `bnrepro` console script itself; the other commands are forked from one process
that has already imported the package (forked_cli.py), which does what the console script does and saves
the ~4 s torch/torchvision import per command. Every process gets its own BNREPRO_CACHE (nothing downloads)
and one CPU thread, and runs with stdin from /dev/null and no COLUMNS, i.e. as in a pipe, a log file or
CI, where rich formats for 80 columns.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, write_mnist

from bnrepro import recipes
from bnrepro.errors import UserError
from bnrepro.runs import new_run_dir, resolve_device

BNREPRO = shutil.which("bnrepro", path=str(Path(sys.executable).parent)) or shutil.which("bnrepro")
pytestmark = pytest.mark.skipif(BNREPRO is None, reason="the bnrepro console script is not installed")

COLUMNS = ["variant", "seed", "step", "statistics", "test_accuracy", "train_loss", "p15", "p50", "p85"]


def cli_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "BNREPRO_DATA")}
    env.update(BNREPRO_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def bnrepro(*args, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([BNREPRO, *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=timeout)


def start(*args, env: dict[str, str]) -> subprocess.Popen:
    """Start `bnrepro` with the default SIGINT disposition (as from a terminal), whatever pytest inherited."""
    return subprocess.Popen([BNREPRO, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def runs_under(out: Path) -> list[Path]:
    folder = Path(out) / "mnist"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def squeeze(text: str) -> str:
    """``text`` without any whitespace: finds a message however the console wrapped it."""
    return re.sub(r"\s+", "", text)


# ---------------------------------------------------------------------------------------------------------------
# One short end-to-end run, a second run, and the report.

@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data, out, env = write_mnist(root / "data"), root / "out", cli_env(root / "cache")
    common = ["--data-dir", str(data), "--out", str(out), "--no-progress", "--device", "cpu"]
    done = run_many({  # one after the other
        "first": ["mnist", "--steps", "300", "--seeds", "2", *common, "--set", "eval.every=100"],
        "second": ["mnist", "--steps", "0", *common],
        "report": ["report", "--results", str(out)],
    }, env)
    first, second = runs_under(out)  # folder names sort by start time
    return SimpleNamespace(root=root, data=data, out=out, overrides=["eval.every=100", "train.steps=300"],
                           first=done["first"], second=done["second"], report=done["report"], run=first,
                           other=second)


def test_mnist_run_prints_the_summary_and_its_folder(e2e):
    assert e2e.first.returncode == 0
    assert "Traceback" not in e2e.first.stderr
    deviations = ["  - recipe changed for this run: --set eval.every=100",
                  "  - recipe changed for this run: --set train.steps=300"]
    assert e2e.first.stderr.splitlines() == ["MNIST: 2 deviations from the paper:", *deviations,
                                             "MNIST, finished: 2 deviations from the paper:", *deviations]
    assert e2e.first.stdout.count("results:") == 1
    assert squeeze(str(e2e.run)) in squeeze(e2e.first.stdout)
    assert "With BN" in e2e.first.stdout and "Without BN" in e2e.first.stdout


def test_metrics_csv(e2e):
    metrics = pd.read_csv(e2e.run / "metrics.csv")
    assert list(metrics.columns) == COLUMNS
    assert sorted(metrics.step.unique()) == [0, 100, 200, 300]
    assert sorted(metrics.variant.unique()) == ["baseline", "bn"]
    assert sorted(metrics.seed.unique()) == [0, 1]
    assert len(metrics) == 4 * 2 * 2
    assert not metrics.duplicated(["variant", "seed", "step"]).any()
    assert (metrics.statistics == "population").all()  # Alg. 2 at every evaluation (eval.statistics)
    trained = metrics[metrics.step > 0]
    for column in COLUMNS[4:]:
        assert trained[column].map(math.isfinite).all(), column
    assert trained.test_accuracy.between(0, 1).all()
    assert (trained.train_loss > 0).all()
    assert (trained.p15 <= trained.p50).all() and (trained.p50 <= trained.p85).all()
    final = metrics[metrics.step == 300]
    assert (final.test_accuracy > 0.2).all()  # learnable fake data: well above chance (0.1)


def test_summary_json(e2e):
    summary = json.loads((e2e.run / "summary.json").read_text())
    assert summary["steps"] == 300
    assert summary["baseline"] == "baseline"
    assert set(summary["variants"]) == {"baseline", "bn"}
    assert summary["divergences"] == []
    metrics = pd.read_csv(e2e.run / "metrics.csv")
    for name, v in summary["variants"].items():
        assert v["seeds"] == 2
        finals = metrics[(metrics.variant == name) & (metrics.step == 300)].test_accuracy
        assert math.isfinite(v["final_test_accuracy_mean"]) and math.isfinite(v["final_test_accuracy_std"])
        assert v["final_test_accuracy_mean"] > 0.2
        assert v["final_test_accuracy_mean"] == pytest.approx(finals.mean(), abs=1e-9)
        assert v["final_test_accuracy_std"] == pytest.approx(finals.std(ddof=1), abs=1e-9)
    assert summary["variants"]["bn"]["label"] == "With BN"
    assert summary["variants"]["baseline"]["label"] == "Without BN"


def test_recipes_yaml_is_the_resolved_recipes(e2e):
    resolved = yaml.safe_load((e2e.run / "recipes.yaml").read_text())
    assert set(resolved) == {"baseline", "bn"}
    for name in resolved:
        assert resolved[name] == recipes.load(f"mnist/{name}", e2e.overrides).model_dump(mode="json")
    assert resolved["bn"]["train"]["steps"] == 300 and resolved["bn"]["eval"]["every"] == 100


def test_manifest_json(e2e):
    manifest = json.loads((e2e.run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["experiment"] == "mnist"
    assert manifest["seeds"] == [0, 1]
    assert manifest["data_seed"] == 0
    for name in ("baseline", "bn"):
        entry = manifest["recipes"][name]
        assert entry["source"] == f"mnist/{name}"
        assert entry["digest"] == recipes.load(f"mnist/{name}", e2e.overrides).digest
    assert manifest["data"]["matches_official_md5"] is False
    assert manifest["data"]["source"] == str(e2e.data / "mnist" / "raw")
    for package in ("python", "torch", "bnrepro"):
        assert manifest["versions"][package] not in ("", "absent")
    assert manifest["versions"]["torch"] == metadata.version("torch")
    assert "CPU" in manifest["device"]
    if (REPO / ".git").exists() and shutil.which("git"):
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", manifest["git_commit"]), manifest["git_commit"]
    else:
        assert manifest["git_commit"]
    assert isinstance(manifest["wall_seconds"], (int, float)) and manifest["wall_seconds"] >= 0
    assert manifest["started"] and manifest["finished"]


def test_no_checkpoint_or_temporary_file_left(e2e):
    for run in (e2e.run, e2e.other):
        assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "metrics.csv", "recipes.yaml",
                                                         "summary.json"]


def test_a_second_run_gets_a_new_folder(e2e):
    assert e2e.second.returncode == 0, e2e.second.stderr
    assert runs_under(e2e.out) == [e2e.run, e2e.other]
    assert squeeze(str(e2e.other)) in squeeze(e2e.second.stdout)
    assert json.loads((e2e.other / "summary.json").read_text())["steps"] == 0
    assert sorted(pd.read_csv(e2e.other / "metrics.csv").step.unique()) == [0]
    # the first run is untouched
    assert json.loads((e2e.run / "summary.json").read_text())["steps"] == 300
    assert sorted(pd.read_csv(e2e.run / "metrics.csv").step.unique()) == [0, 100, 200, 300]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError):
            resolve_device("cuda")


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    made = [new_run_dir(tmp_path) for _ in range(3)]
    assert len(set(made)) == 3
    assert all(p.is_dir() and p.parent == tmp_path and not any(p.iterdir()) for p in made)


def test_report(e2e):
    assert e2e.report.returncode == 0, e2e.report.stderr
    folder = e2e.out / "report"
    png, svg, md = folder / "fig1_mnist.png", folder / "fig1_mnist.svg", folder / "mnist.md"
    for path in (png, svg, md):
        assert path.is_file() and path.stat().st_size > 0
        assert squeeze(str(path)) in squeeze(e2e.report.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in svg.read_text()
    text = md.read_text()
    assert "With BN" in text and "Without BN" in text
    for run in runs_under(e2e.out):  # each run's row names its engine
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{run.name}`")]
        assert f"| {json.loads((run / 'manifest.json').read_text())['engine']} |" in row
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_fig1_caption_names_the_probed_unit(tmp_path):
    """Fig. 1(b, c) follow eval.probe_unit of the run's recipes, and the caption says which unit that was."""
    from bnrepro.report.mnist import figure_1

    run = tmp_path / "20260101-000000"
    run.mkdir()
    resolved = {name: recipes.load(f"mnist/{name}", ["eval.probe_unit=7"]).model_dump(mode="json")
                for name in ("baseline", "bn")}
    (run / "recipes.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    rows = [{"variant": v, "seed": 0, "step": step, "test_accuracy": 0.9, "train_loss": 0.1, "p15": -1.0,
             "p50": 0.0, "p85": 1.0} for v in ("baseline", "bn") for step in (0, 100)]
    pd.DataFrame(rows, columns=COLUMNS).to_csv(run / "metrics.csv", index=False)
    (run / "summary.json").write_text(json.dumps({"baseline": "baseline", "variants": {
        "baseline": {"label": "Without BN"}, "bn": {"label": "With BN"}}}))
    (run / "manifest.json").write_text(json.dumps({"experiment": "mnist", "status": "complete"}))
    svg = next(p for p in figure_1(run, tmp_path) if p.suffix == ".svg")
    (caption,) = re.findall(r"<!-- (Fig\. 1 reproduced.*?) -->", svg.read_text())
    assert "of unit 7, seed 0" in caption, caption


def test_figures_are_the_same_bytes_every_time(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnrepro.report import save_figure

    made = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        fig, ax = plt.subplots()
        ax.fill_between([0, 1, 2], [0, 1, 0], [1, 2, 1], alpha=0.3)  # clipped, so the SVG holds clip-path ids
        made.append([path.read_bytes() for path in save_figure(fig, tmp_path / folder, "fig")])
    assert made[0] == made[1]


# ---------------------------------------------------------------------------------------------------------------
# Short commands and every user error, forked one after the other from one process (see run_many).

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_deflate(path: Path) -> None:
    import gzip

    path.write_bytes(gzip.compress(b"x")[:10] + b"\xff" * 64)


ERRORS = {
    # name: (arguments after `mnist`, words the message must contain)
    "unknown-key": (["--set", "train.lrr=1"], ["train.lrr"]),
    "wrong-type": (["--set", "train.steps=abc"], ["train.steps"]),
    "bad-set-syntax": (["--set", "k"], ["'k'"]),
    "negative-steps": (["--steps", "-1"], ["--steps", "-1"]),
    "zero-seeds": (["--seeds", "0"], ["--seeds"]),
    "unknown-recipe": (["--recipe", "nope"], ["nope"]),
    "missing-data": (["--data-dir", "{root}/nowhere"], ["{root}/nowhere/mnist/raw", "{root}/nowhere/MNIST/raw"]),
    "truncated-data": (["--data-dir", "{root}/truncated"], ["train-images-idx3-ubyte.gz"]),
    "corrupt-deflate": (["--data-dir", "{root}/deflate"], ["t10k-labels-idx1-ubyte.gz"]),
    "unwritable-out": (["--out", "{root}/a-file/out"], ["{root}/a-file/out"]),
    "no-cuda": (["--device", "cuda"], ["cuda"]),
    "resume-complete": (["--resume", "{root}/complete-run"], ["already complete"]),
    "resume-not-a-run": (["--resume", "{root}/data"], ["not an MNIST run folder"]),
    "resume-other-data": (["--resume", "{root}/other-data-run"], ["other data", "{root}/data/mnist/raw"]),
    # a setup option beside --resume would be ignored (the run's folder says how it was set up): an error, even at
    # the option's default value
    "resume-with-setup": (["--resume", "{root}/other-data-run", "--seeds", "1", "--set", "train.lr=1"],
                          ["drop --seeds, --set"]),
    "batch-larger-than-data": (["--set", "train.batch_size=601"], ["601", "600"]),
    "probe-unit-out-of-range": (["--set", "eval.probe_unit=100"], ["probe_unit"]),
    "percentile-out-of-range": (["--set", "eval.percentiles=[150]"], ["percentiles"]),
    "steps-and-set-steps": (["--steps", "10", "--set", "train.steps=banana"], ["--steps 10", "train.steps=banana"]),
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    env = cli_env(root / "cache")
    data = write_mnist(root / "data")
    _truncate(write_mnist(root / "truncated") / "mnist" / "raw" / "train-images-idx3-ubyte.gz")
    _bad_deflate(write_mnist(root / "deflate") / "mnist" / "raw" / "t10k-labels-idx1-ubyte.gz")
    (root / "a-file").write_text("a regular file, not a folder\n")
    (root / "complete-run").mkdir()
    (root / "complete-run" / "manifest.json").write_text(json.dumps({"experiment": "mnist", "status": "complete"}))
    (root / "complete-run" / "recipes.yaml").write_text("{}\n")
    short = ["train.steps=5", "eval.population_batches=10"]
    resolved = {name: recipes.load(f"mnist/{name}", short).model_dump(mode="json") for name in ("baseline", "bn")}
    for name, data_record in (("no-checkpoint-run", {}),  # a run that died before its first checkpoint
                              ("other-data-run", {"source": "/elsewhere", "arrays_sha256": "0" * 64})):
        (root / name).mkdir()
        (root / name / "recipes.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (root / name / "manifest.json").write_text(json.dumps(
            {"experiment": "mnist", "status": "interrupted", "seeds": [0], "data_seed": 0, "data": data_record}))

    commands = {"recipes-list": ["recipes", "list"], "recipes-show": ["recipes", "show", "mnist/bn"],
                "recipes-show-set": ["recipes", "show", "mnist/baseline", "--set", "train.lr=0.1"],
                "report-nothing": ["report", "--results", str(root / "no-results")],
                # a learning rate that overflows float32 within two steps, for every member
                "diverge": ["mnist", "--steps", "100", "--seeds", "2", "--data-dir", str(data), "--out",
                            str(root / "diverge"), "--no-progress", "--device", "cpu", "--set", "eval.every=50",
                            "--set", "train.lr=1e38"],
                "imagenet-steps-and-set-steps": ["imagenet", "--recipe", "imagenet/bn-baseline", "--profile", "smoke",
                                                 "--dataset-dir", str(root / "nowhere"), "--device", "cpu",
                                                 "--out", str(root / "imagenet-out"), "--steps", "3",
                                                 "--set", "profiles.smoke.steps=7"],
                "resume-no-checkpoint": ["mnist", "--resume", str(root / "no-checkpoint-run"), "--data-dir", str(data),
                                         "--no-progress", "--device", "cpu"],
                "sweep-resume-of-an-mnist-run": ["sweep", "--resume", str(root / "complete-run"), "--no-progress"],
                "sweep-resume-with-a-grid": ["sweep", "--resume", str(root / "complete-run"), "--lrs", "3",
                                             "--out", str(root / "elsewhere")],
                "imagenet-resume-with-setup": ["imagenet", "--resume", str(root / "complete-run"), "--seed", "0",
                                               "--no-resident"]}
    for name, (args, _) in ERRORS.items():
        args = [a.format(root=root) for a in args]
        setup = "--resume" not in args  # a resume takes no setup options (resume-with-setup)
        out = ["--out", str(root / name / "out")] if setup and "--out" not in args else []
        data_dir = [] if "--data-dir" in args else ["--data-dir", str(data)]
        device = [] if "--device" in args else ["--device", "cpu"]
        # --steps and a --set of train.steps clash
        steps = ["--steps", "5"] if setup and not any("steps" in a for a in args) else []
        commands[name] = ["mnist", "--no-progress", *steps, *out, *data_dir, *device, *args]
    return SimpleNamespace(root=root, results=run_many(commands, env))


def run_many(commands: dict[str, list[str]], env: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    """Each command as its own `bnrepro` process: forked from one process that has imported the package (see
    forked_cli.py), which saves the ~4 s import per command; without os.fork, plain subprocesses."""
    if not hasattr(os, "fork"):
        with ThreadPoolExecutor(max_workers=2) as pool:
            return dict(zip(commands, pool.map(lambda args: bnrepro(*args, env=env), commands.values())))
    driver = subprocess.run([sys.executable, str(Path(__file__).with_name("forked_cli.py"))],
                            input=json.dumps(commands), capture_output=True, text=True, env=env, timeout=600)
    assert driver.returncode == 0, driver.stderr
    return {name: subprocess.CompletedProcess(commands[name], r["returncode"], r["stdout"], r["stderr"])
            for name, r in json.loads(driver.stdout).items()}


def test_recipes_list(quick):
    result = quick.results["recipes-list"]
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("mnist/baseline", "mnist/bn"):
        assert any(line.startswith(name + " ") for line in lines), result.stdout


def test_recipes_show(quick):
    result = quick.results["recipes-show"]
    assert result.returncode == 0, result.stderr
    assert f"digest {recipes.load('mnist/bn').digest}" in result.stdout
    assert re.search(r"^\s+batch_norm: true$", result.stdout, re.M)
    assert re.search(r"^label: With BN$", result.stdout, re.M)
    shown = quick.results["recipes-show-set"]
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^\s+lr: 0\.1$", shown.stdout, re.M)
    assert re.search(r"^\s+batch_norm: false$", shown.stdout, re.M)


def test_recipes_show_prints_the_resolved_recipe_as_yaml(quick):
    shown = yaml.safe_load(quick.results["recipes-show"].stdout)
    assert shown == recipes.load("mnist/bn").model_dump(mode="json")


def test_report_without_runs_is_a_user_error(quick):
    result = quick.results["report-nothing"]
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def _error_params():
    for name in ERRORS:
        extra = [pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")] * (name == "no-cuda")
        yield pytest.param(name, marks=extra, id=name)


@pytest.mark.parametrize("name", list(_error_params()))
def test_user_error_exit_code_message_and_no_run_folder(quick, name):
    result = quick.results[name]
    _, words = ERRORS[name]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("error:") == 1
    assert result.stdout.strip() == ""
    for word in words:
        assert squeeze(word.format(root=quick.root)) in squeeze(result.stderr), (word, result.stderr)
    assert runs_under(quick.root / name / "out") == []
    if name == "unwritable-out":
        assert (quick.root / "a-file").is_file()


@pytest.mark.parametrize("name", list(_error_params()))
def test_user_error_is_exactly_one_line(quick, name):
    result = quick.results[name]
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.endswith("\n")


def test_imagenet_steps_and_a_set_of_the_same_key_is_a_user_error(quick):
    result = quick.results["imagenet-steps-and-set-steps"]
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for word in ("--steps 3", "profiles.smoke.steps=7"):
        assert squeeze(word) in squeeze(result.stderr), result.stderr
    assert not (quick.root / "imagenet-out").exists()


def test_a_run_that_died_before_its_first_checkpoint_trains_again_from_step_0(quick):
    result = quick.results["resume-no-checkpoint"]
    assert result.returncode == 0, result.stderr
    run = quick.root / "no-checkpoint-run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["restarted"]) == 1
    assert sorted(pd.read_csv(run / "metrics.csv").step.unique()) == [0, 5]


def test_sweep_resume_of_an_mnist_run_names_the_command_that_continues_it(quick):
    result = quick.results["sweep-resume-of-an-mnist-run"]
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"bnrepro mnist --resume {quick.root / 'complete-run'}" in result.stderr


@pytest.mark.parametrize("name, flags", [("sweep-resume-with-a-grid", "drop --lrs, --out"),
                                         ("imagenet-resume-with-setup", "drop --seed, --resident/--no-resident")])
def test_a_setup_option_beside_resume_is_refused_not_ignored(quick, name, flags):
    result = quick.results[name]
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: --resume continues a run exactly as it was set up; " + flags)


def test_ctrl_c_in_a_sweep_prints_the_sweeps_own_resume_command(tmp_path):
    from bnrepro import cli
    from bnrepro.engine.trainer import Interrupted

    run = tmp_path / "my results" / "sweep" / "20260101-000000"
    line = cli.resume_command(Interrupted(40, run / "checkpoint.pt"), "sweep", tmp_path / "my data", "auto", "torch")
    assert line == (f"bnrepro sweep --resume {shlex.quote(str(run))} --data-dir "
                    f"{shlex.quote(str(tmp_path / 'my data'))} --engine torch")


# A bad command line (the parser's usage errors), from the real entry point in a fresh process.
USAGE_ERRORS = {
    # name: (arguments, words the message must contain)
    "unknown-option": (["mnist", "--no-such-flag"], ["No such option", "--no-such-flag"]),
    "bad-option-value": (["mnist", "--seeds", "banana"], ["--seeds"]),
    "unexpected-argument": (["mnist", "extra"], ["unexpected extra argument", "extra"]),
}


def _assert_usage_error(result: subprocess.CompletedProcess, words: list[str]) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines == result.stderr.splitlines(), result.stderr
    assert lines[0].startswith("error: ") and "mnist --help" in lines[0], lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.stdout == ""


@pytest.mark.parametrize("name", USAGE_ERRORS)
def test_usage_error_is_one_line_and_exit_code_2(tmp_path, name):
    args, words = USAGE_ERRORS[name]
    result = subprocess.run([sys.executable, "-m", "bnrepro", *args], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=300, env=cli_env(tmp_path / "cache"))
    _assert_usage_error(result, words)


def test_usage_error_does_not_need_the_click_package(tmp_path):
    """typer >= 0.29 vendors click and no longer installs it: with `click` unimportable, a usage error is still
    one line and exit code 2 (the handler once did `import click` and died of ModuleNotFoundError)."""
    import typer

    if typer.BadParameter.__module__.split(".")[0] == "click":
        pytest.skip("this typer is built on the click package, so it cannot run without it")
    script = (
        "import sys\n"
        "class NoClick:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'click' or name.startswith('click.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoClick())\n"
        "try:\n"
        "    import click\n"
        "    sys.exit('click is still importable')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "sys.argv = ['bnrepro', 'mnist', '--no-such-flag']\n"
        "import bnrepro.cli\n"
        "bnrepro.cli.run()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300, env=cli_env(tmp_path / "cache"))
    _assert_usage_error(result, USAGE_ERRORS["unknown-option"][1])


def test_default_workers_is_4_or_the_usable_cpus_if_fewer(monkeypatch):
    from bnrepro.runs import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers() == 4
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert default_workers() == 3


def test_ensemble_without_workers_uses_the_default_workers(monkeypatch, tmp_path):
    from bnrepro import cli, runs
    from bnrepro.evaluate import ensemble as evaluation

    given = []

    def evaluate(recipe, overrides, results, dataset_dir, out, device, workers, *args, **kwargs):
        given.append(workers)
        raise UserError("stop here")

    monkeypatch.setattr(runs, "default_workers", lambda: 3)
    monkeypatch.setattr(evaluation, "run", evaluate)
    for args in (["ensemble", "--dataset-dir", str(tmp_path)],
                 ["ensemble", "--dataset-dir", str(tmp_path), "--workers", "0"]):
        monkeypatch.setattr(sys, "argv", ["bnrepro", *args])
        with pytest.raises(SystemExit) as caught:
            cli.main()
        assert caught.value.code == 2
    assert given == [3, 0]


@pytest.mark.parametrize(("args", "code"), [(["recipes", "list"], 0), (["mnist", "--seeds", "0"], 2)])
def test_the_command_exits_with_its_code_after_threads_and_exit_handlers(tmp_path, args, code):
    """run() skips only the interpreter's teardown of modules: a thread still finishes, an exit handler still
    runs, the output is all there, and the exit status is the command's."""
    marks = tmp_path / "marks"
    script = (
        "import atexit, sys, threading, time\n"
        f"marks = open({str(marks)!r}, 'a')\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), marks.write('thread\\n'), marks.flush())).start()\n"
        "atexit.register(lambda: (marks.write('atexit\\n'), marks.flush()))\n"
        f"sys.argv = ['bnrepro', *{args!r}]\n"
        "from bnrepro.cli import run\n"
        "run()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=cli_env(tmp_path / "cache"))
    assert result.returncode == code, result.stderr
    assert marks.read_text() == "thread\natexit\n"
    if code == 0:
        assert "mnist/bn" in result.stdout
    else:
        assert result.stderr.startswith("error: --seeds must be at least 1") and "Traceback" not in result.stderr


def test_ctrl_c_before_the_first_checkpoint_exits_130(monkeypatch, capsys):
    from bnrepro import cli
    from bnrepro.experiments import mnist as experiment

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted)
    monkeypatch.setattr(sys, "argv", ["bnrepro", "mnist", "--no-progress"])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 130
    assert "interrupted" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Divergence: a learning rate that overflows float32 within two steps, for every member.

def test_divergence_is_recorded_not_a_crash(quick):
    result = quick.results["diverge"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (run,) = runs_under(quick.root / "diverge")
    summary = json.loads((run / "summary.json").read_text())
    members = {(d["variant"], d["seed"]) for d in summary["divergences"]}
    assert members == {("baseline", 0), ("baseline", 1), ("bn", 0), ("bn", 1)}
    for d in summary["divergences"]:
        assert set(d) == {"variant", "seed", "step"}
        assert isinstance(d["step"], int) and 1 <= d["step"] <= 50
    assert summary["steps"] == 50  # every member diverged: training stopped at the next evaluation
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    assert not (run / "checkpoint.pt").exists()
    assert (run / "metrics.csv").is_file()
    assert "diverged" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: a checkpoint at the next step boundary, exit code 130, and an exact resume.

STEPS = 5000  # ~2 s of training on the native engine: room for the signal to land inside the loop


def _wait_for_training(out: Path, proc: subprocess.Popen, deadline: float) -> Path | None:
    """The run folder, once its manifest says training has started (status 'interrupted' until it ends)."""
    while time.monotonic() < deadline and proc.poll() is None:
        for manifest in Path(out).glob("mnist/*/manifest.json"):
            try:
                if json.loads(manifest.read_text()).get("status") == "interrupted":
                    return manifest.parent
            except ValueError:
                pass  # being replaced right now
        time.sleep(0.05)
    return None


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by Ctrl-C, and continued by the command it printed, run verbatim by a shell (its data and run
    folders have spaces in their paths); and the same run never interrupted."""
    root = tmp_path_factory.mktemp("sigint")
    data, env = write_mnist(root / "my data"), cli_env(root / "cache")
    args = ["mnist", "--steps", STEPS, "--seeds", 1, "--data-seed", 3, "--data-dir", data, "--no-progress",
            "--device", "cpu", "--set", "eval.every=250", "--set", "eval.population_batches=100"]  # 3x quicker
    started: list[subprocess.Popen] = []
    try:
        reference = start(*args, "--out", root / "reference", env=env)  # the same run, never interrupted
        started.append(reference)
        cut = _interrupt(args, root, env, started)
        printed = cut.stderr.splitlines()[-1].partition("Continue with: ")[2]
        shell_env = {**env, "PATH": f"{Path(BNREPRO).parent}{os.pathsep}{env.get('PATH', '')}"}
        resumed = subprocess.run(printed, shell=True, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 env=shell_env, timeout=300)
        _, ref_err = reference.communicate(timeout=300)
        assert reference.returncode == 0, ref_err
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    (ref_run,) = runs_under(root / "reference")
    return SimpleNamespace(cut=cut, resumed=resumed, run=cut.run, reference=ref_run, printed=printed, args=args,
                           data=data, env=env, root=root)


def _interrupt(args, root: Path, env, started: list) -> SimpleNamespace:
    """Start the run, wait until it is training, send one SIGINT; retried with another delay if the signal
    came before the training loop (or after the run ended), which timing alone cannot rule out."""
    delay, attempts = 0.5, []
    for attempt in range(5):
        out = root / f"cut {attempt}"
        proc = start(*args, "--out", out, env=env)
        started.append(proc)
        if _wait_for_training(out, proc, time.monotonic() + 180) is not None:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=180)
        runs = runs_under(out)
        run = runs[0] if runs else None
        attempts.append((delay, proc.returncode, stderr[-1000:]))
        trained = run is not None and (run / "checkpoint.pt").exists()  # saved by the loop: on Ctrl-C, or at its end
        if proc.returncode == 130 and trained and "interrupted at step" in stderr:  # caught inside the loop
            return SimpleNamespace(returncode=proc.returncode, stderr=stderr, run=run,
                                   checkpoint=(run / "checkpoint.pt").is_file(),
                                   has_metrics=(run / "metrics.csv").exists(),
                                   manifest=json.loads((run / "manifest.json").read_text()))
        delay = delay / 4 if trained else delay * 2  # after the loop had ended, or before it began
    pytest.fail(f"could not interrupt a run inside its training loop: {attempts}")


def test_ctrl_c_saves_a_checkpoint_and_exits_130(interrupted):
    cut = interrupted.cut
    assert cut.returncode == 130
    assert cut.checkpoint
    assert not cut.has_metrics
    assert cut.manifest["status"] == "interrupted"
    assert "Traceback" not in cut.stderr
    step = int(re.search(r"interrupted at step (\d+)", cut.stderr).group(1))
    assert 0 < step <= STEPS
    assert squeeze(f"bnrepro mnist --resume {shlex.quote(str(cut.run))}") in squeeze(cut.stderr)


def test_ctrl_c_message_is_one_line_with_the_resume_command(interrupted):
    lines = interrupted.cut.stderr.splitlines()
    assert lines[0] == "MNIST: 3 deviations from the paper:", lines  # printed when the run started
    assert lines[1:4] == [f"  - recipe changed for this run: --set {key}" for key in (
        "eval.every=250", "eval.population_batches=100", f"train.steps={STEPS}")]
    stderr = "\n".join(lines[4:])
    assert len(stderr.splitlines()) == 1, stderr
    assert " " in str(interrupted.run) and " " in str(interrupted.data)
    assert stderr.endswith(f"Continue with: {interrupted.printed}")
    assert interrupted.printed == shlex.join(["bnrepro", "mnist", "--resume", str(interrupted.run), "--data-dir",
                                              str(interrupted.data), "--device", "cpu"])


def test_resume_finishes_the_run(interrupted):
    result = interrupted.resumed
    assert result.returncode == 0, result.stderr
    manifest = json.loads((interrupted.run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert len(manifest["resumed"]) == 1
    assert not (interrupted.run / "checkpoint.pt").exists()
    assert sorted(pd.read_csv(interrupted.run / "metrics.csv").step.unique()) == list(range(0, STEPS + 1, 250))


def test_resumed_run_equals_the_uninterrupted_run(interrupted):
    assert interrupted.resumed.returncode == 0, interrupted.resumed.stderr
    got = pd.read_csv(interrupted.run / "metrics.csv")
    want = pd.read_csv(interrupted.reference / "metrics.csv")
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=0, atol=1e-6)
    got_summary = json.loads((interrupted.run / "summary.json").read_text())
    want_summary = json.loads((interrupted.reference / "summary.json").read_text())
    assert got_summary == want_summary


# ---------------------------------------------------------------------------------------------------------------
# kill -9: no handler runs, so only the checkpoints written at every evaluation are there to resume from.

@pytest.fixture(scope="module")
def killed(interrupted):
    """The run of ``interrupted`` killed with SIGKILL once its first checkpoint is on disk (step 250 of 5,000, long
    before step 10,000), then resumed without --data-dir: the run's own folder is still there."""
    attempts = []
    for attempt in range(3):
        out = interrupted.root / f"killed {attempt}"
        proc = start(*interrupted.args, "--out", out, env=interrupted.env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("mnist/*/checkpoint.pt")):
            time.sleep(0.01)
        proc.kill()
        proc.communicate()
        (run,) = runs_under(out)
        manifest = json.loads((run / "manifest.json").read_text())
        attempts.append((proc.returncode, manifest["status"]))
        if proc.returncode == -signal.SIGKILL and manifest["status"] == "interrupted":
            step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
            resumed = bnrepro("mnist", "--resume", run, "--no-progress", "--device", "cpu", env=interrupted.env)
            return SimpleNamespace(run=run, step=step, resumed=resumed)
    pytest.fail(f"could not kill a run between its first checkpoint and its end: {attempts}")


def test_a_run_killed_with_sigkill_resumes_exactly(killed, interrupted):
    assert 0 < killed.step < int(STEPS) < 10_000
    assert killed.resumed.returncode == 0, killed.resumed.stderr
    manifest = json.loads((killed.run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["resumed"]) == 1 and "restarted" not in manifest
    pd.testing.assert_frame_equal(pd.read_csv(killed.run / "metrics.csv"),
                                  pd.read_csv(interrupted.reference / "metrics.csv"),
                                  check_exact=False, rtol=0, atol=1e-6)
    assert json.loads((killed.run / "summary.json").read_text()) == \
        json.loads((interrupted.reference / "summary.json").read_text())
