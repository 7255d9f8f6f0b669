"""The ImageNet experiments of Sec. 4.2 (Figs. 2-3): one recipe trains one Fig. 5 network on the shared trainer.

The recipe says what to train (network switches, learning rate and its decay, L2, shuffling, distortions);
the profile says at what scale (data set, resolution, batch, budget in steps). One process trains on the
CPU or one GPU; ``torchrun`` starts one process per GPU (DDP, per-replica BN statistics unless
``train.bn_sync``). Every replica holds a full copy of the model and reads its own slice of each global
mini-batch; only the main replica writes files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from bnrepro import recipes as recipe_io
from bnrepro.data import images
from bnrepro.engine.distributed import Replicas
from bnrepro.engine.trainer import Schedule, train
from bnrepro.errors import UserError
from bnrepro.models.batchnorm import BatchNorm
from bnrepro.models.inception import Inception, InceptionConfig
from bnrepro.recipes import ImagenetRecipe, Profile
from bnrepro.runs import (
    atomic_write,
    check_free,
    device_name,
    git_commit,
    new_run_dir,
    now,
    resolve_device,
    training,
    versions,
    write_json,
)

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Options:
    """How to run (not what to train): nothing here changes the numbers except ``seed``."""

    dataset_dir: Path
    device: str = "auto"
    seed: int = 0
    workers: int = 4
    compile: bool = False
    gpu_decode: bool = True  # on a GPU, decode JPEGs there (nvJPEG); other formats are decoded by the workers
    show_progress: bool = True


def model_config(recipe: ImagenetRecipe, num_classes: int) -> InceptionConfig:
    return InceptionConfig(**recipe.model.model_dump(), num_classes=num_classes)


def learning_rate(recipe: ImagenetRecipe, examples_per_step: int, train_examples: int):
    """Stepwise exponential decay: lr * rate ** floor(epoch / (every_epochs / speedup)) (Sec. 4.2.1 change 4)."""
    t = recipe.train
    period = t.lr_decay.every_epochs / t.lr_decay.speedup

    def at(step: int) -> float:
        return t.lr * t.lr_decay.rate ** math.floor(step * examples_per_step / train_examples / period)

    return at


def sgd(model: nn.Module, recipe: ImagenetRecipe) -> torch.optim.Optimizer:
    """SGD with momentum; L2 on conv and classifier weights only (not biases, not BN's gamma and beta)."""
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]  # conv and linear
    others = [p for name, p in model.named_parameters() if not name.endswith("weight")]  # biases, gamma, beta
    t = recipe.train
    return torch.optim.SGD([{"params": weights, "weight_decay": t.weight_decay}, {"params": others, "weight_decay": 0}],
                           lr=t.lr, momentum=t.momentum)


