"""The shared training loop: divergence bookkeeping, and an interrupt at a chosen step that resumes exactly."""

from __future__ import annotations

import json
import math
import os
import signal

import pandas as pd
import pytest
import torch
from torch import nn

from bnrepro.engine import checkpoint
from bnrepro.engine.trainer import Interrupted, ProgressDisplay, Schedule, train
from bnrepro.experiments import mnist as experiment


class ToyTask:
    """Members fit w[i] to a target that moves with the step; member ``bad`` turns NaN at step ``nan_step``."""

    def __init__(self, members: int, bad: tuple[int, ...] = (), nan_step: int | None = None):
        self.model = nn.Module()
        self.model.w = nn.Parameter(torch.zeros(members, dtype=torch.float64))
        self.members, self.bad, self.nan_step = members, bad, nan_step
        self.evaluations: list[tuple[int, list[float]]] = []
        self.statistics: list[str] = []  # which BN statistics each evaluation was asked to infer with

    def target(self, step: int) -> torch.Tensor:
        return torch.arange(self.members, dtype=torch.float64) + step % 3

    def losses(self, step: int) -> torch.Tensor:
        loss = (self.model.w - self.target(step)) ** 2
        if step == self.nan_step:
            poison = torch.ones(self.members, dtype=torch.float64)
            poison[list(self.bad)] = math.nan
            loss = loss * poison
        return loss

    def train_steps(self, start, stop, learning_rate) -> None:
        return None  # one update at a time, through losses and the loop's optimizer

    def evaluate(self, step: int, train_loss: torch.Tensor, statistics: str) -> dict[str, float]:
        self.evaluations.append((step, train_loss.tolist()))
        self.statistics.append(statistics)
        return {"step": step}

    def state_dict(self):
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state):
        self.evaluations = list(state["evaluations"])


def _train(task, tmp_path, steps=20, every=5, **how):
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)
    return train(task, optimizer, Schedule(steps, every, checkpoint_every=1000), tmp_path / "ckpt.pt",
                 members=task.members, show_progress=False, **how)


def test_train_loss_is_the_mean_over_the_interval(tmp_path):
    task = ToyTask(2)
    reference = ToyTask(2)
    optimizer = torch.optim.SGD(reference.model.parameters(), lr=0.1)
    expected = []
    for step in range(5):
        loss = reference.losses(step)
        expected.append(loss.detach().clone())
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
    _train(task, tmp_path, steps=5, every=5)
    assert [step for step, _ in task.evaluations] == [0, 5]
    assert all(math.isnan(v) for v in task.evaluations[0][1])  # nothing trained yet at step 0
    torch.testing.assert_close(torch.tensor(task.evaluations[1][1], dtype=torch.float64),
                               torch.stack(expected).mean(0))
    torch.testing.assert_close(task.model.w.detach(), reference.model.w.detach())


def test_population_statistics_at_every_evaluation_unless_moving_averages_are_asked_for_between(tmp_path):
    task = ToyTask(2)
    _train(task, tmp_path, steps=20, every=5)
    assert task.statistics == ["population"] * 5
    task = ToyTask(2)
    _train(task, tmp_path, steps=20, every=5, statistics="moving")
    assert task.statistics == ["population", "moving", "moving", "moving", "population"]
    diverging = ToyTask(2, bad=(0, 1), nan_step=6)
    _train(diverging, tmp_path, steps=20, every=5, statistics="moving")
    assert diverging.statistics == ["population", "moving", "population"]  # the run's last numbers


class StridedTask(ToyTask):
    """Records the step each update starts at; the update at ``skip`` has nothing to train on."""

    def __init__(self, members: int, skip: int | None = None):
        super().__init__(members)
        self.skip, self.started = skip, []

    def losses(self, step: int):
        self.started.append(step)
        return None if step == self.skip else super().losses(step)


