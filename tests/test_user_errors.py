"""Every way a command once ended in a traceback, a stranded or unresumable folder, or a silent loss (issue 18),
through the real command line, each command its own process: its exit code, its one line on stderr, no traceback,
and nothing left behind.

The data and the runs the cases start from are made once, in this process (a few seconds: the smoke profile at
width 1/8 on 36 tiny images); each case works on its own copy. The commands are forked from two driver processes
that have imported the package (``run_many``) and run side by side; the two cases that need a process of their own
(two resumes started 0.05 s apart, a file-size limit standing in for a full disk) run beside them.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import write_mnist
from test_cli import cli_env, run_many, squeeze
from test_imagenet import write_images

from bnrepro import recipes
from bnrepro.data.pack import pack
from bnrepro.engine import checkpoint
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.engine.trainer import Interrupted
from bnrepro.errors import UserError
from bnrepro.experiments import imagenet as experiment

SMALL = ["profiles.smoke.width=0.125"]  # 164 k parameters: a 1.5 MB checkpoint, steps in milliseconds
CPU = ["--device", "cpu", "--workers", "0", "--no-progress"]


@dataclass
class Case:
    """Commands run in order, each in its own process; the last is judged. ``code``: its exit status; ``words``: what
    its message must say; ``mid_run``: it fails after the run announced its deviations (the error is then the last
    line, not the only one); ``warnings``: on success, the files each ``warning: skipping`` line must name, in
    order; ``watch``: a folder that must end as it began, except for ``made`` (relative globs); ``check``: more, on
    the finished case."""

    commands: list[list[str]]
    code: int = 2
    words: tuple[str, ...] = ()
    mid_run: bool = False
    warnings: tuple[str, ...] = ()
    watch: Path | None = None
    made: tuple[str, ...] = ()
    check: Callable[[], None] | None = None
    before: dict[str, tuple[int, int]] = field(default_factory=dict)


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder``: relative path -> (size, mtime_ns); folders have size -1."""
    if not folder.exists():
        return {}
    found = {}
    for path in folder.rglob("*"):
        stat = path.lstat()
        found[path.relative_to(folder).as_posix()] = (-1 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return found


# --- the data and the runs every case starts from -------------------------------------------------------------------

def smoke_run(data: Path, out: Path, *sets: str, interrupt_at: int | None = None) -> Path:
    """A smoke run at width 1/8, in this process; with ``interrupt_at``, Ctrl-C during that step (the run saves a
    checkpoint there and stops, as `bnrepro imagenet` does)."""
    options = experiment.Options(data, device="cpu", workers=0, show_progress=False)
    if interrupt_at is None:
        return experiment.run("bn-x5", "smoke", [*SMALL, *sets], options, out, SINGLE_PROCESS)
    losses = experiment.ImagenetTask.losses

    def interrupt(self, step):
        if step == interrupt_at - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return losses(self, step)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment.ImagenetTask, "losses", interrupt)
        with pytest.raises(Interrupted) as stopped:
            experiment.run("bn-x5", "smoke", [*SMALL, *sets], options, out, SINGLE_PROCESS)
    return stopped.value.path.parent


def garbled(source: Path, dest: Path, split: str) -> Path:
    """Class folders like ``source`` whose ``split`` images are all unreadable, packed as shards in ``dest``."""
    folders = dest.with_name(dest.name + "-folders")
    shutil.copytree(source, folders)
    for image in (folders / split).glob("*/*"):
        image.write_bytes(b"\xff\xd8 not an image")
    pack(folders, dest, shard_size=5)
    return dest


def damage_shard(shard: Path, how: str) -> None:
    """Scramble a member's header (the tar reader stops there in silence) or cut the file at a member boundary."""
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        fifth = tar.getmembers()[4].offset
    if how == "scramble":
        shard.write_bytes(data[:fifth] + bytes(b ^ 0x5A for b in data[fifth:fifth + 512]) + data[fifth + 512:])
    else:
        shard.write_bytes(data[:fifth])


