"""Multi-crop and ensemble evaluation (Sec. 4.2.3, Fig. 4): members single-crop, 10-crop and 144-crop, and the
ensemble as the arithmetic mean of the members' class probabilities.

Each member is a finished ``bnrepro imagenet`` run (its resolved recipe, manifest and final checkpoint),
evaluated as the Alg. 2 inference network (BN folded into the convolutions, population statistics). For
every member and crop scheme the crop-averaged softmax probabilities of every validation image are
cached in the ensemble's run folder, so any subset of members and schemes can be recombined later
(``bnrepro report``) without running a network again.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from bnrepro import recipes as recipe_io
from bnrepro.data import sources
from bnrepro.data.order import EvaluationBatches
from bnrepro.data.pipeline import Pipeline
from bnrepro.data.split import Split
from bnrepro.data.transforms import Transforms, transforms_for
from bnrepro.engine import checkpoint
from bnrepro.engine.precision import autocast
from bnrepro.errors import UserError
from bnrepro.evaluate.crops import distinct_crops_of, distinct_views
from bnrepro.models.batchnorm import BatchNorm
from bnrepro.models.inception import Inception, InceptionConfig, fold
from bnrepro.paper import PAPER
from bnrepro.recipes import EnsembleRecipe, ImagenetRecipe
from bnrepro.runs import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    Damaged,
    announce,
    atomic_write,
    manifest_start,
    new_run_dir,
    now,
    read_json,
    resolve_device,
    runs_of,
    write_json,
)

PROBABILITIES = "probabilities"


@dataclass
class Member:
    name: str  # the recipe's short name, e.g. bn-x30-member1
    run: Path
    recipe: ImagenetRecipe
    manifest: dict[str, Any]
    model: Inception  # the inference network, on its device

    @property
    def resolution(self) -> int:
        return self.recipe.profiles[self.manifest["profile"]].resolution

    @property
    def transforms(self) -> Transforms:
        """The member's own evaluation view and normalization, as its trainer had them."""
        return transforms_for(self.recipe, self.recipe.profiles[self.manifest["profile"]])


def latest_run(results: Path, recipe_name: str, profile: str) -> Path:
    """The newest finished (complete) run of ``recipe_name`` at ``profile`` under ``results/imagenet``."""
    short = Path(recipe_name).stem
    found = [folder for folder, manifest in runs_of(results, "imagenet")
             if manifest.get("recipe") == short and manifest.get("profile") == profile]
    if not found:
        raise UserError(f"no finished run of '{short}' at profile '{profile}' under {Path(results, 'imagenet')}; "
                        f"train it with `bnrepro imagenet --recipe {short} --profile {profile}` or pass --member")
    return found[-1]


