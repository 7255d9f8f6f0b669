"""torch's CPU thread count for the length of a block: the one way the package changes it for a while."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch on ``threads`` threads while the block runs, then as before, however the block ends.

    Why a block changes it: the native MNIST engine trains with torch on 1 thread (torch's OpenMP workers spin for
    a while after each parallel operation, on the very cores the kernel's threads need: measured 0.44 vs 0.34 ms a
    step, 1 seed, 2 cores), and a campaign's estimate measures a step on the threads each of its workers will get."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
