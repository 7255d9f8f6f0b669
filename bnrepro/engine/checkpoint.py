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