def load_member(run: Path, device: torch.device) -> Member:
    """A run folder -> its inference network; anything missing or mismatched is one clear error."""
    run = Path(run)
    try:
        manifest = json.loads((run / "manifest.json").read_text())
        recipe = ImagenetRecipe.model_validate(yaml.safe_load((run / "recipe.yaml").read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        raise UserError(f"{run} is not a `bnrepro imagenet` run folder (no readable manifest.json, recipe.yaml)") \
            from None
    if manifest.get("status") != COMPLETE or "classes" not in manifest:
        raise UserError(f"run {run} is not a finished training run (status {manifest.get('status')}); finish it first")
    state = checkpoint.load(run / checkpoint.NAME, f"ensemble member {manifest.get('recipe', run.name)} cannot be "
                            f"evaluated; train it again, or pass another run of it with --member")
    profile = recipe.profiles[manifest["profile"]]
    model = Inception(InceptionConfig(recipe.model, profile.width, len(manifest["classes"])))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"checkpoint {run / checkpoint.NAME} does not fit its recipe's network ({first})") from None
    if any(isinstance(m, BatchNorm) and int(m.pop_batches) == 0 for m in model.modules()):
        raise UserError(f"checkpoint {run / checkpoint.NAME} holds no Alg. 2 population statistics for BN (a run "
                        f"stores them when it finishes); train the member again")
    network = fold(model) if recipe.model.batch_norm else model.eval()
    network = network.to(device, memory_format=torch.channels_last)  # faster on CPUs and GPUs alike
    return Member(manifest["recipe"], run, recipe, manifest, network)


@torch.no_grad()
def probabilities(member: Member, split: Split, crops: int, device: torch.device, batch_crops: int,
                  workers: int, progress: Progress | None = None, float_view: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, int]:
    """Crop-averaged softmax probabilities (N, classes) of every readable validation image, their labels and
    indices in the split, and how many images were unreadable. ``float_view``: the single crop as the trainer
    cut it from resident data (see ``single_crop_view``).

    The network sees each distinct view once (a square image's 144 crops are 48 views, ``crops.distinct_crops_of``);
    its probabilities are gathered back to all ``crops`` views and averaged, so a view that occurs three times
    counts three times, as in GoogLeNet's average over the 144."""
    transforms = member.transforms
    per_batch = max(1, batch_crops // crops)  # images per batch: at most batch_crops views, repeated or not
    pipeline = Pipeline(split, transforms, device, seed=0, workers=workers)  # JPEGs decoded on a GPU (nvJPEG)
    task = progress.add_task(f"{member.name}, {crops} crop{'s' * (crops > 1)}", total=len(split)) if progress else None
    found, labels, indices = [], [], []
    for batch in pipeline.images(EvaluationBatches(len(split), per_batch, 0, 1)):
        if len(batch.labels):
            views, index = batch_views(batch.images, crops, member.resolution, transforms.eval_resize, float_view)
            with autocast(device):
                logits = torch.cat([member.model(chunk) for chunk in transforms.normalize(views).split(batch_crops)])
            every_view = logits.float().softmax(1)[index]  # (images x crops, classes), repeated views gathered
            found.append(every_view.view(len(batch.labels), crops, -1).mean(1).cpu())
            labels.append(batch.labels)
            indices.append(torch.tensor(batch.positions))
        if progress:
            progress.advance(task, len(batch.labels) + len(batch.skipped))
    if not found:
        raise UserError(f"none of the {len(split)} validation images in {split.where} could be read")
    return torch.cat(found), torch.cat(labels), torch.cat(indices), pipeline.skipped


def batch_views(images: Iterable[Tensor], crops: int, size: int, resize: float, float_view: bool = False
                ) -> tuple[Tensor, Tensor]:
    """The distinct views of a batch of images, image after image (``crops.distinct_crops_of``; 1 crop = the
    trainer's view), and the index (images x crops,) of every image's every view among them, image after image:
    the network runs on the distinct views alone, and its outputs gathered by the index are its outputs on all."""
    views, index, start = [], [], 0
    for image in images:
        distinct, where = distinct_crops_of(image, crops, size, resize, float_view)
        views.append(distinct)
        index.append(where + start)
        start += len(distinct)
    return torch.cat(views), torch.cat(index)


def errors(probs: Tensor, labels: Tensor) -> tuple[float, float]:
    """Top-1 and top-5 error of class probabilities."""
    top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    return 1 - hits[:, 0].double().mean().item(), 1 - hits.any(1).double().mean().item()


def combine(cached: dict[tuple[str, int], dict[str, Tensor]], members: list[str], crops: int) -> tuple[Tensor, Tensor]:
    """The ensemble of ``members`` at ``crops``: the arithmetic mean of their class probabilities."""
    parts = [cached[(name, crops)] for name in members]
    for part in parts[1:]:
        if not torch.equal(part["indices"], parts[0]["indices"]):
            raise UserError("cached probabilities cover different validation images; evaluate the members together")
    return torch.stack([p["probs"].float() for p in parts]).mean(0), parts[0]["labels"]


def cache_path(run_dir: Path, member: str, crops: int) -> Path:
    return Path(run_dir) / PROBABILITIES / f"{member}-{crops}crop.pt"


def load_cache(run_dir: Path) -> dict[tuple[str, int], dict[str, Tensor]]:
    """Every cached (member, crops) -> {probs, labels, indices} of an ensemble run folder; a file that cannot be
    read raises ``Damaged``, naming it."""
    manifest = read_json(Path(run_dir) / "manifest.json", keys=("members", "crops"))
    return {(m["name"], crops): read_cache(cache_path(run_dir, m["name"], crops))
            for m in manifest["members"] for crops in manifest["crops"]}


def read_cache(path: Path) -> dict[str, Tensor]:
    """One member's cached probabilities at one crop scheme; ``Damaged`` if it cannot be read as such."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise Damaged(path, "is missing") from None
    except Exception as err:  # torch.load raises anything from a damaged file
        raise Damaged(path, f"cannot be read ({err.__class__.__name__})") from None
    if not isinstance(found, dict) or not {"probs", "labels", "indices"} <= found.keys():
        raise Damaged(path, "holds no cached probabilities")
    return found


def table(cached: dict[tuple[str, int], dict[str, Tensor]], members: list[str], schemes: list[int]) -> pd.DataFrame:
    """Errors of each member and of the whole ensemble at each crop scheme."""
    rows = []
    for crops in schemes:
        for group in [[name] for name in members] + ([members] if len(members) > 1 else []):
            top1, top5 = errors(*combine(cached, group, crops))
            rows.append({"members": "+".join(group), "models": len(group), "crops": crops,
                         "top1_error": top1, "top5_error": top5})
    return pd.DataFrame(rows)


def single_crop_view(member: Member, split: Split) -> str:
    """How the member's trainer cut its single-crop view of ``split``, so the ensemble's 1 crop is that same view:
    ``float`` where the run held its data resident (its manifest's ``resident``) and these validation images are
    resident too (the trainer resampled them in float, ``augment.evaluation_view``), else ``uint8`` (decoded files
    through torchvision's uint8 resize, ``transforms.evaluation_transform``, which rounds to whole grey levels)."""
    return "float" if member.manifest.get("resident") and split.pixels is not None else "uint8"


def validation(members: list[Member], dataset_dir: Path, val_limit: int | None
               ) -> tuple[Split, dict[str, Any] | None]:
    """The validation split the members are evaluated on (resident where any member's run held its data so, as
    its trainer did), cut to ``val_limit``, and the data set's identity (``sources.data_identity``; ``None`` for a
    folder holding validation data alone)."""
    classes = members[0].manifest["classes"]
    resident = any(m.manifest.get("resident") for m in members)
    split = sources.open_split(dataset_dir, "val", classes, resident=resident)
    if split.classes != classes:
        raise UserError(f"the validation classes in {dataset_dir} are not the ones the members were trained on")
    try:
        identity = sources.data_identity(dataset_dir, val=split)
    except UserError:  # no training split beside it: the identity has nothing to name
        identity = None
    return (split.first(val_limit) if val_limit else split), identity


def views_of(split: Split, crops: list[int], resolution: int, resize: float) -> dict[str, Any]:
    """The evaluated image size and, for each crop scheme, how many of its views are distinct (``None`` where the
    images differ in size: then it depends on each image's shape)."""
    if split.pixels is None:
        return {"image_size": None, "distinct_views": {str(c): None for c in crops}}
    height, width = (int(x) for x in split.pixels.shape[-2:])
    return {"image_size": [height, width],
            "distinct_views": {str(c): distinct_views(height, width, c, resolution, resize) for c in crops}}


def run(recipe_name: str, overrides: list[str], results: Path, dataset_dir: Path, out: Path, device_name_: str,
        workers: int, member_runs: list[Path] | None = None, show_progress: bool = True) -> Path:
    """Evaluate every member at every crop scheme, cache the probabilities, and write the error table."""
    recipe = recipe_io.load(recipe_name, overrides)
    if not isinstance(recipe, EnsembleRecipe):
        raise UserError(f"recipe '{recipe_name}' is a {recipe.experiment} recipe, not an ensemble one")
    device = resolve_device(device_name_)
    runs = member_runs or [latest_run(results, name, recipe.profile) for name in recipe.members]
    members = [load_member(run, device) for run in runs]
    if len({m.name for m in members}) != len(members):
        raise UserError("two members come from the same recipe; an ensemble needs distinct members")
    first = members[0]
    for member in members[1:]:
        if member.manifest["classes"] != first.manifest["classes"] or member.resolution != first.resolution:
            raise UserError(f"members {first.name} and {member.name} differ in classes or resolution; they cannot "
                            f"be averaged")
    split, identity = validation(members, dataset_dir, recipe.val_limit)
    run_dir = new_run_dir(Path(out) / "ensemble", prefix=f"{Path(recipe_name).stem}-")
    (run_dir / PROBABILITIES).mkdir()
    atomic_write(run_dir / "recipe.yaml", recipe_io.to_yaml(recipe))
    manifest = manifest_start("ensemble", device, {
        "recipe": Path(recipe_name).stem,
        "label": recipe.label, "recipe_digest": recipe.digest, "recipe_training_digest": recipe.training_digest(),
        "overrides": list(overrides),
        "members": [{"name": m.name, "label": m.recipe.label, "run": str(m.run), "recipe_digest": m.recipe.digest,
                     "git_commit": m.manifest.get("git_commit"), "replicas": m.manifest.get("replicas", 1),
                     "global_batch": m.manifest.get("global_batch"), "deviations": m.manifest.get("deviations", []),
                     "single_crop_view": single_crop_view(m, split)}
                    for m in members],
        "profile": recipe.profile, "crops": list(recipe.crops), "resolution": first.resolution, "dataset": split.where,
        "dataset_dir": str(Path(dataset_dir).resolve()), "data_identity": identity,
        "val_images": len(split), "val_limit": recipe.val_limit,
        **views_of(split, list(recipe.crops), first.resolution, first.recipe.data.eval_resize),
        "inference": "BN folded into the convolutions, with Alg. 2's population statistics from each member's run",
        "deviations": deviations(members, split, recipe.val_limit),
    })
    write_json(run_dir / "manifest.json", manifest)
    announce(recipe.label, manifest["deviations"])
    try:
        evaluate_all(run_dir, manifest, recipe, members, split, device, workers, show_progress)
    except BaseException as err:
        mark_failed(run_dir, manifest, err)
        raise
    return run_dir


def mark_failed(run_dir: Path, manifest: dict[str, Any], err: BaseException) -> None:
    """Say in the manifest that this evaluation ended without its results ("failed", or "interrupted" by Ctrl-C),
    and why, rather than leave it "running" forever; an evaluation is never resumed, so it stays a record. Best
    effort: the disk that stopped the evaluation may not take the manifest either."""
    status = INTERRUPTED if isinstance(err, KeyboardInterrupt) else FAILED
    reason = (str(err).strip().splitlines() or [""])[0] or err.__class__.__name__
    manifest.update(status=status, finished=now(), error=f"{err.__class__.__name__}: {reason}")
    with contextlib.suppress(OSError):
        write_json(run_dir / "manifest.json", manifest)


def evaluate_all(run_dir: Path, manifest: dict[str, Any], recipe: EnsembleRecipe, members: list[Member],
                 split: Split, device: torch.device, workers: int, show_progress: bool) -> None:
    """Every member at every crop scheme into the cache, then the error table and the finished manifest."""
    started, skipped, cached = time.perf_counter(), 0, {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not show_progress) as progress:
        for member in members:
            float_view = single_crop_view(member, split) == "float"
            for crops in recipe.crops:
                probs, labels, indices, skipped = probabilities(member, split, crops, device, recipe.batch_crops,
                                                                workers, progress, float_view)  # the same files
                cached[(member.name, crops)] = {"probs": probs.half(), "labels": labels, "indices": indices}
                # as stored, so the report's recombination gives these same numbers
                checkpoint.save(cache_path(run_dir, member.name, crops), cached[(member.name, crops)])
    results_table = table(cached, [m.name for m in members], list(recipe.crops))
    atomic_write(run_dir / "results.csv", results_table.to_csv(index=False))
    if skipped:
        manifest["deviations"].append(f"{skipped:,} unreadable validation images skipped")
    manifest.update(status=COMPLETE, finished=now(), skipped_images=skipped,
                    wall_seconds=round(time.perf_counter() - started, 2))
    write_json(run_dir / "manifest.json", manifest)
    announce(f"{recipe.label}, finished", manifest["deviations"])


def deviations(members: list[Member], split: Split, val_limit: int | None) -> list[str]:
    """How this evaluation differs from the paper's Fig. 4: its own, then each member's training deviations."""
    found = []
    paper = PAPER.ensemble.fig4_row("BN-Inception ensemble")  # Fig. 4's row of this evaluation
    if len(members) != paper.models:
        found.append(f"{len(members)} member(s), not the paper's {paper.models}")
    if {m.resolution for m in members} != {paper.resolution}:
        found.append(f"crops at {', '.join(sorted({f'{m.resolution} px' for m in members}))}, not "
                     f"{paper.resolution} px (the 144-crop scales 256-352 are scaled with them)")
    if len(split) != PAPER.imagenet.val_images:
        found.append(f"{len(split):,} validation images, not ImageNet's {PAPER.imagenet.val_images:,}"
                     + (" (the first of the split, ensemble's val_limit)" if val_limit else ""))
    for m in members:
        found += [f"{m.name}: {text}" for text in m.manifest.get("deviations", [])]
    return found
