"""One training loop for every experiment: SGD steps, evaluation, checkpoints, divergence, Ctrl-C.

A *step* is one mini-batch of the recipe's batch size, the paper's unit: budgets, intervals, the learning
rate and every reported step count are in steps. One optimizer update covers ``Schedule.stride`` steps (under
DDP, one per replica: each replica's share of the update is one recipe-sized mini-batch).

What an update trains on comes from ``task``: ``task.losses(step)`` runs the forward pass on the mini-batches
from ``step`` on and returns one loss per *member* (a seed or variant trained alongside the others; an
ImageNet run has one), or ``None`` when every replica agrees there is nothing to train on (a true skip).
Members share no parameters, so back-propagating the sum gives each exactly its own gradient. A member
whose loss turns NaN/inf is recorded as diverged at that step and the others go on; the run stops early
only when every member has diverged.

Under DDP (``replicas``) every replica runs this same loop; losses are averaged over replicas before they
are logged, and stop requests are agreed on, so all replicas take every decision at the same step. Only
the main replica writes checkpoints and shows progress.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from bnrepro.engine import checkpoint
from bnrepro.engine.distributed import SINGLE_PROCESS, Replicas
from bnrepro.recipes import Statistics

CHECK_EVERY = 50  # steps between checks for divergence, progress and stop requests (Ctrl-C, DDP)


class Task(Protocol):
    """What ``train`` asks of an experiment (MNIST's stack of members, ImageNet's Inception); every method is
    declared by every task, so the loop never has to probe a task for what it can do."""

    model: nn.Module

    def losses(self, step: int) -> Tensor | None:
        """Per-member losses on the mini-batch(es) of the update at ``step`` (a pure function of the step, for
        exact resume); ``None``: skip this update (no forward, no optimizer step), agreed by every replica."""
        ...

    def evaluate(self, step: int, train_loss: Tensor, statistics: Statistics) -> dict[str, float]:
        """Record metrics after ``step`` steps, inferring with BN's ``statistics`` ("population": estimate Alg. 2's
        first; "moving": the moving averages); return the few to show in the progress line."""
        ...

    def train_steps(self, start: int, stop: int, learning_rate: Callable[[int], float]) -> Tensor | None:
        """Train steps [start, stop) itself (each step's forward, backward and SGD update at
        ``learning_rate(step)``) and return their losses (stop - start, members): for a task whose steps are too
        small to pay for one optimizer call each, which the loop then runs in chunks between its checks, never
        calling ``losses`` or the optimizer. ``None``, having done nothing: the task trains one update at a time
        through ``losses`` and the loop's optimizer (every task but the native MNIST engine)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped at a step boundary after saving its checkpoint."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}")
        self.step, self.path = step, path

    def __reduce__(self):  # rebuilt from (step, path) when it crosses from a campaign's worker process
        return Interrupted, (self.step, self.path)


