"""Checkpoints: atomic, loadable with ``weights_only=True``, and complete enough to resume exactly."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from bnrepro.errors import UserError
from bnrepro.runs import atomic_write


def save(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` of ``state`` (any tensors, lists, numbers, strings) through ``atomic_write``: readers see
    the old file or the whole new one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}: that run cannot be resumed") from None
    except Exception as err:
        raise UserError(f"checkpoint {path} is unreadable ({err.__class__.__name__}); start a new run") from None
