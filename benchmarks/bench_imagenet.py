"""ImageNet-recipe training speed: `bnrepro imagenet`'s update against a plain PyTorch loop doing the same work.

Both sides train the Fig. 5 network (bnrepro.models.inception) at the same width, resolution, batch and recipe
arithmetic (BN-x5 by default: SGD with momentum, L2 on the weights, the recipe's augmentation) at one profile (the
cpu profile by default: CIFAR-10, 32 px, width 1/4, batch 128), on the same data, in one invocation; warm-up updates
are left out of the timing.

- plain: what one writes first: torchvision's dataset for the data (`ImageFolder` for class folders such as
  shared/data/cifar10's JPEGs, `CIFAR10` for its python batches, `FashionMNIST` for idx files), transforms v2 per
  example (RandomResizedCrop, flip, ColorJitter, ToDtype, Normalize), a DataLoader with worker processes, and the
  network as it is usually written: four branches per module, each with its own convolutions, and
  `nn.BatchNorm2d`; in NCHW and again in channels_last.
- bnrepro: the task `bnrepro imagenet` builds (the images held in memory as one uint8 tensor, augmented a
  mini-batch at a time on the device with each example's own seed, channels_last, torch's fused BN kernel) and
  the trainer's update (bnrepro.experiments.imagenet.time_training).

    python benchmarks/bench_imagenet.py                                  # ../shared/data/cifar10, 2 cores
    python benchmarks/bench_imagenet.py --data ../shared/data/fashion-mnist/raw --profile proxy \
        --set profiles.proxy.resolution=32 --set profiles.proxy.width=0.25 --set profiles.proxy.batch_size=128
    python benchmarks/bench_imagenet.py --profile paper --device cuda --synthetic

Also printed: where bnrepro's time goes (data vs step), the compute bound (multiply-adds x 6 per training
image against this machine's measured GFLOP/s for the network's own convolutions, forward and backward, with no
data at all), and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import gzip
import resource
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR10, FashionMNIST, ImageFolder
from torchvision.transforms import v2

from bnrepro import recipes
from bnrepro.data.transforms import crop_min_area
from bnrepro.engine.distributed import SINGLE_PROCESS
from bnrepro.engine.timing import clock
from bnrepro.experiments import imagenet as experiment
from bnrepro.models import inception
from bnrepro.models.batchnorm import BatchNorm
from bnrepro.models.inception import Inception, count_flops
from bnrepro.runs import device_name

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10"


class FourBranches(nn.Module):
    """An Inception module as usually written: each branch its own convolutions (bnrepro runs the three 1x1
    convolutions that read the module's input as one; same arithmetic)."""

    def __init__(self, cfg: recipes.InceptionModel, spec: inception.Module, cin: int):
        super().__init__()
        unit, s = inception.ConvUnit, spec.stride
        self.branches = nn.ModuleList([unit(cfg, cin, spec.n1x1, 1)] if spec.n1x1 else [])
        self.branches.append(nn.Sequential(unit(cfg, cin, spec.n3x3_reduce, 1),
                                           unit(cfg, spec.n3x3_reduce, spec.n3x3, 3, s)))
        self.branches.append(nn.Sequential(unit(cfg, cin, spec.double_reduce, 1),
                                           unit(cfg, spec.double_reduce, spec.double, 3),
                                           unit(cfg, spec.double, spec.double, 3, s)))
        pool = {"pass": nn.MaxPool2d(3, 2, padding=1), "max": nn.MaxPool2d(3, 1, padding=1),
                "avg": nn.AvgPool2d(3, 1, padding=1, count_include_pad=cfg.pool_count_include_pad)}[spec.pool]
        self.branches.append(pool if spec.pool == "pass" else nn.Sequential(pool, unit(cfg, cin, spec.proj, 1)))
        self.out_channels = spec.out_channels(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], 1)


def plain_network(cfg: inception.InceptionConfig) -> nn.Module:
    """The Fig. 5 network as a plain loop would have it: four-branch modules, torch's BN."""
    with mock.patch.object(inception, "InceptionModule", FourBranches):
        return with_torch_bn(Inception(cfg))


