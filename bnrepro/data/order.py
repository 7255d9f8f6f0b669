"""The order examples are seen in: each training epoch's order, the training stream of mini-batches, and the
evaluation batches.

The training stream is a pure function of (seed, position): the order of epoch e comes from (seed, e), and the
example at stream position p is augmented with its own seed (``example_seed``). Step k's mini-batch is therefore the
same whether or not the run was interrupted and resumed, and DDP replicas take disjoint slices of each global batch.
The order is where Sec. 4.2.1's shuffling lives:

- ``shards``: the shard order is shuffled, examples inside a shard come in stored order, so the same examples keep
  meeting in the same mini-batches, epoch after epoch;
- ``within_shard``: examples are also shuffled inside and across a buffer of consecutive shards (the paper's
  change 6, "within-shard shuffling").

Shards are tar shards, or the virtual shards of class folders and idx files (see ``bnrepro.data.sources``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch.utils.data import Sampler

if TYPE_CHECKING:  # the type alone: importing split imports torchvision, which MNIST runs never need
    from bnrepro.data.split import Split

Order = Literal["shards", "within_shard"]
POSITION_BITS = 40  # stream positions stay below 2**40 (1e12 examples, 800 ImageNet epochs)
SEEDS = 2**20  # run seeds stay below this, so example seeds (seed << POSITION_BITS) + position stay below 2**60


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random numbers of one epoch's order, a pure function of (seed, epoch); the MNIST batches use it too."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def example_seed(seed: int, position: int) -> int:
    """The augmentation seed of the example at stream ``position``: its own, whoever reads it, whenever."""
    return (seed << POSITION_BITS) + position


def epoch_order(split: Split, order: Order, seed: int, epoch: int, buffer_shards: int) -> np.ndarray:
    """The example indices of one training epoch, in the order they are seen (see the module docstring)."""
    generator = epoch_generator(seed, epoch)
    starts = split.shard_starts
    shards = torch.randperm(len(starts) - 1, generator=generator).tolist()
    ranges = [np.arange(starts[s], starts[s + 1]) for s in shards]
    if order == "shards":
        return np.concatenate(ranges)
    groups = [np.concatenate(ranges[i:i + buffer_shards]) for i in range(0, len(ranges), buffer_shards)]
    return np.concatenate([group[torch.randperm(len(group), generator=generator).numpy()] for group in groups])


class TrainingStream(Sampler):
    """This replica's share of every global mini-batch from ``start_step`` on: step k covers stream positions
    ``[k*B*W, (k+1)*B*W)``, replica r takes the r-th slice of B, and position p is example
    ``epoch_order(p // N)[p % N]``."""

    def __init__(self, split: Split, order: Order, seed: int, batch_size: int, rank: int, world: int,
                 start_step: int, buffer_shards: int):
        self.split, self.order, self.seed, self.buffer_shards = split, order, seed, buffer_shards
        self.batch_size, self.rank, self.world, self.start_step = batch_size, rank, world, start_step
        self._orders: dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        epoch, within = divmod(position, len(self.split))
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.split, self.order, self.seed, epoch, self.buffer_shards)}
        return int(self._orders[epoch][within])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = (step * self.world + self.rank) * self.batch_size
            yield [(p, self.index(p)) for p in range(first, first + self.batch_size)]
            step += 1


class EvaluationBatches(Sampler):
    """Every validation example exactly once across replicas (replica r takes r, r+W, ...), no padding."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int):
        self.mine = list(range(rank, size, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for first in range(0, len(self.mine), self.batch_size):
            yield [(i, i) for i in self.mine[first:first + self.batch_size]]
