"""Run by test_imagenet.py under torchrun with 2 gloo processes: the Fig. 5 network's gradient with BN
synchronised over 2 replicas of 4 examples (DistributedDataParallel) against one process on all 8, in float64.
Prints the relative difference of the whole gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bnrepro.models.batchnorm import BatchNorm
from bnrepro.models.inception import Inception, InceptionConfig, switches


def network(sync: bool) -> Inception:
    torch.manual_seed(0)
    model = Inception(InceptionConfig(switches(batch_norm=True, stem="separable"), num_classes=4, width=0.25))
    model = model.double().to(memory_format=torch.channels_last)
    for bn in model.modules():
        if isinstance(bn, BatchNorm):
            bn.sync = sync
    return model


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (8,))
    replica = network(sync=True)
    mine = slice(4 * rank, 4 * rank + 4)
    ddp = DistributedDataParallel(replica, broadcast_buffers=False)  # kept: its hooks average the gradients
    F.cross_entropy(ddp(x[mine]), y[mine]).backward()
    single = network(sync=False)
    F.cross_entropy(single(x), y).backward()
    got, want = (torch.cat([p.grad.reshape(-1) for p in m.parameters()]) for m in (replica, single))
    if rank == 0:
        print(f"relative difference {((got - want).norm() / want.norm()).item():.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