class ImagenetTask:
    """What the shared trainer needs: each step's loss on this replica's slice of the mini-batch, and
    single-crop top-1/top-5 on the whole validation set at each evaluation."""

    def __init__(self, recipe: ImagenetRecipe, profile: Profile, train_split: images.Split, val_split: images.Split,
                 device: torch.device, replicas: Replicas, options: Options):
        self.recipe, self.profile, self.device, self.replicas, self.options = recipe, profile, device, replicas, options
        self.train_split, self.val_split = train_split, val_split
        torch.manual_seed(options.seed)  # the same initial weights on every replica
        self.model = Inception(model_config(recipe, len(train_split.classes))).to(device)
        for module in self.model.modules():
            if isinstance(module, BatchNorm):
                module.sync = recipe.train.bn_sync
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        network: nn.Module = self.model
        if replicas.distributed:  # BN buffers stay per replica; they are averaged before use (see below)
            network = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
        self.network = torch.compile(network) if options.compile else network
        torch.manual_seed(options.seed * 1_000 + replicas.rank + 1)  # each replica's own dropout stream
        scale = [255 * s for s in recipe.data.std]
        self.mean = torch.tensor([255 * m for m in recipe.data.mean], device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor(scale, device=device).view(1, 3, 1, 1)
        data = recipe.data
        self.train_transform = images.training_transform(
            profile.resolution, data.crop_min_area, data.crop_aspect, data.flip,
            data.photometric[recipe.train.distortions].model_dump())
        self.eval_transform = images.evaluation_transform(profile.resolution, data.eval_resize)
        self.jpegs_as_bytes = device.type == "cuda" and options.gpu_decode  # workers pass JPEGs on undecoded
        self.order = recipe.train.shuffle if train_split.sharded else "full"
        self.stream, self.next_step, self.last_good = None, -1, None
        self.rows: list[dict[str, Any]] = []
        self.metrics_file: Path | None = None  # rewritten at every evaluation when set
        self.skipped, self.val_skipped = 0, 0  # unreadable images: training (this replica), validation
        self.lr = learning_rate(recipe, profile.batch_size * replicas.world, len(train_split))

    # --- data ---

    def _loader(self, split: images.Split, transform, sampler) -> DataLoader:
        dataset = images.Examples(split, transform, self.options.seed, self.jpegs_as_bytes)
        workers = self.options.workers
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=images.collate,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                          generator=torch.Generator())  # the loader must not draw from the global RNG (resume)

    def _tensor(self, batch: images.Batch, transform) -> tuple[Tensor, Tensor]:
        """The batch's readable images (JPEGs the workers left encoded are decoded here, on the GPU) as a
        normalized float batch, and their labels; unreadable ones are counted in ``skipped``."""
        batch = images.on_device(batch, transform, self.options.seed, self.device)
        self.skipped += len(batch.skipped)
        if len(batch.labels) == 0:
            resolution = self.profile.resolution
            return torch.empty(0, 3, resolution, resolution, device=self.device), batch.labels
        pictures = batch.images if isinstance(batch.images, Tensor) else torch.stack(batch.images)
        x = pictures.float().sub_(self.mean).div_(self.scale)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, batch.labels.to(self.device, non_blocking=True)

    def losses(self, step: int) -> Tensor:
        if step != self.next_step:  # first step of this process: the stream starts where the run stands
            sampler = images.TrainingStream(self.train_split, self.order, self.options.seed, self.profile.batch_size,
                                            self.replicas.rank, self.replicas.world, step,
                                            self.recipe.train.shuffle_buffer_shards)
            self.stream = iter(self._loader(self.train_split, self.train_transform, sampler))
        batch = next(self.stream)
        self.next_step = step + 1
        x, y = self._tensor(batch, self.train_transform)
        weight = 1.0
        if len(y) == 0:  # every image of this replica's slice was unreadable: a zero-weight pass over the last
            if self.last_good is None:  # good slice keeps every replica's collectives in step (DDP, synced BN)
                raise UserError(f"every image of the first mini-batch is unreadable; check {self.train_split.where}")
            (x, y), weight = self.last_good, 0.0
        self.last_good = (x, y)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.network(x)
        return (F.cross_entropy(logits.float(), y) * weight).view(1)

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
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            return math.nan, math.nan  # "machine infinity": nothing meaningful to evaluate
        sampler = images.EvaluationBatches(len(self.val_split), self.profile.batch_size, self.replicas.rank,
                                           self.replicas.world)
        counts = torch.zeros(4, dtype=torch.float64, device=self.device)  # top-1 hits, top-5 hits, images, skipped
        skipped_before = self.skipped
        for batch in self._loader(self.val_split, self.eval_transform, sampler):
            x, y = self._tensor(batch, self.eval_transform)
            if len(y) == 0:
                continue
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                top5 = self.model(x).float().topk(min(5, self.model.cfg.num_classes), dim=1).indices
            hits = top5 == y[:, None]
            counts[:3] += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(y), device=self.device)])
        counts[3] = self.skipped - skipped_before
        self.skipped = skipped_before  # training skips only; the same validation files fail at every evaluation
        counts = self.replicas.sum_(counts)
        self.val_skipped = int(counts[3])
        return float(counts[0] / counts[2]), float(counts[1] / counts[2])

    def evaluate(self, step: int, train_loss: Tensor) -> dict[str, float]:
        self.average_bn_statistics()
        top1, top5 = self.accuracy()
        row = {"step": step, "epoch": step * self.profile.batch_size * self.replicas.world / len(self.train_split),
               "train_loss": float(train_loss[0]), "lr": self.lr(max(step - 1, 0)), "top1": top1, "top5": top5}
        self.rows.append(row)
        if self.metrics_file is not None and self.replicas.is_main:  # a long run shows its curve as it goes
            atomic_write(self.metrics_file, pd.DataFrame(self.rows).to_csv(index=False))
        return row

    def state_dict(self) -> dict[str, Any]:
        self.average_bn_statistics()
        return {"rows": self.rows, "skipped": self.replicas.gather(self.skipped)}  # each replica's own count

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.skipped = list(state["rows"]), int(state["skipped"][self.replicas.rank])


