"""One training loop for every experiment: SGD steps, evaluation, checkpoints, divergence, Ctrl-C.

What a step trains on comes from ``task``: ``task.losses(step)`` runs the forward pass on that step's
mini-batch and returns one loss per *member* (a seed or variant trained alongside the others; an
ImageNet run has one). Members share no parameters, so back-propagating the sum gives each exactly its
own gradient. A member whose loss turns NaN/inf is recorded as diverged at that step and the others go
on; the run stops early only when every member has diverged.

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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from bnrepro.engine import checkpoint
from bnrepro.engine.distributed import SINGLE_PROCESS, Replicas

CHECK_EVERY = 50  # steps between checks for divergence, progress and stop requests (Ctrl-C, DDP)


class Task(Protocol):
    model: nn.Module

    def losses(self, step: int) -> Tensor:
        """Per-member losses on the mini-batch of ``step`` (a pure function of the step, for exact resume)."""
        ...

    def evaluate(self, step: int, train_loss: Tensor) -> dict[str, float]:
        """Record metrics after ``step`` steps; return the few to show in the progress line."""
        ...

    # Optional: ``train_steps(start, stop, learning_rates) -> Tensor (stop - start, members)`` trains steps
    # [start, stop) itself (forward, backward and SGD update of each) and returns their losses, for a task
    # whose steps are too small to pay for one optimizer call each. The loop then runs chunks of steps
    # between its checks; it never calls ``losses`` or the optimizer.

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped at a step boundary after saving its checkpoint."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}")
        self.step, self.path = step, path


@dataclass
class Schedule:
    """When to evaluate and checkpoint, in steps."""

    steps: int
    eval_every: int
    checkpoint_every: int


@dataclass
class LossLog:
    """Per-step member losses since the last evaluation: their mean is the reported train loss, and the
    first non-finite one dates a divergence exactly."""

    members: int
    since: int = 0
    rows: list[Tensor] = field(default_factory=list)
    diverged_at: list[int | None] = field(default_factory=list)
    checked: int = 0  # rows already scanned for divergence

    def __post_init__(self):
        self.diverged_at = self.diverged_at or [None] * self.members

    def add(self, losses: Tensor) -> None:
        self.rows.append(losses.detach())

    def all_diverged(self) -> bool:
        """Scan the rows not yet scanned for the first non-finite loss of each member; True once all have one."""
        if self.checked < len(self.rows):
            bad = ~torch.isfinite(torch.stack(self.rows[self.checked:]).cpu())
            for member in range(self.members):
                if self.diverged_at[member] is None and bad[:, member].any():
                    self.diverged_at[member] = self.since + self.checked + int(bad[:, member].nonzero()[0]) + 1
            self.checked = len(self.rows)
        return all(step is not None for step in self.diverged_at)

    def close_interval(self, step: int) -> Tensor:
        """Mean loss per member over the interval ending at ``step``; notes new divergences."""
        if not self.rows:
            return torch.full((self.members,), float("nan"))
        self.all_diverged()
        history = torch.stack(self.rows).cpu()
        self.since, self.rows, self.checked = step, [], 0
        return history.mean(0)

    def state_dict(self) -> dict[str, Any]:
        rows = torch.stack(self.rows).cpu() if self.rows else torch.empty(0, self.members)
        return {"since": self.since, "rows": rows, "diverged_at": [-1 if s is None else s for s in self.diverged_at]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.since, self.rows, self.checked = state["since"], list(state["rows"]), 0
        self.diverged_at = [None if s < 0 else s for s in state["diverged_at"]]


def train(
    task: Task,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    checkpoint_path: Path,
    *,
    members: int,
    resume: bool = False,
    show_progress: bool = True,
    describe: Callable[[dict[str, float]], str] = lambda shown: "",
    learning_rate: Callable[[int], float] | None = None,
    replicas: Replicas = SINGLE_PROCESS,
    rate: tuple[str, float] = ("steps", 1.0),
) -> LossLog:
    """Train ``task`` for ``schedule.steps`` steps (continuing from the checkpoint if ``resume``).

    ``learning_rate(step)`` sets the rate of every step (a pure function, so resuming needs no scheduler
    state); ``rate`` names what the progress bar counts per second and how many of it one step processes.
    """
    log, start = LossLog(members), 0
    if resume:
        state = checkpoint.load(checkpoint_path)
        task.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        task.load_state_dict(state["task"])
        log.load_state_dict(state["log"])
        _set_rng_state(state["rng"][replicas.rank])
        start = state["step"]

    def save(step: int) -> None:
        task_state = task.state_dict()  # first: it may synchronise replicas' BN statistics
        rng = replicas.gather(_rng_state())  # every replica's, so each resumes with its own dropout stream
        if replicas.is_main:
            checkpoint.save(checkpoint_path, {"step": step, "model": task.model.state_dict(),
                                              "optimizer": optimizer.state_dict(), "task": task_state,
                                              "log": log.state_dict(), "rng": rng})

    shown: dict[str, float] = {}
    if start == 0:
        shown = task.evaluate(0, log.close_interval(0))
    unit, per_step = rate
    with _StopRequests() as stop, _progress(show_progress and replicas.is_main, unit) as progress:
        bar = progress.add_task(describe(shown), total=schedule.steps, completed=start, rate="-")
        tick, ticked = time.perf_counter(), start
        train_steps = getattr(task, "train_steps", None)  # a task that trains whole chunks of steps itself
        rate_at = learning_rate or (lambda _: optimizer.param_groups[0]["lr"])  # for a task's own chunks (one group)
        step = start
        while step < schedule.steps:
            task.model.train()
            if train_steps is not None:  # up to the next check: each step's forward, backward and SGD update
                done = _next_check(step, schedule)
                for losses in train_steps(step, done, [rate_at(s) for s in range(step, done)]):
                    log.add(losses)  # one step's member losses
            else:
                if learning_rate is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(step)  # the schedule is a function of the step alone
                losses = task.losses(step)  # forward pass on this step's mini-batch: one loss per member
                optimizer.zero_grad(set_to_none=True)  # the last step's gradients are spent
                losses.sum().backward()  # members share no parameters, so each gets exactly its own gradient
                optimizer.step()  # one SGD update of every member
                log.add(replicas.mean(losses.detach()))  # for the train-loss column and to date any divergence
                done = step + 1
            last = done == schedule.steps
            evaluate = done % schedule.eval_every == 0 or last
            checks = evaluate or done % CHECK_EVERY == 0  # divergence, progress and (under DDP) stop requests
            diverged = checks and log.all_diverged()  # every member's loss is NaN/inf: nothing left to train
            if evaluate or diverged:
                task.model.eval()
                shown = task.evaluate(done, log.close_interval(done))  # test metrics with population statistics
            if diverged:
                save(done)
                break
            if done % schedule.checkpoint_every == 0 or last:
                save(done)
            if (checks or not replicas.distributed) and replicas.any(stop.requested):
                save(done)
                raise Interrupted(done, checkpoint_path)
            if checks:
                now = time.perf_counter()
                speed = f"{(done - ticked) * per_step / max(now - tick, 1e-9):,.0f}"
                progress.update(bar, completed=done, description=describe(shown), rate=speed)
                tick, ticked = now, done
            step = done
    return log


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


def _progress(enabled: bool, unit: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[rate]}} {unit}/s"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


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