def with_torch_bn(model: nn.Module) -> nn.Module:
    """The same network with every project BN replaced by torch's own module (same eps and momentum)."""
    for name, child in model.named_children():
        if isinstance(child, BatchNorm):
            kind = nn.BatchNorm2d if len(child.reduce_dims) == 3 else nn.BatchNorm1d
            setattr(model, name, kind(child.gamma.numel(), eps=child.eps, momentum=child.momentum))
        else:
            with_torch_bn(child)
    return model


def plain_dataset(data_dir: Path, scratch: Path, transform: v2.Compose) -> torch.utils.data.Dataset:
    """The training set as torchvision reads it: class folders (``train/<class>/``), CIFAR-10's python batches, or
    Fashion-MNIST's idx .gz files (unpacked into ``scratch``, where torchvision wants them)."""
    if (data_dir / "train").is_dir():
        return ImageFolder(str(data_dir / "train"), transform=transform)
    if (data_dir / "batches.meta").is_file() or (data_dir / "cifar-10-batches-py").is_dir():
        root = data_dir if (data_dir / "cifar-10-batches-py").is_dir() else data_dir.parent
        return CIFAR10(str(root), train=True, transform=transform)
    folder = scratch / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for gz in data_dir.glob("*-ubyte.gz"):
        with gzip.open(gz) as src, open(folder / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return FashionMNIST(str(scratch), train=True, transform=transform)


def plain_loop(recipe: recipes.ImagenetRecipe, profile: recipes.Profile, data_dir: Path, device: torch.device,
               steps: int, warmup: int, workers: int, channels_last: bool) -> tuple[float, float]:
    """The network trained the ordinary way; returns (images/s of training, images/s of the loader alone)."""
    data = recipe.data
    transform = v2.Compose([
        v2.ToImage(), v2.RGB(),
        v2.RandomResizedCrop(profile.resolution, scale=(crop_min_area(recipe, profile), 1.0),
                             ratio=data.crop_aspect, antialias=True),
        *([v2.RandomHorizontalFlip()] if data.flip else []),
        v2.ColorJitter(**data.photometric[recipe.train.distortions].model_dump()),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std),
    ])
    with tempfile.TemporaryDirectory() as root:
        dataset = plain_dataset(data_dir, Path(root), transform)
        loader = DataLoader(dataset, batch_size=profile.batch_size, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0)
        torch.manual_seed(0)
        model = plain_network(inception.InceptionConfig(recipe.model, profile.width, len(dataset.classes))).to(device)
        memory = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=memory)
        t = recipe.train
        optimizer = experiment.sgd(model, recipe)
        model.train()
        batches = iter(loader)
        for step in range(warmup + steps):
            if step == warmup:
                start = clock(device)
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True).contiguous(memory_format=memory), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = t.lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        training = steps * profile.batch_size / (clock(device) - start)
        start = time.perf_counter()
        for _ in range(steps):
            next(batches)
        loading = steps * profile.batch_size / (time.perf_counter() - start)
    return training, loading


def bnrepro_loop(recipe: recipes.ImagenetRecipe, profile_name: str, options: experiment.Options, steps: int,
                 warmup: int, synthetic: bool) -> tuple[float, float, experiment.ImagenetTask]:
    """The trainer's update on the task `bnrepro imagenet` builds; returns (images/s of training, images/s of
    producing the augmented batches alone, the task)."""
    task, optimizer, profile = experiment.build(recipe, profile_name, options, SINGLE_PROCESS, synthetic=synthetic)
    training = experiment.time_training(task, optimizer, steps, warmup)
    batches = task.train_batches(0)
    next(batches)
    start = clock(task.device)
    for _ in range(steps):
        next(batches)
    loading = steps * profile.batch_size / (clock(task.device) - start)
    return training, loading, task