@dataclass
class Schedule:
    """When to evaluate and checkpoint, in steps; an update covers ``stride`` steps (replicas under DDP).
    An interval that an update crosses is acted on at the end of that update."""

    steps: int
    eval_every: int
    checkpoint_every: int
    stride: int = 1

    def updates(self, step: int) -> int:
        return step // self.stride


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (before, after]: the update from ``before`` to ``after`` passed it."""
    return after // every > before // every


@dataclass
class LossLog:
    """Per-update member losses since the last evaluation, with the step each update ended at: their mean is
    the reported train loss, and the first non-finite one dates a divergence exactly."""

    members: int
    rows: list[Tensor] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    diverged_at: list[int | None] = field(default_factory=list)
    checked: int = 0  # rows already scanned for divergence

    def __post_init__(self):
        self.diverged_at = self.diverged_at or [None] * self.members

    def add(self, losses: Tensor, step: int) -> None:
        """The losses of the update that ended at ``step``."""
        self.rows.append(losses.detach())
        self.steps.append(step)

    def all_diverged(self) -> bool:
        """Scan the rows not yet scanned for the first non-finite loss of each member; True once all have one."""
        if self.checked < len(self.rows):
            bad = ~torch.isfinite(_stacked(self.rows[self.checked:]))
            for member in range(self.members):
                if self.diverged_at[member] is None and bad[:, member].any():
                    self.diverged_at[member] = self.steps[self.checked + int(bad[:, member].nonzero()[0])]
            self.checked = len(self.rows)
        return all(step is not None for step in self.diverged_at)

    def close_interval(self) -> Tensor:
        """Mean loss per member over the updates since the last call; notes new divergences."""
        if not self.rows:
            return torch.full((self.members,), float("nan"))
        self.all_diverged()
        history = _stacked(self.rows)
        self.rows, self.steps, self.checked = [], [], 0
        return history.mean(0)

    def state_dict(self) -> dict[str, Any]:
        rows = _stacked(self.rows) if self.rows else torch.empty(0, self.members)
        return {"rows": rows, "steps": list(self.steps),
                "diverged_at": [-1 if s is None else s for s in self.diverged_at]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.steps, self.checked = list(state["rows"]), list(state["steps"]), 0
        self.diverged_at = [None if s < 0 else s for s in state["diverged_at"]]


def _stacked(rows: list[Tensor]) -> Tensor:
    """Rows as one CPU tensor. A resumed log holds the checkpoint's rows on the CPU beside new ones on the
    training device (a GPU), so each row comes to the CPU first; this runs only at checks, which wait anyway."""
    return torch.stack([row.cpu() for row in rows])


def train(
    task: Task,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    checkpoint_path: Path,
    *,
    members: int,
    resume: bool | dict[str, Any] = False,
    show_progress: bool = True,
    describe: Callable[[dict[str, float]], str] = lambda shown: "",
    learning_rate: Callable[[int], float] | None = None,
    replicas: Replicas = SINGLE_PROCESS,
    rate: tuple[str, float] = ("steps", 1.0),
    statistics: Statistics = "population",
) -> LossLog:
    """Train ``task`` for ``schedule.steps`` steps (continuing from the checkpoint if ``resume``: True reads it
    from ``checkpoint_path``, a dict is that checkpoint already read, so a caller can check it before it announces
    the run).

    ``learning_rate(step)`` sets the rate of the update that starts at ``step`` (a pure function, so resuming
    needs no scheduler state); ``rate`` names what the progress display counts per second and how many of it
    one step processes. BN infers with Alg. 2's population statistics at step 0 and at the end, and with
    ``statistics`` at the evaluations in between: "population" by default, since moving averages lag the
    weights by their window (~1 / momentum updates) and early in a run measure that lag, not the network.
    """
    run = _Training(task, optimizer, schedule, checkpoint_path, LossLog(members), replicas, learning_rate, statistics)
    start = run.restore(resume if isinstance(resume, dict) else checkpoint.load(checkpoint_path)) if resume else 0
    if start == 0:
        run.evaluate(0, "population")  # Alg. 2 before any update, too
    unit, per_step = rate
    display = ProgressDisplay(show_progress and replicas.is_main, unit, schedule.steps, start)
    with _StopRequests() as stop, display:
        display.show(start, describe(run.shown))  # where this process starts (a resume: figures from its first check)
        step = start
        while step < schedule.steps:
            task.model.train()  # training mode: dropout on, BN normalizes with each mini-batch's own statistics
            done = run.task_chunk(step) or run.update(step)  # the task's own steps to the next check, else one update
            due = _Due.after_update(step, done, schedule)  # what the update crossed: evaluation, check, checkpoint, end
            if run.diverged(due):  # every member's loss is NaN/inf: evaluated with Alg. 2 and saved; nothing to train
                break
            run.evaluate_if_due(due)  # the task's metrics at each eval_every and at the end
            run.save_if_due(due)  # a checkpoint at each checkpoint_every and at the end
            run.stop_if_requested(due, stop.requested)  # Ctrl-C/SIGTERM: save, raise Interrupted (same step everywhere)
            if due.check:
                display.show(done, describe(run.shown), per_step)  # speed and the latest evaluation's figures
            step = done
    return run.log


@dataclass(frozen=True)
class _Due:
    """What the update that ended at step ``done`` calls for; an interval that an update crosses is acted on at
    the end of that update."""

    done: int
    last: bool  # the budget is spent
    evaluate: bool  # a multiple of eval_every (or the last step)
    check: bool  # a check for divergence, progress and stop requests: every CHECK_EVERY updates and at evaluations
    checkpoint: bool  # a multiple of checkpoint_every (or the last step)

    @classmethod
    def after_update(cls, step: int, done: int, schedule: Schedule) -> _Due:
        """The update from ``step`` to ``done`` steps."""
        last = done >= schedule.steps
        evaluate = crossed(step, done, schedule.eval_every) or last
        check = evaluate or crossed(schedule.updates(step), schedule.updates(done), CHECK_EVERY)
        return cls(done, last, evaluate, check, crossed(step, done, schedule.checkpoint_every) or last)


@dataclass
class _Training:
    """The named steps of ``train``'s loop, over what every one of them needs: ``train`` reads as the loop alone."""

    task: Task
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    checkpoint_path: Path
    log: LossLog
    replicas: Replicas
    learning_rate: Callable[[int], float] | None
    statistics: Statistics  # what BN infers with at the evaluations between the first and the last
    shown: dict[str, float] = field(default_factory=dict)  # the latest evaluation's figures, for the progress line

    def restore(self, state: dict[str, Any]) -> int:
        """Continue from checkpoint ``state`` (weights, momentum, the task's records, the losses since the last
        evaluation and this replica's RNG streams, so the run goes on exactly as if never stopped); its step."""
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.task.load_state_dict(state["task"])
        self.log.load_state_dict(state["log"])
        _set_rng_state(state["rng"][self.replicas.rank])
        return state["step"]

    def save(self, step: int) -> None:
        """A checkpoint after ``step`` steps, written by the main replica (every replica takes part)."""
        task_state = self.task.state_dict()  # first: it may synchronise replicas' BN statistics
        rng = self.replicas.gather(_rng_state())  # every replica's, so each resumes with its own dropout stream
        if self.replicas.is_main:
            checkpoint.save(self.checkpoint_path, {"step": step, "model": self.task.model.state_dict(),
                                                   "optimizer": self.optimizer.state_dict(), "task": task_state,
                                                   "log": self.log.state_dict(), "rng": rng})

    def evaluate(self, step: int, statistics: Statistics) -> None:
        """The task's metrics after ``step`` steps, with the mean train loss since the last evaluation."""
        self.task.model.eval()
        self.shown = self.task.evaluate(step, self.log.close_interval(), statistics)

    def task_chunk(self, step: int) -> int | None:
        """Let the task train every step from ``step`` to the loop's next check itself, in one call (the native
        MNIST engine, whose steps are too small to pay for an optimizer call each); the step it reached, or None
        for a task that trains one update at a time (then nothing happened)."""
        done = _next_check(step, self.schedule)
        losses = self.task.train_steps(step, done, self.learning_rate or self._current_rate)
        if losses is None:
            return None
        if self.schedule.stride != 1:
            raise ValueError("a task that trains chunks of steps itself runs one step per update")
        for offset, step_losses in enumerate(losses):
            self.log.add(step_losses, step + offset + 1)  # one step's member losses
        return done

    def _current_rate(self, step: int) -> float:
        """Without a ``learning_rate`` schedule, the optimizer's own (one parameter group) at every step."""
        return self.optimizer.param_groups[0]["lr"]

    def update(self, step: int) -> int:
        """One SGD update of ``stride`` steps from ``step`` (skipped when the task has nothing to train on); the
        step it reached."""
        if self.learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(step)  # the schedule is a function of the step alone
        losses = self.task.losses(step)  # forward pass on this update's mini-batches: one loss per member
        done = step + self.schedule.stride
        if losses is not None:  # None: nothing readable to train on, on some replica; all skip it
            self.optimizer.zero_grad(set_to_none=True)  # the last update's gradients are spent
            losses.sum().backward()  # members share no parameters, so each gets exactly its own gradient
            self.optimizer.step()  # one SGD update of every member
            self.log.add(self.replicas.mean(losses.detach()), done)  # the train-loss column; dates any divergence
        return done

    def diverged(self, due: _Due) -> bool:
        """At a check: whether every member's loss has turned NaN/inf; if so the run's final evaluation (Alg. 2's
        statistics) and checkpoint are taken here, since there is nothing left to train."""
        if not (due.check and self.log.all_diverged()):
            return False
        self.evaluate(due.done, "population")
        self.save(due.done)
        return True

    def evaluate_if_due(self, due: _Due) -> None:
        """The run's final numbers infer with Alg. 2's population statistics, those between with ``statistics``."""
        if due.evaluate:
            self.evaluate(due.done, "population" if due.last else self.statistics)

    def save_if_due(self, due: _Due) -> None:
        if due.checkpoint:
            self.save(due.done)

    def stop_if_requested(self, due: _Due, requested: bool) -> None:
        """Ctrl-C or SIGTERM: save and raise ``Interrupted``. Under DDP the replicas agree only at checks (a
        collective every update would cost), so all stop at the same step; a single process stops at once."""
        if (due.check or not self.replicas.distributed) and self.replicas.any(requested):
            self.save(due.done)
            raise Interrupted(due.done, self.checkpoint_path)


