"""A fresh machine without internet trains on the package's embedded MNIST; a resume continues on the run's own data
only (found where the run recorded it, or refused), and a run killed before its first checkpoint trains again."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import FILES, idx_labels, make_split, write_mnist

from bnrepro.data import mnist
from bnrepro.engine import checkpoint
from bnrepro.engine.trainer import Interrupted
from bnrepro.errors import UserError
from bnrepro.experiments import mnist as experiment

QUICK = ["train.steps=100", "eval.every=50", "eval.population_batches=20"]


def _no_network(monkeypatch) -> None:
    """Any download or connection fails the test: it must not even be tried."""
    monkeypatch.setattr(mnist, "_download", lambda root: pytest.fail(f"tried to download MNIST into {root}"))
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: pytest.fail(f"tried to connect to {address}"))


def test_a_fresh_machine_trains_on_the_embedded_copy_without_network(isolated_cache, tmp_path, monkeypatch):
    """No --data-dir, no BNREPRO_DATA, an empty user cache and an empty home: the embedded copy, named in the
    manifest; the accuracies show it is the real MNIST."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert not list(isolated_cache.glob("*/raw"))
    _no_network(monkeypatch)
    run = experiment.run(experiment.DEFAULT_VARIANTS, QUICK, 1, 0, "cpu", tmp_path / "out", None, show_progress=False)
    data = json.loads((run / "manifest.json").read_text())["data"]
    assert data["source"] == "embedded"
    assert data["copy"] == mnist.EMBEDDED_COPY and "CC BY-SA 3.0" in data["copy"]
    assert data["matches_official_md5"] is True
    assert data["arrays_sha256"] == mnist.embedded().arrays_sha256 and len(data["arrays_sha256"]) == 64
    final = pd.read_csv(run / "metrics.csv").query("step == 100 and variant == 'bn'")
    assert float(final.test_accuracy.iloc[0]) > 0.8  # on 10,000 real test digits after 100 steps (no BN: ~0.12)


def _other_data(root):
    """Valid idx files of the same shapes whose test labels differ (as Fashion-MNIST laid out as MNIST would)."""
    write_mnist(root)
    labels = (make_split(200, seed=2)[1] + 1) % 10
    with gzip.open(root / "mnist" / "raw" / FILES[3], "wb") as f:
        f.write(idx_labels(labels))
    return root


def _interrupted_run(data, out, monkeypatch, at_step: int = 60):
    """A run on ``data`` stopped by a Ctrl-C at ``at_step`` (torch engine, so it stops at the next step)."""
    original = experiment.MnistTask.losses

    def signal_then_train(self, step):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step)

    monkeypatch.setattr(experiment.MnistTask, "losses", signal_then_train)
    with pytest.raises(Interrupted) as caught:
        experiment.run(experiment.DEFAULT_VARIANTS, QUICK, 1, 0, "cpu", out, data, show_progress=False, engine="torch")
    monkeypatch.setattr(experiment.MnistTask, "losses", original)
    return caught.value.path.parent


def test_resume_refuses_other_data_and_finds_the_runs_own_without_data_dir(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    data, other = write_mnist(tmp_path / "run data"), _other_data(tmp_path / "other")
    run = _interrupted_run(data, tmp_path / "out", monkeypatch)

    def refused(data_dir) -> str:
        with pytest.raises(UserError) as caught:
            experiment.resume(run, "cpu", data_dir, show_progress=False, engine="torch")
        message = str(caught.value)
        assert "other data" in message and "\n" not in message
        assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
        assert (run / checkpoint.NAME).is_file()  # still resumable
        return message

    assert str(other / "mnist" / "raw") in refused(other)
    monkeypatch.setenv("BNREPRO_DATA", str(other))
    (tmp_path / "run data").rename(tmp_path / "moved")
    refused(None)  # the run's folder is gone: what BNREPRO_DATA holds now is not the run's data
    (tmp_path / "moved").rename(tmp_path / "run data")
    assert experiment.resume(run, "cpu", None, show_progress=False, engine="torch") == run  # its own folder first
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["resumed_data"] == [manifest["data"]["source"]] == [str(data / "mnist" / "raw")]


def test_a_run_killed_before_its_first_checkpoint_trains_again_from_step_0(fake_mnist, tmp_path, monkeypatch):
    whole = experiment.run(experiment.DEFAULT_VARIANTS, QUICK, 1, 0, "cpu", tmp_path / "whole", fake_mnist,
                           show_progress=False, engine="torch")
    run = _interrupted_run(fake_mnist, tmp_path / "cut", monkeypatch, at_step=20)
    (run / checkpoint.NAME).unlink()  # as if killed before step 50, its first checkpoint
    assert experiment.resume(run, "cpu", None, show_progress=False, engine="torch") == run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["restarted"]) == 1
    pd.testing.assert_frame_equal(pd.read_csv(run / "metrics.csv"), pd.read_csv(whole / "metrics.csv"))


def test_resume_refuses_a_run_of_the_other_command(fake_mnist, tmp_path, monkeypatch):
    run = _interrupted_run(fake_mnist, tmp_path / "out", monkeypatch)
    with pytest.raises(UserError, match="is a `bnrepro mnist` run; continue it with: bnrepro mnist --resume"):
        experiment.resume(run, "cpu", None, show_progress=False, command="sweep")


def test_the_refusal_says_where_the_runs_data_is_and_older_manifests_keep_their_official_flag(tmp_path):
    other = SimpleNamespace(source="/d/mnist/raw", official=False, arrays_sha256="1" * 64)
    with pytest.raises(UserError, match="resume without --data-dir: the package's embedded MNIST is the run's data"):
        experiment.check_same_data(tmp_path, {"source": "embedded", "arrays_sha256": "0" * 64}, other)
    # a run from before arrays_sha256 was recorded: the official flag is all there is to hold it to
    with pytest.raises(UserError, match="trained on the official MNIST files, but /d/mnist/raw holds other files"):
        experiment.check_same_data(tmp_path, {"source": "/x/mnist/raw", "matches_official_md5": True}, other)
    experiment.check_same_data(tmp_path, {"source": "/x/mnist/raw", "matches_official_md5": False}, other)
