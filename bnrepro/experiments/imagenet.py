"""The ImageNet experiments of Sec. 4.2 (Figs. 2-3): one recipe trains one Fig. 5 network on the shared trainer.

The recipe says what to train (network switches, learning rate and its decay, L2, shuffling, distortions);
the profile says at what scale (data set, resolution, batch, budget in steps). One process trains on the
CPU or one GPU; ``torchrun`` starts one process per GPU (DDP, per-replica BN statistics unless
``train.bn_sync``). Every replica holds a full copy of the model and reads its own slice of each global
mini-batch; only the main replica writes files.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bnrepro import recipes as recipe_io
from bnrepro.data import sources
from bnrepro.data.order import EvaluationBatches, TrainingStream
from bnrepro.data.pipeline import Pipeline
from bnrepro.data.resident import make_resident
from bnrepro.data.resident import synthetic as synthetic_splits
from bnrepro.data.sources.folders import imagenet_wnids
from bnrepro.data.split import Split
from bnrepro.data.transforms import crop_min_area, transforms_for
from bnrepro.engine import checkpoint
from bnrepro.engine.distributed import Replicas
from bnrepro.engine.precision import autocast, configure_kernels, precision
from bnrepro.engine.timing import time_updates
from bnrepro.engine.trainer import Schedule, train
from bnrepro.errors import UserError
from bnrepro.models.batchnorm import BatchNorm, estimate_population, use_statistics
from bnrepro.models.inception import Inception, InceptionConfig, count_parameters
from bnrepro.recipes import ImagenetRecipe, Profile, Statistics, learning_rate
from bnrepro.runs import (
    COMPLETE,
    DIVERGED,
    FINISHED,
    Damaged,
    RunLock,
    announce,
    atomic_write,
    device_name,
    git_commit,
    manifest_start,
    new_run_dir,
    now,
    read_json,
    read_table,
    remove_temporary,
    resolve_device,
    training,
    write_json,
)

MAX_EMPTY_UPDATES = 10  # consecutive updates without a readable image before the run stops with an error


@dataclass(frozen=True)
class Options:
    """How to run (not what to train): nothing here changes the numbers except ``seed``."""

    dataset_dir: Path
    device: str = "auto"
    seed: int = 0
    workers: int = 4
    compile: bool = False
    deterministic: bool = False  # on a GPU, only kernels that repeat their results (engine.precision)
    gpu_decode: bool = True  # on a GPU, decode JPEGs there (nvJPEG); other formats are decoded by the workers
    resident: bool = True  # hold a data set that fits in memory decoded there (augmented in batches, no workers)
    show_progress: bool = True
    git_commit: str | None = None  # the code's commit as a campaign read it before it ran (default: read now)
    allow_dirty: bool = False  # the campaign was allowed to run from uncommitted changes (recorded)


def sgd(model: nn.Module, recipe: ImagenetRecipe) -> torch.optim.Optimizer:
    """SGD with momentum; L2 on conv and classifier weights only (not biases, not BN's gamma and beta)."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]  # conv and linear
    others = [p for name, p in model.named_parameters() if not name.endswith("weight")]  # biases, gamma, beta
    t = recipe.train
    groups = [{"params": weights, "weight_decay": t.weight_decay}, {"params": others, "weight_decay": 0}]
    # fused: the same update in one kernel per step (CPU and CUDA; ~6% of a CPU step at width 1/4 saved)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, fused=True)


class ImagenetTask:
    """What the shared trainer needs: each step's loss on this replica's slice of the mini-batch, and
    single-crop top-1/top-5 on the whole validation set at each evaluation."""

    def __init__(self, recipe: ImagenetRecipe, profile: Profile, train_split: Split, val_split: Split,
                 device: torch.device, replicas: Replicas, options: Options):
        self.recipe, self.profile, self.device, self.replicas, self.options = recipe, profile, device, replicas, options
        self.train_split, self.val_split = train_split, val_split
        with torch.random.fork_rng(devices=[]):  # the initial weights from the seed alone, the same on every replica
            torch.manual_seed(options.seed)
            self.model = Inception(InceptionConfig(recipe.model, profile.width, len(train_split.classes))).to(device)
        for module in self.model.modules():
            if isinstance(module, BatchNorm):
                module.sync = recipe.train.bn_sync
        self.model = self.model.to(memory_format=torch.channels_last)  # faster on CPUs and GPUs alike (README)
        network: nn.Module = self.model
        if replicas.distributed:  # BN buffers stay per replica; they are averaged before use (see below)
            network = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
        self.network = torch.compile(network) if options.compile else network
        torch.manual_seed(options.seed * 1_000 + replicas.rank + 1)  # each replica's own dropout stream (global:
        # dropout draws from torch's global generator, which the trainer's checkpoints save and restore)
        transforms = transforms_for(recipe, profile)
        self.train_data, self.val_data = (Pipeline(split, transforms, device, options.seed, options.workers,
                                                   options.gpu_decode) for split in (train_split, val_split))
        self.order = recipe.train.shuffle
        self.batches, self.next_step = None, -1  # the training mini-batches from the step this process started at
        self.empty_updates = 0  # consecutive updates skipped because a replica's slice had no readable image
        self.rows: list[dict[str, Any]] = []
        self.metrics_file: Path | None = None  # rewritten at every evaluation when set
        self.val_skipped = 0  # unreadable validation images (all replicas), at the last evaluation
        self.lr = learning_rate(recipe, profile, len(train_split), replicas.world)

    # --- data ---

    def stream(self, step: int) -> TrainingStream:
        """This replica's mini-batches from paper step ``step`` on: replica r reads steps step + r, step + r + W, ..."""
        return TrainingStream(self.train_split, self.recipe.train.shuffle, self.options.seed, self.profile.batch_size,
                              self.replicas.rank, self.replicas.world, step // self.replicas.world,
                              self.recipe.train.shuffle_buffer_shards)

    def train_batches(self, step: int, train: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
        """(normalized images, labels) of this replica's training mini-batches from paper step ``step`` on,
        augmented for training (``train``) or cut to the evaluation view."""
        return self.train_data.batches(self.stream(step), train)

    @property
    def skipped(self) -> int:
        """Unreadable training images met by this replica."""
        return self.train_data.skipped

    def train_steps(self, start: int, stop: int, learning_rate: Callable[[int], float]) -> Tensor | None:
        """None: one update at a time, through ``losses`` and the trainer's optimizer (the Task protocol)."""
        return None

    def losses(self, step: int) -> Tensor | None:
        """The loss of this replica's mini-batch of the update at paper step ``step``; ``None`` (every replica
        skips the update: no forward, no BN averages, no weight decay or momentum) when any replica's
        mini-batch had no readable image."""
        if step != self.next_step:  # first update of this process: the stream starts where the run stands
            self.batches = self.train_batches(step)
        x, y = next(self.batches)
        self.next_step = step + self.replicas.world
        if self.train_split.pixels is None and self.replicas.any(len(y) == 0):  # resident batches are never empty
            self.empty_updates += 1
            if self.empty_updates >= MAX_EMPTY_UPDATES:
                raise UserError(f"the last {MAX_EMPTY_UPDATES} mini-batches had no readable image; check the "
                                f"images in {self.train_split.where}")
            return None
        self.empty_updates = 0
        with autocast(self.device):
            logits = self.network(x)
        return F.cross_entropy(logits.float(), y).view(1)

    # --- evaluation ---

    @torch.no_grad()
    def average_bn_statistics(self) -> None:
        """Each replica tracked BN moving averages of its own batches; inference uses their mean."""
        if self.replicas.distributed:
            for buffer in self.model.buffers():
                if buffer.is_floating_point():
                    buffer.copy_(self.replicas.mean(buffer))

    @torch.no_grad()
    def accuracy(self) -> tuple[float, float]:
        """Single centre crop top-1/top-5 over the whole validation set, each image counted exactly once."""
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():  # one wait, not one per
            # parameter
            return math.nan, math.nan  # "machine infinity": nothing meaningful to evaluate
        sampler = EvaluationBatches(len(self.val_split), self.profile.batch_size, self.replicas.rank,
                                    self.replicas.world)
        counts = torch.zeros(4, dtype=torch.float64, device=self.device)  # top-1 hits, top-5 hits, images, skipped
        skipped_before = self.val_data.skipped
        for x, y in self.val_data.batches(sampler, train=False, persistent=True):
            if len(y) == 0:
                continue
            with autocast(self.device):
                top5 = self.model(x).float().topk(min(5, self.model.cfg.num_classes), dim=1).indices
            hits = top5 == y[:, None]
            counts[0] += hits[:, 0].sum()
            counts[1] += hits.any(1).sum()
            counts[2] += len(y)  # a number, not a new tensor: no copy to the device
        counts[3] = self.val_data.skipped - skipped_before  # the same files fail at every evaluation
        counts = self.replicas.sum_(counts)
        self.val_skipped = int(counts[3])
        return float(counts[0] / counts[2]), float(counts[1] / counts[2])

    @torch.no_grad()
    def estimate_population(self, step: int) -> int:
        """Alg. 2: BN's population statistics over the ``population_batches`` training mini-batches from paper
        step ``step`` on (the stream's own, so a pure function of the step), split between the replicas and
        summed over them; their images get ``data.population_transform``. Returns the batches averaged."""
        train = self.recipe.data.population_transform == "train"
        mine = len(range(self.replicas.rank, self.profile.population_batches, self.replicas.world))
        skipped = self.train_data.skipped

        def forward() -> None:
            for x, _ in itertools.islice(self.train_batches(step, train), mine):
                if len(x):
                    with autocast(self.device):
                        self.model(x)

        try:
            return estimate_population(self.model, forward, self.replicas.sum_)
        finally:
            self.train_data.skipped = skipped  # these images are counted when training reads them

    def evaluate(self, step: int, train_loss: Tensor, statistics: Statistics) -> dict[str, float]:
        if any(isinstance(module, BatchNorm) for module in self.model.modules()):
            if statistics == "population" and self.estimate_population(step) == 0:
                raise UserError(f"no readable image in {self.profile.population_batches} training mini-batches "
                                f"for BN's population statistics; check {self.train_split.where}")
            use_statistics(self.model, statistics)
        self.average_bn_statistics()
        top1, top5 = self.accuracy()
        world = self.replicas.world
        row = {"step": step, "optimizer_step": step // world, "epoch": step * self.profile.batch_size / len(
               self.train_split), "statistics": statistics, "train_loss": float(train_loss[0]),
               "lr": self.lr(max(step - world, 0)), "top1": top1, "top5": top5}
        self.rows.append(row)
        if self.metrics_file is not None and self.replicas.is_main:  # a long run shows its curve as it goes
            atomic_write(self.metrics_file, pd.DataFrame(self.rows).to_csv(index=False))
        return row

    def state_dict(self) -> dict[str, Any]:
        self.average_bn_statistics()
        return {"rows": self.rows, "skipped": self.replicas.gather(self.skipped)}  # each replica's own count

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.train_data.skipped = list(state["rows"]), int(state["skipped"][self.replicas.rank])


# --- runs ------------------------------------------------------------------------------------------------


def _data(profile: Profile, options: Options) -> tuple[Split, Split]:
    """The two splits; class folders come in virtual shards of ``profile.shard_size``, so ``train.shuffle``
    holds for them too; a data set that fits in memory is held there decoded (``options.resident``)."""
    dataset_dir = options.dataset_dir
    train_split = sources.open_split(dataset_dir, "train", shard_size=profile.shard_size)
    val_split = sources.open_split(dataset_dir, "val", train_split.classes, shard_size=profile.shard_size)
    if val_split.classes != train_split.classes:
        raise UserError(f"train and val in {dataset_dir} have different class lists; pack them together")
    if options.resident:  # only now, once both splits opened: a refusal above stays the one line a user sees
        train_split, val_split = make_resident(train_split), make_resident(val_split)
    return train_split, val_split


def deviations(recipe: ImagenetRecipe, profile_name: str, overrides: list[str], task: ImagenetTask,
               data_name: str | None = None) -> list[str]:
    """Every way this run differs from the paper's ImageNet run of the recipe (recorded, printed, reported): its
    data, its scale, its replicas and precision, and the recipe changes given on the command line."""
    return [*_data_deviations(recipe, profile_name, task, data_name), *_scale_deviations(recipe, task),
            *_replica_deviations(recipe, task), *[f"recipe changed for this run: --set {text}" for text in overrides]]


def _data_deviations(recipe: ImagenetRecipe, profile_name: str, task: ImagenetTask, data_name: str | None
                     ) -> list[str]:
    """The data is named as what was opened (``data_name``: its ``data_identity`` name; else where it lies), never
    as what the profile was made for: a smoke run on real shards did not train on generated images."""
    paper, profile, split = recipe.profiles["paper"], task.profile, task.train_split
    found = []
    if split.classes != imagenet_wnids():
        found.append(f"data: {data_name or split.where} ({len(split):,} training images, {len(split.classes)} "
                     f"classes), not ImageNet")
    elif len(split) != paper.train_examples:
        found.append(f"data: {len(split):,} training images of ImageNet's classes, not ImageNet's "
                     f"{paper.train_examples:,}")
    if len(split) != profile.train_examples:
        found.append(f"profile '{profile_name}' budgets assume {profile.train_examples:,} training examples; the data "
                     f"has {len(split):,} (the learning-rate decay follows the data's epochs)")
    if split.folders:
        found.append(f"class folders: stored order by path hash, in virtual shards of {profile.shard_size:,} "
                     f"(for train.shuffle={recipe.train.shuffle})")
    return found


def _scale_deviations(recipe: ImagenetRecipe, task: ImagenetTask) -> list[str]:
    """The profile against the paper's: resolution, width, mini-batch, budget, time compression."""
    paper, profile = recipe.profiles["paper"], task.profile
    found = []
    if profile.resolution != paper.resolution:
        found.append(f"resolution {profile.resolution} px, not {paper.resolution}")
    if profile.width != paper.width:
        found.append(f"network width x{profile.width:g}: every filter count of Fig. 5 (the stem's too) scaled, "
                     f"{count_parameters(task.model):,} parameters")
    if profile.batch_size != paper.batch_size:
        found.append(f"mini-batch {profile.batch_size}, not {paper.batch_size}")
    if profile.steps != paper.steps:
        found.append(f"budget {profile.steps:,} steps ({profile.epochs(profile.steps):,.1f} epochs of this data), "
                     f"not the paper profile's {paper.steps:,}")
    area = crop_min_area(recipe, profile)
    if area != recipe.data.crop_min_area:
        crops = "no random-size crops (the whole image, flips only)" if area == 1 else \
            f"random-size crops of {area:.0%}-100% of the image's area"
        found.append(f"{crops}, not the recipe's crops of {recipe.data.crop_min_area:.0%}-100%")
    if profile.compression:
        found.append(f"time compressed: a step here stands for {1 / profile.compression:,.0f} paper steps; the "
                     f"budget and the learning-rate decay are the paper's x{profile.compression:.3g}")
    return found


def _replica_deviations(recipe: ImagenetRecipe, task: ImagenetTask) -> list[str]:
    """Synchronous replicas against the paper's asynchronous ones, the learning rate they scale, the precision."""
    paper, profile, world = recipe.profiles["paper"], task.profile, task.replicas.world
    found = []
    if world > 1:
        found.append(f"{world} replicas' mini-batches of {profile.batch_size} make one synchronous update (global "
                     f"batch {world * profile.batch_size}); the paper's replicas were asynchronous")
    if profile.steps % world:  # an update covers one step per replica, so the last one overshoots the budget
        found.append(f"budget {profile.steps:,} steps is not a multiple of {world} replicas: the run trains "
                     f"{-(-profile.steps // world) * world:,} steps")
    factor = recipe.train.lr_factor(world * profile.batch_size / paper.batch_size)
    if factor != 1:
        found.append(f"learning rate x{factor:g}: global batch {world * profile.batch_size} against the paper's "
                     f"{paper.batch_size} (train.lr_scaling={recipe.train.lr_scaling})")
    if profile.compression:  # L2's coefficient is kept, so its total pull over the run shrinks with the budget
        shrinkage = profile.compression * factor
        found.append(f"L2 over the run: the total shrinkage sum(lr x weight decay) is 1/{1 / shrinkage:,.0f} of the "
                     f"paper's (compression x{profile.compression:.3g}, learning rate x{factor:g}), so the weight "
                     f"decay (change 3) can barely act")
    if task.device.type == "cuda":
        found.append("bf16 autocast (the paper does not state its precision; 2015 training was fp32)")
    return found


def build(recipe: ImagenetRecipe, profile_name: str, options: Options, replicas: Replicas, synthetic: bool = False):
    if profile_name not in recipe.profiles:
        raise UserError(f"recipe '{recipe.label}' has no profile '{profile_name}'; it has {', '.join(recipe.profiles)}")
    profile = recipe.profiles[profile_name]
    device = resolve_device(options.device)
    if device.type == "cuda" and replicas.distributed:
        device = torch.device("cuda", replicas.local_rank)
        torch.cuda.set_device(device)
    configure_kernels(device, options.deterministic)
    train_split, val_split = synthetic_splits(profile.resolution) if synthetic else _data(profile, options)
    task = ImagenetTask(recipe, profile, train_split, val_split, device, replicas, options)
    return task, sgd(task.model, recipe), profile


def time_training(task: ImagenetTask, optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> float:
    """Images per second of the trainer's update on ``task`` (see ``engine.timing.time_updates``)."""
    task.model.train()
    world = task.replicas.world
    return time_updates(task.losses, optimizer, task.lr, steps, warmup, world, task.profile.batch_size * world,
                        task.device)


def synthetic(recipe_name: str, profile_name: str, overrides: list[str], options: Options, steps: int,
              replicas: Replicas, warmup: int = 5) -> dict[str, Any]:
    """Time the training step alone on random resident images of the profile's size (no data set, no run folder),
    so a run can be sized on any device before its data is fetched."""
    recipe = _imagenet_recipe(recipe_name, overrides)
    task, optimizer, profile = build(recipe, profile_name, options, replicas, synthetic=True)
    rate = time_training(task, optimizer, steps, warmup)
    return {"label": recipe.label, "profile": profile_name, "device": device_name(task.device),
            "precision": precision(task.device), "replicas": replicas.world, "images_per_second": rate,
            "steps": steps, "budget_steps": profile.steps,
            "budget_hours": profile.steps * profile.batch_size / rate / 3600}


def _imagenet_recipe(recipe_name: str, overrides: list[str]) -> ImagenetRecipe:
    recipe = recipe_io.load(recipe_name, overrides)
    if not isinstance(recipe, ImagenetRecipe):
        raise UserError(f"recipe '{recipe_name}' is a {recipe.experiment} recipe, not an ImageNet one")
    return recipe


def profile_data(recipe_name: str, profile_name: str) -> Path:
    """The data of ``recipe_name`` at ``profile_name`` when no folder is given: the profile's data set downloaded
    into the user cache if bnrepro can fetch it (CIFAR-10 for the cpu profile), else a request for --dataset-dir."""
    recipe = _imagenet_recipe(recipe_name, [])
    if profile_name not in recipe.profiles:
        raise UserError(f"recipe '{recipe_name}' has no profile '{profile_name}' ({', '.join(recipe.profiles)})")
    return sources.fetch(recipe.profiles[profile_name].dataset)


def run(recipe_name: str, profile_name: str, overrides: list[str], options: Options, out: Path,
        replicas: Replicas) -> Path:
    """Train one recipe at one profile in a new run folder ``out/imagenet/<recipe>-<time>``; returns the folder."""
    recipe = _imagenet_recipe(recipe_name, overrides)
    if profile_name in recipe.profiles and recipe.profiles[profile_name].steps < 1:
        raise UserError(f"a run of '{recipe_name}' at profile '{profile_name}' would train 0 steps and keep no "
                        f"checkpoint; give it at least 1 (--steps N)")
    task, optimizer, profile = build(recipe, profile_name, options, replicas)
    short = Path(recipe_name).stem
    identity = sources.data_identity(options.dataset_dir, task.train_split, task.val_split)
    manifest = manifest_start("imagenet", task.device, {
        "recipe": short, "label": recipe.label, "recipe_digest": recipe.digest,
        "recipe_training_digest": recipe.training_digest(profile_name), "overrides": list(overrides),
        "profile": profile_name, "dataset": f"{task.train_split.where} ({len(task.train_split):,} train, "
                                            f"{len(task.val_split):,} val, {len(task.train_split.classes)} classes)",
        "dataset_dir": str(Path(options.dataset_dir).resolve()), "classes": task.train_split.classes,
        "data_identity": identity,
        "train_examples": len(task.train_split), "packed": task.train_split.packed,
        "resident": task.train_split.pixels is not None, "val_resident": task.val_split.pixels is not None,
        "shard_size": None if task.train_split.packed else profile.shard_size,
        "seed": options.seed,
        "replicas": replicas.world, "bn_statistics": "synchronised" if recipe.train.bn_sync else "per replica",
        "global_batch": profile.batch_size * replicas.world, "lr_factor": task.lr(0) / recipe.train.lr,
        "compression": profile.compression,
        "deviations": deviations(recipe, profile_name, overrides, task, identity["name"]),
        "compile": options.compile, "deterministic": options.deterministic,
        "gpu_decode": task.train_data.jpegs_as_bytes,
        "workers": 0 if task.train_split.pixels is not None else options.workers,  # resident data needs none
        "precision": precision(task.device), "allow_dirty": options.allow_dirty,
    }, options.git_commit)
    # only now: every check that can fail has passed
    owner = _on_main(replicas, lambda: _new_folder(Path(out) / "imagenet", f"{short}-"))
    run_dir = Path(replicas.gather(None if owner is None else str(owner.path.parent))[0])
    with _owning(run_dir, owner, fresh=True, replicas=replicas):
        if owner is not None:
            atomic_write(run_dir / "recipe.yaml", recipe_io.to_yaml(recipe))
        return _train(run_dir, recipe, manifest, task, optimizer, profile, replicas, owner=owner)


def resume(run_dir: Path, replicas: Replicas, dataset_dir: Path | None = None, **how: Any) -> Path:
    """Continue an interrupted run exactly where its checkpoint left it (same recipe, profile, data, seed).

    The run is claimed first (``RunLock``), before anything that takes time, so of two resumes started together
    one trains and the other stops at once; every check then runs before the run's deviations are announced, so a
    refusal is the one line a user sees."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise UserError(f"{run_dir} is not an ImageNet run folder (it has no manifest.json)")
    owner = _on_main(replicas, lambda: RunLock.claim(run_dir))
    with _owning(run_dir, owner, fresh=False, replicas=replicas):
        manifest, recipe = _resumable(run_dir, replicas)
        if owner is not None:
            remove_temporary(run_dir)  # a checkpoint write cut short by kill -9: as large as the checkpoint
        state = _saved_state(run_dir, replicas)
        options = Options(Path(dataset_dir or manifest["dataset_dir"]), seed=manifest["seed"],
                          resident=manifest.get("resident", False), deterministic=manifest.get("deterministic", False),
                          **how)  # the same pipeline, the same augmentation, the same kernels
        task, optimizer, profile = build(recipe, manifest["profile"], options, replicas)
        _check_same_data(run_dir, manifest, task, options.dataset_dir, profile)
        _check_fits(run_dir, state, task, optimizer)
        manifest["resumed"] = [*manifest.get("resumed", []), {
            "at": now(), "device": device_name(task.device), "precision": precision(task.device),
            "git_commit": options.git_commit or git_commit(), "allow_dirty": options.allow_dirty}]
        return _train(run_dir, recipe, manifest, task, optimizer, profile, replicas, owner=owner, state=state)


T = TypeVar("T")


def _on_main(replicas: Replicas, action: Callable[[], T]) -> T | None:
    """``action()`` on the main replica alone (it creates or claims the run folder); its ``UserError`` is raised on
    every replica, which would otherwise wait for the main one forever at their next collective. Returns the
    action's result on the main replica, ``None`` on the others."""
    result, failure = None, None
    if replicas.is_main:
        try:
            result = action()
        except UserError as err:
            failure = str(err)
    failure = replicas.gather(failure)[0]
    if failure is not None:
        raise UserError(failure)
    return result


def _new_folder(parent: Path, prefix: str) -> RunLock:
    """A new run folder under ``parent``, claimed by this process."""
    try:
        folder = new_run_dir(parent, prefix=prefix)
    except OSError as err:  # a full disk: nothing was made
        raise UserError(f"cannot create a run folder in {parent} ({err.strerror})") from None
    try:
        return RunLock.claim(folder)
    except UserError:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@contextmanager
def _owning(run_dir: Path, owner: RunLock | None, fresh: bool, replicas: Replicas) -> Iterator[None]:
    """Whatever happens to a run folder while this process owns it. On the way out the claim is released, however
    the block ended; a new run (``fresh``) that ends without a checkpoint leaves no folder behind (it could not be
    resumed, and held only its recipe and the start of its manifest and metrics); an ``OSError`` (a full disk, a
    file gone) becomes one line that says what was kept."""
    try:
        yield
    except BaseException as err:
        kept = (run_dir / checkpoint.NAME).is_file()
        if fresh and not kept and replicas.is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(err, OSError):
            what = f"{err.strerror or err.__class__.__name__}" + (f": {err.filename}" if err.filename else "")
            then = f"run {run_dir} keeps its last checkpoint; once that is fixed, continue it with: bnrepro imagenet " \
                   f"--resume {run_dir}" if kept else \
                "the run had no checkpoint yet, so nothing of it was kept; start it again once that is fixed"
            raise UserError(f"training stopped: {what}; {then}") from None
        raise
    finally:
        if owner is not None:
            owner.release()


def _resumable(run_dir: Path, replicas: Replicas) -> tuple[dict[str, Any], ImagenetRecipe]:
    """The manifest and recipe of a run that can be continued as it was set up (read under its claim: another
    process may have finished it meanwhile), or a ``UserError`` saying why it cannot."""
    recipe_file = run_dir / "recipe.yaml"
    try:
        manifest = read_json(run_dir / "manifest.json", keys=("profile", "seed", "replicas", "dataset_dir"))
        tree = yaml.safe_load(recipe_file.read_text())
    except (Damaged, OSError, ValueError, yaml.YAMLError):
        raise UserError(f"{run_dir} is not an ImageNet run folder (no readable manifest.json/recipe.yaml)") from None
    if manifest.get("experiment", "imagenet") != "imagenet":
        raise UserError(f"{run_dir} is a {manifest['experiment']} run, not an ImageNet one")
    if manifest.get("status") in FINISHED:
        raise UserError(f"run {run_dir} is already {manifest['status']}; start a new one instead")
    if not (run_dir / checkpoint.NAME).is_file():
        raise UserError(f"run {run_dir} has no {checkpoint.NAME} to resume from; start a new one instead")
    try:
        recipe = ImagenetRecipe.model_validate(tree)
    except ValueError as err:  # pydantic's ValidationError
        raise UserError(f"{recipe_file} is no longer a valid recipe ({recipe_io.first_error(err)}); restore it, or "
                        f"start a new run") from None
    recorded, found = manifest.get("recipe_digest"), recipe_io.recorded_digest(recipe, tree)
    if recorded and found != recorded:
        raise UserError(f"{recipe_file} was edited since the run started (digest {found}, the manifest's {recorded}); "
                        f"restore it to continue the run, or start a new run with --recipe and --set")
    if replicas.world != manifest["replicas"]:
        raise UserError(f"run {run_dir} trained on {manifest['replicas']} process(es); resume it on as many "
                        f"(the global batch and the data stream depend on it), not {replicas.world}")
    return manifest, recipe


SAVED = ("step", "model", "optimizer", "task", "log", "rng")  # what the trainer's checkpoints hold


def _saved_state(run_dir: Path, replicas: Replicas) -> dict[str, Any]:
    """The run's checkpoint, read and checked before anything is announced or built."""
    path = run_dir / checkpoint.NAME
    state = checkpoint.load(path)
    missing = [key for key in SAVED if key not in state] if isinstance(state, dict) else list(SAVED)
    if missing or len(state["rng"]) != replicas.world:
        lacks = f"lacks {', '.join(missing)}" if missing else f"holds {len(state['rng'])} replicas' random state"
        raise UserError(f"checkpoint {path} is damaged ({lacks}); the run cannot be resumed, start a new one")
    return state


def _check_same_data(run_dir: Path, manifest: dict[str, Any], task: ImagenetTask, dataset_dir: Path,
                     profile: Profile) -> None:
    """Refuse data other than the run's: other examples, classes or layout, or (where recorded) other files."""
    split = task.train_split
    shard_size = None if split.packed else profile.shard_size
    recorded = tuple(manifest.get(key) for key in ("train_examples", "packed", "shard_size", "classes"))
    if (len(split), split.packed, shard_size, split.classes) != recorded:
        raise UserError(f"the data in {dataset_dir} is not the data run {run_dir} trained on "
                        f"({manifest.get('dataset')}); resume with the same --dataset-dir")
    recorded = (manifest.get("data_identity") or {}).get("digest")
    if recorded and sources.data_identity(dataset_dir, split, task.val_split)["digest"] != recorded:
        raise UserError(f"the files in {dataset_dir} differ from those run {run_dir} trained on (data digest "
                        f"{recorded[:12]}); resume with the same data")


def _check_fits(run_dir: Path, state: dict[str, Any], task: ImagenetTask, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's weights and optimizer state load into the network its recipe builds."""
    try:
        task.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0][:200]
        raise UserError(f"checkpoint {run_dir / checkpoint.NAME} does not fit its run's network ({first}); the run "
                        f"cannot be resumed, start a new one") from None


def _train(run_dir: Path, recipe: ImagenetRecipe, manifest: dict[str, Any], task: ImagenetTask,
           optimizer: torch.optim.Optimizer, profile: Profile, replicas: Replicas, owner: RunLock | None,
           state: dict[str, Any] | None = None) -> Path:
    """Train from step 0, or from ``state`` (the run's checkpoint, already checked), and finish the folder."""
    schedule = Schedule(profile.steps, profile.eval_every, profile.checkpoint_every, stride=replicas.world)
    main = replicas.is_main
    task.metrics_file = run_dir / "metrics.csv"
    if main:
        announce(f"{recipe.label} ({manifest['profile']})", manifest["deviations"])
    with training(run_dir, manifest, main, owner):
        log = train(task, optimizer, schedule, run_dir / checkpoint.NAME, members=1, resume=state or False,
                    show_progress=task.options.show_progress, learning_rate=task.lr, replicas=replicas,
                    rate=("images", profile.batch_size), describe=_describe, statistics=recipe.eval.statistics)
    skipped = int(replicas.sum_(torch.tensor([task.skipped], device=replicas.flag_device)).item())
    skipped += task.val_skipped  # summed over replicas by the evaluation
    if not main:
        return run_dir
    metrics = pd.DataFrame(task.rows)
    summary = summarize(metrics, recipe, manifest, log.diverged_at[0], skipped)
    if skipped:
        summary["deviations"].append(f"{skipped:,} unreadable images skipped")
    announce(f"{recipe.label} ({manifest['profile']}), finished", summary["deviations"])
    atomic_write(run_dir / "metrics.csv", metrics.to_csv(index=False))
    write_json(run_dir / "summary.json", summary)
    manifest.update(status=DIVERGED if summary["diverged_at"] else COMPLETE, finished=now())
    write_json(run_dir / "manifest.json", manifest)
    checkpoint.keep_for_evaluation(run_dir / checkpoint.NAME)  # finished, so never resumed (after the manifest says so)
    return run_dir


METRICS = ("step", "train_loss", "top1", "top5")  # metrics.csv columns every reader needs ("statistics" is newer)


def read_finished(folder: Path, summary_keys: tuple[str, ...] = ()) -> tuple[dict[str, Any], pd.DataFrame]:
    """A finished run's summary.json and metrics.csv; a file that cannot be read as such raises ``Damaged``, so a
    reader of many runs skips this one with a line (``runs.skip``). Without ``summary_keys`` a run without a summary
    gives an empty one (the report names such a run from its manifest); with them, it must have them."""
    path = Path(folder) / "summary.json"
    summary = read_json(path, summary_keys) if summary_keys or path.exists() else {}
    return summary, read_table(Path(folder) / "metrics.csv", METRICS)


def _describe(shown: dict[str, float]) -> str:
    if not shown:
        return ""
    return (f"loss {shown['train_loss']:.3f}  lr {shown['lr']:.2g}  top-1 {100 * shown['top1']:.1f}%  "
            f"(step {shown['step']:,})")


def summarize(metrics: pd.DataFrame, recipe: ImagenetRecipe, manifest: dict[str, Any], diverged_at: int | None,
              skipped: int) -> dict[str, Any]:
    """Best and last single-crop accuracy, and where a divergence happened (the paper's "machine infinity")."""
    finite = metrics.dropna(subset=["top1"])
    best = finite.loc[finite["top1"].idxmax()] if len(finite) else None
    last = metrics.iloc[-1]
    return {
        "recipe": manifest["recipe"], "label": recipe.label, "profile": manifest["profile"],
        "steps": int(last["step"]),
        "max_top1": None if best is None else float(best["top1"]),
        "max_top1_step": None if best is None else int(best["step"]),
        "final_top1": None if math.isnan(last["top1"]) else float(last["top1"]),
        "final_top5": None if math.isnan(last["top5"]) else float(last["top5"]),
        "diverged_at": diverged_at,
        "skipped_images": skipped,
        "replicas": manifest["replicas"], "global_batch": manifest["global_batch"],
        "deviations": list(manifest["deviations"]),
    }
