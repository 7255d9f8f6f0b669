"""One training loop for every experiment: SGD steps, evaluation, checkpoints, divergence, Ctrl-C.

What a step trains on comes from ``task``: ``task.losses(step)`` runs the forward pass on that step's
mini-batch and returns one loss per *member* (a seed or variant trained alongside the others; an
ImageNet run has one). Members share no parameters, so back-propagating the sum gives each exactly its
own gradient. A member whose loss turns NaN/inf is recorded as diverged at that step and the others go
on; the run stops early only when every member has diverged.
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


class Task(Protocol):
    model: nn.Module

    def losses(self, step: int) -> Tensor:
        """Per-member losses on the mini-batch of ``step`` (a pure function of the step, for exact resume)."""
        ...

    def evaluate(self, step: int, train_loss: Tensor) -> dict[str, float]:
        """Record metrics after ``step`` steps; return the few to show in the progress line."""
        ...

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

    def __post_init__(self):
        self.diverged_at = self.diverged_at or [None] * self.members

    def add(self, losses: Tensor) -> None:
        self.rows.append(losses.detach())

    def close_interval(self, step: int) -> Tensor:
        """Mean loss per member over the interval ending at ``step``; notes new divergences."""
        if not self.rows:
            return torch.full((self.members,), float("nan"))
        history = torch.stack(self.rows).cpu()
        bad = ~torch.isfinite(history)
        for member in range(self.members):
            if self.diverged_at[member] is None and bad[:, member].any():
                self.diverged_at[member] = self.since + int(bad[:, member].nonzero()[0]) + 1
        self.since, self.rows = step, []
        return history.mean(0)

    def state_dict(self) -> dict[str, Any]:
        rows = torch.stack(self.rows).cpu() if self.rows else torch.empty(0, self.members)
        return {"since": self.since, "rows": rows, "diverged_at": [-1 if s is None else s for s in self.diverged_at]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.since, self.rows = state["since"], list(state["rows"])
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
) -> LossLog:
    """Train ``task`` for ``schedule.steps`` steps (continuing from the checkpoint if ``resume``)."""
    log, start = LossLog(members), 0
    if resume:
        state = checkpoint.load(checkpoint_path)
        task.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        task.load_state_dict(state["task"])
        log.load_state_dict(state["log"])
        start = state["step"]

    def save(step: int) -> None:
        checkpoint.save(checkpoint_path, {"step": step, "model": task.model.state_dict(),
                                          "optimizer": optimizer.state_dict(), "task": task.state_dict(),
                                          "log": log.state_dict()})

    shown: dict[str, float] = {}
    if start == 0:
        shown = task.evaluate(0, log.close_interval(0))
    with _StopRequests() as stop, _progress(show_progress) as progress:
        bar = progress.add_task(describe(shown), total=schedule.steps, completed=start, rate="-")
        tick = time.perf_counter()
        for step in range(start, schedule.steps):
            task.model.train()
            losses = task.losses(step)  # forward pass on this step's mini-batch: one loss per member
            optimizer.zero_grad(set_to_none=True)  # the last step's gradients are spent
            losses.sum().backward()  # members share no parameters, so each gets exactly its own gradient
            optimizer.step()  # one SGD update of every member
            log.add(losses)  # kept for the train-loss column and to date any divergence
            done = step + 1
            if done % schedule.eval_every == 0 or done == schedule.steps:
                task.model.eval()
                shown = task.evaluate(done, log.close_interval(done))  # test metrics with population statistics
                if all(s is not None for s in log.diverged_at):
                    save(done)
                    break  # every member diverged: nothing left to train
            if done % schedule.checkpoint_every == 0 or done == schedule.steps:
                save(done)
            if stop.requested:
                save(done)
                raise Interrupted(done, checkpoint_path)
            if done % 50 == 0 or done == schedule.steps:
                now = time.perf_counter()
                rate = f"{50 / max(now - tick, 1e-9):,.0f}"
                progress.update(bar, completed=done, description=describe(shown), rate=rate)
                tick = now
    return log


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} steps/s"),
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