def read_only_folder(folder: Path) -> bool:
    """Make ``folder`` one this process cannot write to (root writes through permissions: a read-only tmpfs mount
    then); False where that cannot be done."""
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    try:
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    except OSError:  # no mount command
        return False
    return made.returncode == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shared data and runs, every case's setup, and every command's result."""
    root = tmp_path_factory.mktemp("user-errors")
    with pytest.MonkeyPatch.context() as patch:  # in-process runs must not touch the user's cache either
        patch.setenv("BNREPRO_CACHE", str(root / "cache"))
        folders = write_images(root / "folders", ["cat", "dog", "owl"], {"train": 12, "val": 4})
        shards = root / "shards"
        pack(folders, shards, shard_size=5)
        done = smoke_run(shards, root / "made")
        paused = smoke_run(shards, root / "made", "profiles.smoke.checkpoint_every=2", interrupt_at=2)
    w = SimpleNamespace(root=root, folders=folders, shards=shards, done=done, paused=paused, mounts=[])
    w.cases = {name: make(w, root / "cases" / name) for name, make in CASES.items()}
    for case in w.cases.values():
        if case is not None and case.watch is not None:
            case.before = files(case.watch)
    env = cli_env(root / "cache")
    with ThreadPoolExecutor(max_workers=4) as pool:
        race = pool.submit(two_resumes, w, env)
        full = pool.submit(disk_full, w, env)
        groups = [pool.submit(run_many, group, env) for group in command_groups(w.cases)]
        w.results = {name: result for group in groups for name, result in group.result().items()}
        w.race, w.full = race.result(), full.result()
    yield w
    for mount in w.mounts:
        subprocess.run(["umount", str(mount)], capture_output=True)


def command_groups(cases: dict[str, Case | None], groups: int = 2) -> list[dict[str, list[str]]]:
    """Each case's commands in order in one group (``name#i``), the cases dealt round the groups."""
    found: list[dict[str, list[str]]] = [{} for _ in range(groups)]
    for n, (name, case) in enumerate((name, case) for name, case in cases.items() if case is not None):
        for i, args in enumerate(case.commands):
            found[n % groups][f"{name}#{i}"] = args
    return found


def _copy(run: Path, case_dir: Path) -> Path:
    return Path(shutil.copytree(run, case_dir / run.name))


def _imagenet(data: Path, out: Path, *extra: str) -> list[str]:
    return ["imagenet", "--recipe", "bn-x5", "--profile", "smoke", "--dataset-dir", str(data), "--out", str(out),
            *CPU, *(arg for text in SMALL for arg in ("--set", text)), *extra]


def _status(run: Path) -> str:
    return json.loads((run / "manifest.json").read_text())["status"]


# --- the cases: name -> setup(world, its folder) -> Case ------------------------------------------------------------

def resume_edited_recipe(w, case_dir: Path) -> Case:
    """Resume trained whatever recipe.yaml held now (an lr of 5.0 showed as a jump in the lr column)."""
    run = _copy(w.paused, case_dir)
    recipe = run / "recipe.yaml"
    recipe.write_text(re.sub(r"(?m)^  lr: .*$", "  lr: 5.0", recipe.read_text()))
    return Case([["imagenet", "--resume", str(run), *CPU]], words=(f"{recipe}", "was edited"), watch=case_dir)


def resume_legacy_recipe(w, case_dir: Path) -> Case:
    """A run recorded before recipes had ``eval``: its digest was computed without it, and it still resumes."""
    run = _copy(w.paused, case_dir)
    tree = yaml.safe_load((run / "recipe.yaml").read_text())
    del tree["eval"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["recipe_digest"] = recipes.recorded_digest(recipes.ImagenetRecipe.model_validate(tree), tree)
    (run / "manifest.json").write_text(json.dumps(manifest))

    def check() -> None:
        assert _status(run) == "complete"

    return Case([["imagenet", "--resume", str(run), *CPU]], code=0, check=check)


def resume_after_kill_during_a_checkpoint(w, case_dir: Path) -> Case:
    """kill -9 while a checkpoint was written left .checkpoint.pt.*.tmp, even after a successful resume."""
    run = _copy(w.paused, case_dir)
    (run / ".checkpoint.pt.k9x2q1.tmp").write_bytes(b"\0" * (1 << 20))

    def check() -> None:
        assert _status(run) == "complete"
        assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "manifest.json", "metrics.csv",
                                                         "recipe.yaml", "summary.json"]

    return Case([["imagenet", "--resume", str(run), *CPU]], code=0, check=check)