def test_an_update_of_several_steps_keeps_every_count_in_steps(tmp_path):
    """With stride 4 (e.g. four replicas' mini-batches a update) budgets and intervals stay in steps: updates
    start at 0, 4, 8, ...; an interval an update crosses is acted on at its end; the learning rate is asked
    for at the step each update starts at; the divergence of the update ending at step 12 is dated 12."""
    task = StridedTask(1)
    task.nan_step, task.bad = 8, (0,)
    asked = []
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)
    log = train(task, optimizer, Schedule(22, 6, checkpoint_every=1000, stride=4), tmp_path / "c.pt", members=1,
                show_progress=False, learning_rate=lambda step: asked.append(step) or 0.1)
    assert task.started == asked == [0, 4, 8]
    assert log.diverged_at == [12]
    assert [step for step, _ in task.evaluations] == [0, 8, 12]  # 8 crossed 6, 12 crossed 12 (and diverged)
    task = StridedTask(1)
    train(task, torch.optim.SGD(task.model.parameters(), lr=0.1), Schedule(22, 6, 1000, stride=4),
          tmp_path / "d.pt", members=1, show_progress=False)
    assert task.started == [0, 4, 8, 12, 16, 20] and [s for s, _ in task.evaluations] == [0, 8, 12, 20, 24]


class ChunkedTask(ToyTask):
    """Trains its own chunks of steps, as the native MNIST engine does; records each chunk and its rates."""

    def __init__(self, members: int, bad: tuple[int, ...] = (), nan_step: int | None = None):
        super().__init__(members, bad, nan_step)
        self.chunks: list[tuple[int, int, list[float]]] = []

    def losses(self, step: int):
        raise AssertionError("the loop never asks a chunked task for one update's losses")

    def train_steps(self, start, stop, learning_rate):
        self.chunks.append((start, stop, [learning_rate(step) for step in range(start, stop)]))
        return torch.stack([ToyTask.losses(self, step).detach() for step in range(start, stop)])


def test_a_task_that_trains_chunks_runs_them_between_the_loops_checks(tmp_path):
    """Chunks end where the loop has something to do (every CHECK_EVERY = 50 steps, each evaluation, the end);
    each step's losses are dated by that step, and the rates are the schedule's (else the optimizer's)."""
    task = ChunkedTask(2, bad=(0,), nan_step=60)
    log = _train(task, tmp_path, steps=120, every=40, learning_rate=lambda step: 1 / (1 + step))
    assert [(start, stop) for start, stop, _ in task.chunks] == [(0, 40), (40, 50), (50, 80), (80, 100), (100, 120)]
    assert task.chunks[1][2] == [1 / (1 + step) for step in range(40, 50)]
    assert log.diverged_at == [61, None]
    assert [step for step, _ in task.evaluations] == [0, 40, 80, 120]
    task = ChunkedTask(1)
    _train(task, tmp_path, steps=10, every=10)
    assert task.chunks == [(0, 10, [0.1] * 10)]
    with pytest.raises(ValueError, match="one step per update"):
        train(task, torch.optim.SGD(task.model.parameters(), lr=0.1), Schedule(10, 10, 1000, stride=2),
              tmp_path / "s.pt", members=1, show_progress=False)


def test_a_skipped_update_changes_nothing(tmp_path):
    """``losses`` returning None skips the update: no gradient, no weight decay, no momentum step."""
    def run(skip):
        task = StridedTask(2, skip=skip)
        optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        train(task, optimizer, Schedule(3, 10, 1000), tmp_path / f"{skip}.pt", members=2, show_progress=False)
        return task
    skipped, reference = run(skip=1), run(skip=None)
    assert skipped.started == [0, 1, 2]
    # the reference, trained on steps 0 and 2 only, with the same momentum buffer history
    task = ToyTask(2)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in (0, 2):
        optimizer.zero_grad()
        task.losses(step).sum().backward()
        optimizer.step()
    assert torch.equal(skipped.model.w, task.model.w)
    assert not torch.equal(reference.model.w, task.model.w)


def test_progress_is_plain_lines_when_output_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """Not a terminal (pytest captures stderr): the first check, then every PLAIN_EVERY seconds, and the end."""
    task = ToyTask(1)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1)

    def run(every: float) -> list[str]:
        monkeypatch.setattr(ProgressDisplay, "PLAIN_EVERY", every)
        train(task, optimizer, Schedule(200, 100, 1000), tmp_path / f"{every}.pt", members=1, show_progress=True,
              describe=lambda shown: f"at {shown.get('step')}", rate=("images", 32))
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]

    lines = run(3600.0)
    assert len(lines) == 2, lines  # the first check (step 50) and the end
    assert lines[0].startswith("step 50/200 (25%)") and "images/s  at 0  ETA " in lines[0]
    assert lines[1].startswith("step 200/200 (100%)") and lines[1].endswith("at 200  ETA 0:00:00")
    assert len(run(0.0)) == 4  # every check: steps 50, 100, 150, 200


