"""Timing the trainer's update: wall-clock rates that count the device's work, not only its queueing."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor


def clock(device: torch.device) -> float:
    """A timestamp after the device has finished its queued work (a GPU runs asynchronously of the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_updates(losses: Callable[[int], Tensor], optimizer: torch.optim.Optimizer,
                 learning_rate: Callable[[int], float], steps: int, warmup: int, stride: int, examples: int,
                 device: torch.device) -> float:
    """Examples per second of the trainer's update (learning rate, ``losses(step)``, zero_grad, backward, SGD step),
    timed over ``steps`` updates after ``warmup`` (worker start, cuDNN autotuning, compilation); an update covers
    ``stride`` paper steps and ``examples`` examples. No evaluation, no checkpoint."""
    for update in range(warmup + steps):
        if update == warmup:
            start = clock(device)
        step = update * stride
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        loss = losses(step)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
    return steps * examples / (clock(device) - start)