def resume_damaged_checkpoint(w, case_dir: Path) -> Case:
    """The resume's error came after the run's ten-line deviation block."""
    run = _copy(w.paused, case_dir)
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    return Case([["imagenet", "--resume", str(run), *CPU]], words=(f"{run / 'checkpoint.pt'}", "damaged"),
                watch=case_dir)


def damaged_results(w, case_dir: Path) -> Path:
    """results/imagenet with a good run and three copies, each with one damaged file, all four what the campaign
    plans at the smoke profile (the width override taken out of their manifests)."""
    results = case_dir / "results"
    recipe = recipes.load("imagenet/bn-x5")
    for name in ("good", "bad-summary", "bad-manifest", "bad-metrics"):
        run = Path(shutil.copytree(w.done, results / "imagenet" / f"bn-x5-{name}"))
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "recipe_digest": recipe.digest, "overrides": []}))
    (results / "imagenet" / "bn-x5-bad-summary" / "summary.json").write_text('{"label": "BN-x5", ')
    (results / "imagenet" / "bn-x5-bad-manifest" / "manifest.json").write_text("")
    metrics = results / "imagenet" / "bn-x5-bad-metrics" / "metrics.csv"
    lines = metrics.read_text().splitlines()
    column = lines[0].split(",").index("top1")
    metrics.write_text("".join(",".join(c for i, c in enumerate(line.split(",")) if i != column) + "\n"
                               for line in lines))
    return results


BAD = {"summary": "imagenet/bn-x5-bad-summary/summary.json", "manifest": "imagenet/bn-x5-bad-manifest/manifest.json",
       "metrics": "imagenet/bn-x5-bad-metrics/metrics.csv"}


def report_with_damaged_runs(w, case_dir: Path) -> Case:
    results = damaged_results(w, case_dir)

    def check() -> None:
        assert "BN-x5" in (results / "report" / "imagenet.md").read_text()

    return Case([["report", "--results", str(results)]], code=0, check=check, watch=case_dir,
                warnings=tuple(str(results / BAD[k]) for k in ("manifest", "metrics", "summary")),
                made=("results/report", "results/report/*"))


def ensemble_with_damaged_runs(w, case_dir: Path) -> Case:
    results = damaged_results(w, case_dir)
    out = case_dir / "out"
    return Case([["ensemble", "--set", "profile=smoke", "--set", "crops=[1]", "--set", "members=[imagenet/bn-x5]",
                  "--results", str(results), "--out", str(out), "--dataset-dir", str(w.shards), *CPU]],
                code=0, warnings=(str(results / BAD["manifest"]),), watch=case_dir,
                made=("out", "out/ensemble", "out/ensemble/*", "out/ensemble/*/*", "out/ensemble/*/*/*"))


def reproduce_with_damaged_runs(w, case_dir: Path) -> Case:
    results = damaged_results(w, case_dir)
    for run in (results / "imagenet").iterdir():  # the plan matches a run by its recipe.yaml: that of the plan too
        (run / "recipe.yaml").write_text(recipes.to_yaml(recipes.load("imagenet/bn-x5")))
    return Case([["reproduce", "--profile", "smoke", "--dry-run", "--results", str(results)]], code=0,
                warnings=tuple(str(results / BAD[k]) for k in ("manifest", "metrics", "summary")), watch=case_dir)


