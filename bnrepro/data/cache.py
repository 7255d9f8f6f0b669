"""The user cache of made tensors: parsed MNIST arrays, resident pixels. Light (torch only, no torchvision), so a
loader that finds its entry there never imports what made it."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bnrepro.runs import atomic_torch_save

DAMAGED = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError)  # what torch.load raises on bad bytes


def cached(entry: Path, digest: str, make: Callable[[], dict[str, Any] | None],
           accept: Callable[[dict[str, Any]], bool] = lambda saved: True) -> dict[str, Any] | None:
    """``make()``'s tensors (a dict), kept in the user cache file ``entry`` and returned from there while
    ``digest`` (of whatever they are made from) is unchanged and ``accept`` takes them. A missing, stale or
    damaged entry is made again and replaced atomically; a ``None`` from ``make`` is not kept; a read-only
    cache only costs the saving."""
    with contextlib.suppress(FileNotFoundError, *DAMAGED):  # none yet, or damaged: made again below
        saved = torch.load(entry, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and saved.pop("digest", None) == digest and accept(saved):
            return saved
    made = make()
    if made is not None:
        with contextlib.suppress(OSError):  # a read-only cache: the next run makes it again, nothing worse
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(entry, {**made, "digest": digest})
    return made