def _next_check(step: int, schedule: Schedule) -> int:
    """The first step after ``step`` at which the loop evaluates, checkpoints or checks for divergence and
    stop requests: every ``CHECK_EVERY`` steps, every ``eval_every``, every ``checkpoint_every``, and the last."""
    return min(schedule.steps, *(((step // every) + 1) * every
                                 for every in (CHECK_EVERY, schedule.eval_every, schedule.checkpoint_every)))


def _rng_state() -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ProgressDisplay:
    """Progress of a run: a rich bar on a terminal; elsewhere (nohup, a cluster's log file), where a bar shows
    nothing until the end, a plain line at the first check, then every ``PLAIN_EVERY`` seconds and at the end,
    as timm prints."""

    PLAIN_EVERY = 30.0

    def __init__(self, enabled: bool, unit: str, total: int, start: int):
        self.enabled, self.unit, self.total = enabled, unit, total
        self.console = Console(stderr=True)
        self.plain = enabled and not self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(f"{{task.fields[rate]}} {unit}/s"), TimeRemainingColumn(),
            console=self.console, disable=not enabled or self.plain, transient=False)
        self.bar = self.progress.add_task("", total=total, completed=start, rate="-")
        self.tick = self.began = self.printed = time.perf_counter()
        self.ticked = self.first = self.printed_step = start

    def __enter__(self) -> ProgressDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def show(self, done: int, description: str, per_step: float = 1.0) -> None:
        """After ``done`` steps: the speed since the last call, and the latest metrics in ``description``."""
        now = time.perf_counter()
        speed = (done - self.ticked) * per_step / max(now - self.tick, 1e-9)
        self.progress.update(self.bar, completed=done, description=description,
                             rate=f"{speed:,.0f}" if done > self.ticked else "-")
        first = self.ticked == self.first
        if self.plain and done > self.first and (first or now - self.printed >= self.PLAIN_EVERY or done >= self.total):
            # the speed since the last line (evaluations included), and the ETA at the speed since this process began
            speed = (done - self.printed_step) * per_step / max(now - self.printed, 1e-9)
            overall = (done - self.first) / max(now - self.began, 1e-9)
            eta = (self.total - done) / overall if overall > 0 else float("nan")
            self.console.print(f"step {done:,}/{self.total:,} ({100 * done / self.total:.0f}%)  "
                               f"{speed:,.0f} {self.unit}/s  {description}  ETA {_clock(eta)}",
                               highlight=False, markup=False, soft_wrap=True)
            self.printed, self.printed_step = now, done
        self.tick, self.ticked = now, done


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "-"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


class _StopRequests:
    """Turn the first Ctrl-C/SIGTERM into a request to stop at the next step boundary (a second Ctrl-C
    interrupts at once), so a checkpoint is never taken half-way through an update."""

    def __enter__(self):
        self.requested = False
        self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for sig in self._previous:
                signal.signal(sig, self._request)
        except ValueError:  # not the main thread: signals stay as they were
            self._previous = {}
        return self

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
