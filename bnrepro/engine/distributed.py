"""Replicas: one process per GPU under ``torchrun`` (DDP), or a single process, behind one small interface.

The trainer calls these at the same steps on every replica, so decisions that end or pause a run (a
diverged loss, a Ctrl-C that reached only some processes) are taken by all replicas together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Replicas:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    flag_device: str = "cpu"  # where collective tensors live: the GPU under NCCL, the CPU under gloo
    cpu_group: Any = None  # a gloo group for yes/no agreements, so they never wait on the GPU (None: the default)

    @classmethod
    def from_environment(cls, backend: str) -> Replicas:
        """Join the process group ``torchrun`` describes in the environment; a single process otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if backend == "nccl":  # this process's GPU first, then NCCL bound to it (no guess at GPU 0, no hang)
                torch.cuda.set_device(local_rank)
                dist.init_process_group(backend, device_id=torch.device("cuda", local_rank))
            else:
                dist.init_process_group(backend)
        nccl = dist.get_backend() == "nccl"
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, f"cuda:{local_rank}" if nccl else "cpu",
                   dist.new_group(backend="gloo") if nccl else None)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The average over replicas (e.g. of the loss, so every replica logs and judges the same number)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def sum_(self, value: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(value)
        return value

    def any(self, flag: bool) -> bool:
        """True on every replica if it is true on any (e.g. a Ctrl-C that reached only some processes, or a
        mini-batch slice with no readable image). On the CPU, so asking never stalls the GPU's queue."""
        if not self.distributed:
            return flag
        found = torch.tensor([float(flag)])
        dist.all_reduce(found, group=self.cpu_group)
        return bool(found.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every replica's ``obj`` (e.g. its RNG state), in rank order."""
        if not self.distributed:
            return [obj]
        found: list[Any] = [None] * self.world
        dist.all_gather_object(found, obj)
        return found

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


SINGLE_PROCESS = Replicas()
