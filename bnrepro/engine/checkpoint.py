"""Checkpoints: atomic, loadable with ``weights_only=True``, and complete enough to resume exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bnrepro.errors import UserError
from bnrepro.runs import atomic_torch_save

NAME = "checkpoint.pt"  # every run folder's checkpoint, ImageNet and MNIST alike


def save(path: Path, state: dict[str, Any]) -> None:
    """A checkpoint, written atomically (``runs.atomic_torch_save``)."""
    atomic_torch_save(path, state)


def keep_for_evaluation(path: Path) -> None:
    """Rewrite a finished run's checkpoint (atomically) with what evaluation reads, its step and the model's state
    (weights, BN's population statistics). A finished run cannot be resumed, so the optimizer's state, the data
    stream's position and the random generators' states serve nothing, and SGD's momentum alone is as large as the
    weights: half the bytes every kept checkpoint (an ensemble member's) would carry."""
    if not path.is_file():  # a run that saved none
        return
    state = load(path, "the run's checkpoint cannot be rewritten")
    if set(state) != {"step", "model"}:
        save(path, {"step": state["step"], "model": state["model"]})


RESUME = "that run cannot be resumed; start a new run"


def load(path: Path, consequence: str = RESUME) -> dict[str, Any]:
    """The checkpoint at ``path``, on the CPU; a missing or damaged one is a ``UserError`` that names the file and
    says what follows for the reader (``consequence``): a run that cannot be resumed, an ensemble member that
    cannot be evaluated."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}: {consequence}") from None
    except Exception as err:
        raise UserError(f"checkpoint {path} is damaged ({err.__class__.__name__}): {consequence}") from None