# --- runs ------------------------------------------------------------------------------------------------


def _data(recipe: ImagenetRecipe, dataset_dir: Path) -> tuple[images.Split, images.Split, list[str]]:
    """The two splits, and the deviations from the recipe that the data forces (recorded, never silent)."""
    train_split = images.open_split(dataset_dir, "train")
    val_split = images.open_split(dataset_dir, "val", train_split.classes)
    if val_split.classes != train_split.classes:
        raise UserError(f"train and val in {dataset_dir} have different class lists; pack them together")
    deviations = []
    if not train_split.sharded:
        deviations.append(f"train.shuffle={recipe.train.shuffle} needs shards; folder data is shuffled fully "
                          f"each epoch (pack it with `bnrepro pack` to get the recipe's shuffling)")
    return train_split, val_split, deviations


def _build(recipe: ImagenetRecipe, profile_name: str, options: Options, replicas: Replicas):
    if profile_name not in recipe.profiles:
        raise UserError(f"recipe '{recipe.label}' has no profile '{profile_name}'; it has {', '.join(recipe.profiles)}")
    profile = recipe.profiles[profile_name]
    device = resolve_device(options.device)
    if device.type == "cuda" and replicas.distributed:
        device = torch.device("cuda", replicas.local_rank)
        torch.cuda.set_device(device)
    train_split, val_split, deviations = _data(recipe, options.dataset_dir)
    if len(train_split) != profile.train_examples:
        deviations.append(f"profile '{profile_name}' budgets assume {profile.train_examples:,} training examples; "
                          f"the data has {len(train_split):,} (the learning-rate decay follows the data's epochs)")
    task = ImagenetTask(recipe, profile, train_split, val_split, device, replicas, options)
    return task, sgd(task.model, recipe), profile, deviations


def run(recipe_name: str, profile_name: str, overrides: list[str], options: Options, out: Path,
        replicas: Replicas) -> Path:
    """Train one recipe at one profile in a new run folder ``out/imagenet/<recipe>-<time>``; returns the folder."""
    recipe = recipe_io.load(recipe_name, overrides)
    if not isinstance(recipe, ImagenetRecipe):
        raise UserError(f"recipe '{recipe_name}' is a {recipe.experiment} recipe, not an ImageNet one")
    task, optimizer, profile, deviations = _build(recipe, profile_name, options, replicas)
    short = Path(recipe_name).stem
    run_dir = None
    if replicas.is_main:  # only now: every check that can fail has passed
        run_dir = new_run_dir(Path(out) / "imagenet", prefix=f"{short}-")
        atomic_write(run_dir / "recipe.yaml", recipe_io.to_yaml(recipe))
    run_dir = Path(replicas.gather(str(run_dir))[0])
    manifest = {
        "experiment": "imagenet", "status": "running", "started": now(),
        "recipe": short, "label": recipe.label, "recipe_digest": recipe.digest, "overrides": list(overrides),
        "profile": profile_name, "dataset": f"{task.train_split.where} ({len(task.train_split):,} train, "
                                            f"{len(task.val_split):,} val, {len(task.train_split.classes)} classes)",
        "dataset_dir": str(Path(options.dataset_dir).resolve()), "classes": task.train_split.classes,
        "train_examples": len(task.train_split), "sharded": task.train_split.sharded,
        "seed": options.seed,
        "replicas": replicas.world, "bn_statistics": "synchronised" if recipe.train.bn_sync else "per replica",
        "global_batch": profile.batch_size * replicas.world, "deviations": deviations,
        "compile": options.compile, "workers": options.workers, "gpu_decode": task.jpegs_as_bytes,
        "precision": _precision(task.device),
        "device": device_name(task.device), "versions": versions(), "git_commit": git_commit(),
    }
    return _train(run_dir, recipe, manifest, task, optimizer, profile, replicas, resume=False)