def test_one_member_diverges_and_the_others_go_on(tmp_path):
    task = ToyTask(3, bad=(1,), nan_step=7)
    log = _train(task, tmp_path)
    assert log.diverged_at == [None, 8, None]  # the 8th step (index 7) produced the NaN
    assert [step for step, _ in task.evaluations] == [0, 5, 10, 15, 20]
    last = task.evaluations[-1][1]
    assert math.isfinite(last[0]) and math.isfinite(last[2]) and math.isnan(last[1])
    assert torch.isfinite(task.model.w[[0, 2]]).all()


def test_training_stops_once_every_member_has_diverged(tmp_path):
    task = ToyTask(2, bad=(0, 1), nan_step=6)
    log = _train(task, tmp_path)
    assert log.diverged_at == [7, 7]
    assert [step for step, _ in task.evaluations] == [0, 5, 10]  # stopped at the first evaluation after


def test_interrupt_then_resume_is_exact(tmp_path):
    def run(checkpoint, stop_at=None):
        task = ToyTask(2)
        optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9)  # optimizer state matters
        losses = task.losses

        def losses_then_signal(step):
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C in the middle of a step
            return losses(step)

        task.losses = losses_then_signal
        schedule = Schedule(20, 5, checkpoint_every=1000)
        try:
            train(task, optimizer, schedule, checkpoint, members=2, show_progress=False)
        except Interrupted as stop:
            return task, stop
        return task, None

    handler = signal.getsignal(signal.SIGINT)
    whole, stop = run(tmp_path / "a.pt")
    assert stop is None
    first, stop = run(tmp_path / "b.pt", stop_at=7)
    assert stop is not None and stop.step == 8 and stop.path == tmp_path / "b.pt"
    assert (tmp_path / "b.pt").is_file()

    task = ToyTask(2)
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9)
    train(task, optimizer, Schedule(20, 5, checkpoint_every=1000), tmp_path / "b.pt", members=2, resume=True,
          show_progress=False)
    assert [step for step, _ in task.evaluations] == [step for step, _ in whole.evaluations] == [0, 5, 10, 15, 20]
    torch.testing.assert_close(torch.tensor([loss for _, loss in task.evaluations]),
                               torch.tensor([loss for _, loss in whole.evaluations]), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(task.model.w, whole.model.w)
    assert signal.getsignal(signal.SIGINT) is handler  # the loop gave the previous handler back


@pytest.mark.parametrize("engine", ["torch", "native"])
def test_mnist_resume_after_an_interrupt_mid_interval_is_exact(fake_mnist, tmp_path, monkeypatch, engine, request):
    """The real MNIST task: Ctrl-C at step 130 (between evaluations), resume, compare with a run never stopped.
    The native engine trains in chunks up to the loop's next check, so it stops at step 150."""
    if engine == "native":
        request.getfixturevalue("native_engine")
    settings = dict(overrides=["train.steps=250", "eval.every=100"], seeds=2, data_seed=5, device_name_="cpu",
                    data_dir=fake_mnist, show_progress=False, engine=engine)
    whole = experiment.run(experiment.DEFAULT_VARIANTS, out=tmp_path / "whole", **settings)

    task_class, method = ((experiment.MnistTask, "losses") if engine == "torch" else
                          (experiment.NativeMnistTask, "train_steps"))
    original = getattr(task_class, method)

    def signal_at_step_129(self, step, *args):
        if step <= 129 < (args[0] if args else step + 1):
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, *args)

    monkeypatch.setattr(task_class, method, signal_at_step_129)
    with pytest.raises(Interrupted) as caught:
        experiment.run(experiment.DEFAULT_VARIANTS, out=tmp_path / "cut", **settings)
    monkeypatch.setattr(task_class, method, original)
    run_dir = caught.value.path.parent
    assert caught.value.step == (130 if engine == "torch" else 150)
    assert (run_dir / checkpoint.NAME).is_file()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "metrics.csv").exists()

    assert experiment.resume(run_dir, "cpu", fake_mnist, show_progress=False, engine=engine) == run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert len(manifest["resumed"]) == 1
    assert manifest["engine"].startswith(engine) and manifest["resumed_engines"][0].startswith(engine)
    assert not (run_dir / checkpoint.NAME).exists()
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(whole / "metrics.csv"),
                                  check_exact=False, rtol=0, atol=1e-6)
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((whole / "summary.json").read_text())