def compute_only(model: nn.Module, batch: int, resolution: int, device: torch.device, steps: int) -> float:
    """Images/s of forward + backward + SGD on one fixed batch already on the device: the network's own speed."""
    x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    for step in range(steps + 3):
        if step == 3:
            start = clock(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (clock(device) - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA,
                        help="class folders (train/<class>/), CIFAR-10's python batches or Fashion-MNIST's idx files")
    parser.add_argument("--recipe", default="bn-x5")
    parser.add_argument("--profile", default="cpu", help="the recipe's profile: resolution, width, batch")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a recipe override, KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40, help="timed updates per side")
    parser.add_argument("--warmup", type=int, default=5, help="updates before the timing starts")
    parser.add_argument("--workers", type=int, default=2, help="the plain loop's DataLoader workers")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--synthetic", action="store_true", help="random images on both sides' place: the step alone")
    args = parser.parse_args()

    recipe = recipes.load(args.recipe, args.overrides)
    profile = recipe.profiles[args.profile]
    options = experiment.Options(args.data, device=args.device, show_progress=False)
    ours, ours_data, task = bnrepro_loop(recipe, args.profile, options, args.steps, args.warmup, args.synthetic)
    device = task.device
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    resident_mib = sum(s.pixels.numel() for s in (task.train_split, task.val_split) if s.pixels is not None) / 2**20
    classes = len(task.train_split.classes)
    del task
    rows = [("bnrepro imagenet", ours, ours_data)]
    if not args.synthetic:
        for memory in (False, True):
            rate, loading = plain_loop(recipe, profile, args.data, device, args.steps, args.warmup, args.workers,
                                       memory)
            rows.insert(len(rows) - 1, (f"plain PyTorch, {'channels_last' if memory else 'NCHW'}", rate, loading))
    model = Inception(inception.InceptionConfig(recipe.model, profile.width, classes))
    macs = count_flops(model, profile.resolution)
    alone = compute_only(model.to(device, memory_format=torch.channels_last), profile.batch_size,
                         profile.resolution, device, args.steps)
    plain = plain_network(inception.InceptionConfig(recipe.model, profile.width, classes)).to(device)
    nchw = compute_only(plain, profile.batch_size, profile.resolution, device, args.steps)

    print(f"device: {device_name(device)}; torch {torch.__version__}; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; {torch.get_num_threads()} threads")
    print(f"recipe {recipe.label} at profile {args.profile}: {profile.resolution} px, width x{profile.width:g}, "
          f"batch {profile.batch_size}; {args.steps} updates timed after {args.warmup}; "
          f"data: {'synthetic' if args.synthetic else args.data}")
    print(f"network: {macs / 1e6:.2f} M multiply-adds per image forward = {6 * macs / 1e6:.1f} MFLOP per training "
          f"image (x2 FLOPs per multiply-add, x3 forward and backward)")
    print(f"compute alone (one batch on the device, no data): {alone:,.0f} images/s = "
          f"{6 * macs * alone / 1e9:,.1f} GFLOP/s (bnrepro's network: channels_last, fused BN, merged 1x1 "
          f"entries); {nchw:,.0f} images/s for the plain loop's network in NCHW")
    print("\n| loop | images/s | vs plain NCHW | vs plain channels_last | data alone, images/s | data share |")
    print("|---|---|---|---|---|---|")
    plain = {name: rate for name, rate, _ in rows}
    for name, rate, loading in rows:
        ratio = [f"{rate / plain[k]:.2f}x" if k in plain else "—"
                 for k in ("plain PyTorch, NCHW", "plain PyTorch, channels_last")]
        share = f"{100 * rate / loading:.0f}%" if not name.startswith("plain") else "(workers run beside the step)"
        print(f"| {name} | {rate:,.0f} | {ratio[0]} | {ratio[1]} | {loading:,.0f} | {share} |")
    print(f"\nbnrepro's bound here: the compute-alone rate above ({alone:,.0f} images/s); it reaches "
          f"{100 * ours / alone:.0f}% of it")
    print(f"peak resident memory after bnrepro's side: {peak_mib:,.0f} MiB (resident images on the device: "
          f"{resident_mib:,.1f} MiB)")


if __name__ == "__main__":
    main()