def resume(run_dir: Path, replicas: Replicas, dataset_dir: Path | None = None, **how: Any) -> Path:
    """Continue an interrupted run exactly where its checkpoint left it (same recipe, profile, data, seed)."""
    run_dir = Path(run_dir)
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        recipe = ImagenetRecipe.model_validate(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        raise UserError(f"{run_dir} is not an ImageNet run folder (no readable manifest.json/recipe.yaml)") from None
    if manifest.get("status") in ("complete", "diverged"):
        raise UserError(f"run {run_dir} is already {manifest['status']}; start a new one instead")
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"run {run_dir} has no {CHECKPOINT} to resume from; start a new one instead")
    check_free(run_dir)
    if replicas.world != manifest["replicas"]:
        raise UserError(f"run {run_dir} trained on {manifest['replicas']} process(es); resume it on as many "
                        f"(the global batch and the data stream depend on it), not {replicas.world}")
    options = Options(Path(dataset_dir or manifest["dataset_dir"]), seed=manifest["seed"], **how)
    task, optimizer, profile, _ = _build(recipe, manifest["profile"], options, replicas)
    split = task.train_split
    if (len(split), split.sharded, split.classes) != (manifest["train_examples"], manifest["sharded"],
                                                      manifest["classes"]):
        raise UserError(f"the data in {options.dataset_dir} is not the data run {run_dir} trained on "
                        f"({manifest['dataset']}); resume with the same --dataset-dir")
    manifest["resumed"] = [*manifest.get("resumed", []), {"at": now(), "device": device_name(task.device),
                                                          "precision": _precision(task.device)}]
    return _train(run_dir, recipe, manifest, task, optimizer, profile, replicas, resume=True)


def _train(run_dir: Path, recipe: ImagenetRecipe, manifest: dict[str, Any], task: ImagenetTask,
           optimizer: torch.optim.Optimizer, profile: Profile, replicas: Replicas, resume: bool) -> Path:
    schedule = Schedule(profile.steps, profile.eval_every, profile.checkpoint_every)
    main = replicas.is_main
    task.metrics_file = run_dir / "metrics.csv"
    with training(run_dir, manifest, main):
        log = train(task, optimizer, schedule, run_dir / CHECKPOINT, members=1, resume=resume,
                    show_progress=task.options.show_progress, learning_rate=task.lr, replicas=replicas,
                    rate=("images", profile.batch_size * replicas.world), describe=_describe)
    skipped = int(replicas.sum_(torch.tensor([task.skipped], device=replicas.flag_device)).item())
    skipped += task.val_skipped  # summed over replicas by the evaluation
    if not main:
        return run_dir
    metrics = pd.DataFrame(task.rows)
    summary = summarize(metrics, recipe, manifest, log.diverged_at[0], skipped)
    atomic_write(run_dir / "metrics.csv", metrics.to_csv(index=False))
    write_json(run_dir / "summary.json", summary)
    manifest.update(status="diverged" if summary["diverged_at"] else "complete", finished=now())
    write_json(run_dir / "manifest.json", manifest)
    return run_dir


def _precision(device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" else "fp32"


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
    }