def shard(how: str) -> Callable:
    def setup(w, case_dir: Path) -> Case:
        """A truncated or scrambled shard dropped examples in silence (trained on 22 of 32, none counted)."""
        data = Path(shutil.copytree(w.shards, case_dir / "shards"))
        damage_shard(data / "train-000001.tar", how)
        return Case([_imagenet(data, case_dir / "out")], words=(str(data / "train-000001.tar"), "damaged"),
                    watch=case_dir)
    return setup


def pack_without_val_over_shards(w, case_dir: Path) -> Case:
    """The old val-*.tar stayed, and the next run evaluated on a stale validation set."""
    source, dest = case_dir / "train-only", Path(shutil.copytree(w.shards, case_dir / "shards"))
    shutil.copytree(w.folders / "train", source / "train")

    def check() -> None:
        assert not list(dest.glob("val-*.tar")) and len(list(dest.glob("train-*.tar"))) == 8
        assert sorted(p.name for p in dest.iterdir() if not p.name.startswith("train-")) == ["classes.txt"]

    return Case([["pack", str(source), str(dest), "--shard-size", "5"], _imagenet(dest, case_dir / "out")],
                words=("no 'val' data",), check=check)


def pack_to_a_file(w, case_dir: Path) -> Case:
    case_dir.mkdir(parents=True)
    (case_dir / "a-file").write_text("not a folder\n")
    return Case([["pack", str(w.folders), str(case_dir / "a-file")]], words=("a-file", "is a file"), watch=case_dir)


def pack_to_a_read_only_folder(w, case_dir: Path) -> Case | None:
    locked = case_dir / "read-only"
    if not read_only_folder(locked):
        return None
    if os.geteuid() == 0:
        w.mounts.append(locked)
    return Case([["pack", str(w.folders), str(locked / "shards")]], words=(str(locked / "shards"), "cannot write"),
                watch=case_dir)


def idx_with_an_unknown_type(w, case_dir: Path) -> Path:
    raw = write_mnist(case_dir / "idx", n_train=20, n_test=10) / "mnist" / "raw"
    path = raw / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:2] + b"\x0a" + data[3:]))
    return raw


def pack_idx_unknown_type(w, case_dir: Path) -> Case:
    """'not valid idx files ()' (type 0x0f), or a KeyError traceback (0x0a)."""
    raw = idx_with_an_unknown_type(w, case_dir)
    return Case([["pack", str(raw), str(case_dir / "shards")]], words=("train-images-idx3-ubyte.gz", "0x0a"),
                watch=case_dir)


def imagenet_idx_unknown_type(w, case_dir: Path) -> Case:
    raw = idx_with_an_unknown_type(w, case_dir)
    return Case([_imagenet(raw, case_dir / "out")], words=("train-images-idx3-ubyte.gz", "0x0a"), watch=case_dir)


def mnist_idx_unknown_type(w, case_dir: Path) -> Case:
    """A KeyError traceback from torchvision's parser (0x0a)."""
    raw = idx_with_an_unknown_type(w, case_dir)
    return Case([["mnist", "--data-dir", str(raw.parent.parent), "--steps", "10", "--out", str(case_dir / "out"),
                  "--no-progress"]], words=("train-images-idx3-ubyte.gz", "0x0a"), watch=case_dir)


def mnist_with(*extra: str, words: tuple[str, ...]) -> Callable:
    """`bnrepro mnist` or `sweep` (the first of ``extra``) refused before any data is read or folder made."""
    def setup(w, case_dir: Path) -> Case:
        case_dir.mkdir(parents=True)
        return Case([[*extra, "--out", str(case_dir / "out"), "--no-progress"]], words=words, watch=case_dir)
    return setup


def recipe_file(text: bytes, *words: str) -> Callable:
    def setup(w, case_dir: Path) -> Case:
        case_dir.mkdir(parents=True)
        (case_dir / "recipe.yaml").write_bytes(text)
        args = _imagenet(w.shards, case_dir / "out")
        args[args.index("bn-x5")] = str(case_dir / "recipe.yaml")
        return Case([args], words=words, watch=case_dir)
    return setup


