"""ImageNet training speed: `bnrepro imagenet` against a plain PyTorch loop doing the same work, in one invocation.

Both sides train the project's Fig. 5 network (bnrepro.models.inception, so the arithmetic is identical) with
the recipe's augmentation, batch and resolution; warm-up steps (worker start, cuDNN autotuning, compilation)
are left out of the timing. bnrepro's side is the trainer's per-step work on the task `bnrepro imagenet` builds
(lr from the schedule, the task's loss, zero_grad, backward, SGD step; no evaluation, no run folder). The
reference is what one would write first: ImageFolder (or, for `bnrepro pack` shards, a small Dataset that
decodes each example on the CPU workers), transforms v2, DataLoader(shuffle=True), SGD, cross-entropy; bf16
autocast and channels_last on CUDA as bnrepro does. The question is what bnrepro's data path (decoding on the
GPU in the main process, per-example seeded augmentation) costs or gains against that.

    python benchmarks/bench_imagenet.py --dataset-dir ../shared/data/fashion-shards             # bn-x5, proxy
    python benchmarks/bench_imagenet.py --dataset-dir /tmp/benchdata --profile smoke --steps 20 --device cpu

Also prints the compute each side achieves: multiply-adds per image (count_flops) x 2 FLOPs x 3 (forward and
backward) x images/s.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from bnrepro import recipes
from bnrepro.data import images
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.engine.trainer import LossLog
from bnrepro.experiments import imagenet as experiment
from bnrepro.models.inception import Inception, count_flops
from bnrepro.runs import device_name


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bnrepro_loop(recipe: recipes.ImagenetRecipe, profile: str, options: experiment.Options, steps: int,
                 warmup: int) -> tuple[float, torch.device, list[str], images.Split]:
    """The trainer's step (bnrepro/engine/trainer.py) on the task `bnrepro imagenet` builds; returns images/s."""
    task, optimizer, settings, deviations = experiment._build(recipe, profile, options, SINGLE_PROCESS)
    log = LossLog(1)
    for step in range(warmup + steps):
        if step == warmup:
            start = clock(task.device)
        for group in optimizer.param_groups:
            group["lr"] = task.lr(step)
        task.model.train()
        losses = task.losses(step)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        log.add(losses.detach())
        if (step + 1) % 50 == 0:
            log.all_diverged()
    rate = steps * settings.batch_size / (clock(task.device) - start)
    device, split = task.device, task.train_split
    del task, optimizer  # its loader's workers stop before the reference starts its own
    gc.collect()
    return rate, device, deviations, split


class ShardExamples(Dataset):
    """The examples of `bnrepro pack` shards, decoded and augmented on the CPU workers."""

    def __init__(self, split: images.Split, transform: v2.Compose):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        data = torch.frombuffer(bytearray(self.split.read(i)), dtype=torch.uint8)
        return self.transform(decode_image(data, mode=ImageReadMode.RGB)), int(self.split.labels[i])


def plain_loop(recipe: recipes.ImagenetRecipe, profile: recipes.Profile, dataset_dir: Path, split: images.Split,
               device: torch.device, steps: int, warmup: int, workers: int, compile_: bool) -> float:
    """The same network trained the ordinary way; returns images/s."""
    data = recipe.data
    transform = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(profile.resolution, scale=(data.crop_min_area, 1.0), ratio=data.crop_aspect,
                             antialias=True),
        *([v2.RandomHorizontalFlip()] if data.flip else []),
        v2.ColorJitter(**data.photometric[recipe.train.distortions].model_dump()),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(data.mean, data.std),
    ])
    dataset = ShardExamples(split, transform) if split.sharded else ImageFolder(str(dataset_dir / "train"), transform)
    loader = DataLoader(dataset, batch_size=profile.batch_size, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
    torch.manual_seed(0)
    model = Inception(experiment.model_config(recipe, len(split.classes))).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    network = torch.compile(model) if compile_ else model
    t = recipe.train
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if len(loader) == 0:
        raise SystemExit(f"the training split has fewer than {profile.batch_size} (one batch) images")
    model.train()
    step, start = 0, 0.0
    while step < warmup + steps:
        for x, y in loader:
            if step == warmup:
                start = clock(device)
            if step == warmup + steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(network(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return steps * profile.batch_size / (clock(device) - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True, help="train/ and val/ class folders, or shards")
    parser.add_argument("--recipe", default="bn-x5")
    parser.add_argument("--profile", default="proxy", help="paper, proxy or smoke: resolution and batch size")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timing starts")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=4, help="data-loading worker processes (both sides)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (both sides)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.workers < 0:
        parser.error("--steps must be at least 1, --warmup and --workers at least 0")

    recipe = recipes.load(args.recipe, args.overrides)
    if not isinstance(recipe, recipes.ImagenetRecipe):
        parser.error(f"recipe '{args.recipe}' is not an ImageNet recipe")
    if args.profile not in recipe.profiles:
        parser.error(f"recipe '{args.recipe}' has no profile '{args.profile}'")
    profile = recipe.profiles[args.profile]
    options = experiment.Options(args.dataset_dir, device=args.device, workers=args.workers, compile=args.compile,
                                 show_progress=False)

    ours, device, deviations, split = bnrepro_loop(recipe, args.profile, options, args.steps, args.warmup)
    plain = plain_loop(recipe, profile, args.dataset_dir, split, device, args.steps, args.warmup, args.workers,
                       args.compile)
    macs = count_flops(Inception(experiment.model_config(recipe, len(split.classes))), profile.resolution)

    print(f"device: {device_name(device)}; torch {torch.__version__}"
          f"{'; bf16 autocast, channels_last' if device.type == 'cuda' else '; fp32'}"
          f"{'; torch.compile' if args.compile else ''}")
    print(f"recipe {recipe.label}, profile {args.profile}: resolution {profile.resolution}, batch "
          f"{profile.batch_size}, {args.steps} steps timed after {args.warmup} warm-up, {args.workers} workers")
    print(f"data: {split.where} ({len(split):,} train examples, {len(split.classes)} classes); plain side reads "
          f"{'the shards through a Dataset over images.open_split' if split.sharded else 'ImageFolder'}")
    for line in deviations:
        print(f"note: {line}")
    print(f"network: {macs / 1e6:.1f} M multiply-adds per image forward; "
          f"{6 * macs / 1e9:.3f} GFLOP per training image (x2 FLOPs/MAC, x3 forward+backward)")

    print("\n| loop | images/s | achieved GFLOP/s |")
    print("|---|---|---|")
    for name, rate in (("plain PyTorch", plain), ("bnrepro imagenet", ours)):
        print(f"| {name} | {rate:,.1f} | {6 * macs * rate / 1e9:,.1f} |")
    print(f"\nbnrepro / plain: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