def imagenet_with(*extra: str, words: tuple[str, ...]) -> Callable:
    def setup(w, case_dir: Path) -> Case:
        case_dir.mkdir(parents=True)
        return Case([_imagenet(w.shards, case_dir / "out", *extra)], words=words, watch=case_dir)
    return setup


def reproduce_negative_val_limit(w, case_dir: Path) -> Case:
    """Accepted until the ensemble, after all the training."""
    case_dir.mkdir(parents=True)
    return Case([["reproduce", "--profile", "smoke", "--dataset-dir", str(w.shards), "--results",
                  str(case_dir / "results"), "--val-limit", "-5", "--no-progress"]], words=("--val-limit", "-5"),
                watch=case_dir)


def data_error_before_the_first_step(w, case_dir: Path) -> Case:
    """An 'interrupted' folder without a checkpoint stayed: it could never be resumed."""
    data = garbled(w.folders, case_dir / "shards", "train")
    return Case([_imagenet(data, case_dir / "out")], words=("no readable image",), mid_run=True, watch=case_dir,
                made=("out", "out/imagenet"))


def ensemble_member_checkpoint_damaged(w, case_dir: Path) -> Case:
    """It said 'start a new run' / 'cannot be resumed'."""
    member = _copy(w.done, case_dir)
    (member / "checkpoint.pt").write_bytes(b"torn")
    return Case([["ensemble", "--set", "profile=smoke", "--set", "crops=[1]", "--member", str(member),
                  "--dataset-dir", str(w.shards), "--out", str(case_dir / "out"), *CPU]],
                words=(str(member / "checkpoint.pt"), "damaged", "ensemble member bn-x5"), watch=case_dir)


def ensemble_evaluation_fails(w, case_dir: Path) -> Case:
    """The ensemble's folder stayed at status "running"."""
    data = garbled(w.folders, case_dir / "shards", "val")
    out = case_dir / "out"

    def check() -> None:
        (run,) = (out / "ensemble").iterdir()
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["status"] == "failed" and "none of the" in manifest["error"]
        assert not list(run.rglob(".*.tmp"))

    return Case([["ensemble", "--set", "profile=smoke", "--set", "crops=[1]", "--member", str(w.done),
                  "--dataset-dir", str(data), "--out", str(out), *CPU]], words=("none of the",), mid_run=True,
                check=check)


def no_arguments(w, case_dir: Path) -> Case:
    """An empty 'error:' line."""
    return Case([[]], words=("give a command",))


CASES: dict[str, Callable] = {
    "resume-edited-recipe": resume_edited_recipe,
    "resume-legacy-recipe": resume_legacy_recipe,
    "resume-after-kill-during-a-checkpoint": resume_after_kill_during_a_checkpoint,
    "resume-damaged-checkpoint": resume_damaged_checkpoint,
    "report-damaged-runs": report_with_damaged_runs,
    "ensemble-damaged-runs": ensemble_with_damaged_runs,
    "reproduce-damaged-runs": reproduce_with_damaged_runs,
    "scrambled-shard": shard("scramble"),
    "truncated-shard": shard("truncate"),
    "pack-without-val-over-shards": pack_without_val_over_shards,
    "pack-to-a-file": pack_to_a_file,
    "pack-to-a-read-only-folder": pack_to_a_read_only_folder,
    "pack-idx-unknown-type": pack_idx_unknown_type,
    "imagenet-idx-unknown-type": imagenet_idx_unknown_type,
    "recipe-extends-a-list": recipe_file(b"extends: [imagenet/bn-x5]\n", "extends", "one recipe"),
    "recipe-not-utf8": recipe_file(b"extends: imagenet/bn-x5\nlabel: caf\xe9\n", "not UTF-8", "0xe9"),
    "set-lr-inf": imagenet_with("--set", "train.lr=.inf", words=("train.lr", "finite")),
    "set-lr-nan": imagenet_with("--set", "train.lr=.nan", words=("train.lr", "finite")),
    "set-empty-key": imagenet_with("--set", "..=1", words=("..=1", "empty part")),
    "steps-0": imagenet_with("--steps", "0", words=("--steps", "1 or more")),
    "set-steps-0": imagenet_with("--set", "profiles.smoke.steps=0", words=("0 steps",)),
    "reproduce-negative-val-limit": reproduce_negative_val_limit,
    "data-error-before-the-first-step": data_error_before_the_first_step,
    "ensemble-member-checkpoint-damaged": ensemble_member_checkpoint_damaged,
    "ensemble-evaluation-fails": ensemble_evaluation_fails,
    "no-arguments": no_arguments,
    "mnist-idx-unknown-type": mnist_idx_unknown_type,
    "mnist-with-an-imagenet-recipe": mnist_with("mnist", "--recipe", "imagenet/bn-x30", "--steps", "10",
                                                words=("imagenet/bn-x30", "not an MNIST one")),
    "sweep-lr-max-inf": mnist_with("sweep", "--lr-max", "inf", words=("--lr-max", "finite")),
    "sweep-grid-too-large": mnist_with("sweep", "--lrs", "3000", "--inits", "3000",
                                       words=("36,000,000 models", "GiB", "fewer")),
}


# --- the two cases that need processes of their own -----------------------------------------------------------------

def bnrepro_process(*args: str, env: dict[str, str], preexec_fn=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnrepro", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn)


def two_resumes(w, env: dict[str, str]) -> SimpleNamespace:
    """Two `--resume` of one folder started 0.05 s apart (once both trained it, 1 trial in 5)."""
    run = _copy(w.paused, w.root / "cases" / "two-resumes")
    started = [bnrepro_process("imagenet", "--resume", str(run), *CPU, env=env)]
    time.sleep(0.05)
    started.append(bnrepro_process("imagenet", "--resume", str(run), *CPU, env=env))
    results = []
    for proc in started:
        stdout, stderr = proc.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return SimpleNamespace(run=run, results=results)


def disk_full(w, env: dict[str, str]) -> SimpleNamespace:
    """A new run whose first checkpoint cannot be written (a file-size limit under the checkpoint's 1.5 MB stands
    for a full disk: the same OSError from the same write, and no mount needed): once an OSError traceback and an
    "interrupted" folder that could not be resumed."""
    out = w.root / "cases" / "disk-full" / "out"
    limit = 512 << 10

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail with EFBIG

    proc = bnrepro_process(*_imagenet(w.shards, out), env=env, preexec_fn=limited)
    stdout, stderr = proc.communicate(timeout=300)
    return SimpleNamespace(out=out, result=subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


# --- the tests ------------------------------------------------------------------------------------------------------

def assert_one_error_line(result: subprocess.CompletedProcess, words: tuple[str, ...], mid_run: bool = False) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    if not mid_run:
        assert len(lines) == 1, result.stderr  # nothing announced before the refusal
    for word in words:
        assert squeeze(word) in squeeze(errors[0]), (word, errors[0])


@pytest.mark.parametrize("name", list(CASES))
def test_each_case_ends_with_its_exit_code_and_one_line(world, name):
    case = world.cases[name]
    if case is None:
        pytest.skip("no way to make a folder this process cannot write to here")
    results = [world.results[f"{name}#{i}"] for i in range(len(case.commands))]
    for earlier in results[:-1]:
        assert earlier.returncode == 0, earlier.stderr
    result = results[-1]
    assert result.returncode == case.code, result.stderr
    if case.code == 2:
        assert_one_error_line(result, case.words, case.mid_run)
    else:
        assert "Traceback" not in result.stderr and "error:" not in result.stderr, result.stderr
        said = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(said) == len(case.warnings), result.stderr
        for line, path in zip(sorted(said), case.warnings):
            assert line.startswith("warning: skipping ") and Path(path).name in line and str(Path(path).parent) in line
    if case.check is not None:
        case.check()


@pytest.mark.parametrize("name", [name for name in CASES if name not in ("no-arguments",)])
def test_each_case_leaves_nothing_behind(world, name):
    case = world.cases[name]
    if case is None or case.watch is None:
        pytest.skip("this case's outcome is checked by its own check")
    after = files(case.watch)
    new = [path for path in after.keys() - case.before.keys()
           if not any(Path(path).match(glob) or path == glob for glob in case.made)]
    assert not new, new
    assert not case.before.keys() - after.keys()
    changed = [path for path in case.before if after[path] != case.before[path] and case.before[path][0] >= 0]
    assert not changed, changed


def test_no_arguments_prints_the_commands_and_one_error_line(world):
    result = world.results["no-arguments#0"]
    assert "Usage" in result.stdout and "imagenet" in result.stdout


def test_two_resumes_started_together_train_the_run_once(world):
    """The claim (``RunLock``) is taken before the data is indexed: the second resume stops at once."""
    first, second = world.race.results
    assert sorted([first.returncode, second.returncode]) == [0, 2], (first.stderr, second.stderr)
    loser = first if first.returncode == 2 else second
    # the winner may hold the lock before it has written its pid, so the loser names "process N" or "another process"
    assert_one_error_line(loser, ("being trained by",) if "being trained" in loser.stderr else ("already complete",))
    assert "being trained" not in loser.stderr or re.search(r"beingtrainedby(process\d+|anotherprocess);",
                                                            squeeze(loser.stderr)), loser.stderr
    run = world.race.run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["resumed"]) == 1
    assert not (run / "running.pid").exists()


def test_a_full_disk_at_the_first_checkpoint_leaves_no_unresumable_folder(world):
    result = world.full.result
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result, ("File too large", "checkpoint.pt", "nothing of it was kept"), mid_run=True)
    assert not list((world.full.out / "imagenet").iterdir())


# --- the same, in this process, where a subprocess adds nothing ------------------------------------------------------

def test_a_full_disk_after_a_checkpoint_keeps_a_resumable_run(world, tmp_path, monkeypatch):
    """ENOSPC at the second checkpoint: the first one stays, the folder says interrupted, the message says how to go
    on, and the resume finishes the run."""
    save, calls = checkpoint.save, []

    def full(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(path, state)

    monkeypatch.setattr(checkpoint, "save", full)
    with pytest.raises(UserError, match="No space left on device.*keeps its last checkpoint.*--resume") as stopped:
        smoke_run(world.shards, tmp_path, "profiles.smoke.checkpoint_every=2")
    monkeypatch.setattr(checkpoint, "save", save)
    (run,) = (tmp_path / "imagenet").iterdir()
    assert str(run) in str(stopped.value) and _status(run) == "interrupted"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "manifest.json", "metrics.csv", "recipe.yaml"]
    experiment.resume(run, SINGLE_PROCESS, device="cpu", workers=0, show_progress=False)
    assert _status(run) == "complete"


def test_a_smoke_run_on_real_shards_names_its_data(world):
    """The smoke profile's deviations said "data: generated" for real shards."""
    found = json.loads((world.done / "manifest.json").read_text())["deviations"]
    data = [line for line in found if line.startswith("data: ")]
    assert data == ["data: tar shards 'shards' (36 training images, 3 classes), not ImageNet"], found


def test_a_lock_is_released_and_a_stale_one_does_not_block(tmp_path):
    """kill -9 leaves running.pid naming a dead process: the kernel dropped its lock, so the next claim takes it."""
    from bnrepro.runs import OWNER, RunLock

    (tmp_path / OWNER).write_text(f"999999 {socket.gethostname()}\n")
    lock = RunLock.claim(tmp_path)
    assert (tmp_path / OWNER).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    with pytest.raises(UserError, match=f"process {os.getpid()}"):
        RunLock.claim(tmp_path)  # flock is per open file: a second claim in this process is refused too
    lock.release()
    assert not (tmp_path / OWNER).exists()
    RunLock.claim(tmp_path).release()
    (tmp_path / OWNER).write_text("123 some-other-host\n")  # a network file system's lock may not reach here
    with pytest.raises(UserError, match="some-other-host.*delete"):
        RunLock.claim(tmp_path)
