"""Fig. 4 (multi-crop and ensemble errors) and GoogLeNet's crop study, from the latest finished ``bnrepro ensemble``
run.

The errors are recombined from the run's cached class probabilities (``bnrepro.evaluate.ensemble``), not read from
its ``results.csv``, so the report shows what the cached probabilities say, whatever wrote that file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from bnrepro.evaluate import ensemble as evaluation
from bnrepro.evaluate.crops import distinct_views
from bnrepro.report.imagenet import data_text, deviations_list, markdown_table, short_commit
from bnrepro.runs import Damaged, atomic_write, check_writable, runs_of, skip

IMAGENET_CLASSES = 1000
IMAGENET_VAL_IMAGES = 50_000

# The paper's Fig. 4 table (shared/paper/README.md, section 4), errors in percent (None: not given). The paper's
# ensemble reaches 4.82% top-5 on the test set; the table gives validation errors only.
PAPER_FIG4: tuple[tuple[str, str, str, str, float | None, float | None], ...] = (
    # model, resolution, crops, models, top-1 error, top-5 error
    ("GoogLeNet ensemble", "224", "144", "7", None, 6.67),
    ("Deep Image low-res", "256", "—", "1", None, 7.96),
    ("Deep Image high-res", "512", "—", "1", 24.88, 7.42),
    ("Deep Image ensemble", "variable", "—", "—", None, 5.98),
    ("BN-Inception single crop", "224", "1", "1", 25.2, 7.82),
    ("BN-Inception multicrop", "224", "144", "1", 21.99, 5.82),
    ("BN-Inception ensemble", "224", "144", "6", 20.1, 4.9),
)
# GoogLeNet's crop study (same section): crops -> top-5 error in percent of 1 model and of its 7-model ensemble.
PAPER_GOOGLENET_CROPS: dict[int, tuple[float, float]] = {1: (10.07, 8.09), 10: (9.15, 7.62), 144: (7.89, 6.67)}


@dataclass
class EnsembleRun:
    """One finished ensemble run folder, its manifest read once."""

    path: Path
    rel: str  # the folder relative to the results folder, as the report names it
    manifest: dict

    @property
    def members(self) -> list[str]:
        return [m["name"] for m in self.manifest["members"]]

    @property
    def crops(self) -> list[int]:
        return sorted(int(c) for c in self.manifest["crops"])

    @property
    def profile(self) -> str | None:
        """The profile its members were trained at: the manifest's, else the run's resolved recipe.yaml's, else its
        first member's run manifest's (None where none says)."""
        if self.manifest.get("profile"):
            return str(self.manifest["profile"])
        try:
            found = (yaml.safe_load((self.path / "recipe.yaml").read_text()) or {}).get("profile")
            if found:
                return str(found)
        except (OSError, yaml.YAMLError, AttributeError):
            pass
        for member in self.manifest.get("members", [])[:1]:
            try:
                return json.loads((Path(member["run"]) / "manifest.json").read_text()).get("profile")
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return None

    def subset_note(self) -> str | None:
        """One sentence when the run evaluated only part of the validation set (its manifest has ``val_limit``)."""
        limit = self.manifest.get("val_limit")
        images = self.manifest.get("val_images")
        if not limit or (isinstance(images, int) and images < limit):  # a limit above the split's size takes it all
            return None
        counted = f"{images:,}" if isinstance(images, int) else "an unrecorded number of"
        return (f"This run evaluated a subset of the validation images: the first {counted} images of the split "
                f"(`val_limit` {limit:,}), not the whole validation set, so its errors carry that subset's sampling "
                f"error.")


def finished_runs(results: Path) -> list[EnsembleRun]:
    """Ensemble run folders whose manifest says complete, oldest first (by start time, then name); one whose
    manifest lacks its members or crops is left out with a line (``runs.skip``)."""
    found = []
    for folder, manifest in runs_of(results, "ensemble"):
        missing = [key for key in ("members", "crops") if not isinstance(manifest.get(key), list)]
        if missing:
            skip(Damaged(folder / "manifest.json", f"lacks {', '.join(missing)}"))
            continue
        found.append(EnsembleRun(folder, folder.relative_to(results).as_posix(), manifest))
    return found


def scores(run: EnsembleRun) -> tuple[pd.DataFrame, int, int]:
    """Top-1/top-5 error of each member and of all members at each crop scheme, from the cached probabilities;
    with the number of classes and of evaluated images, which say whether the paper's numbers compare."""
    cached = evaluation.load_cache(run.path)  # Damaged (a UserError) names a file that cannot be read
    table = evaluation.table(cached, run.members, run.crops)
    first = cached[(run.members[0], run.crops[0])]
    return table, int(first["probs"].shape[1]), len(first["labels"])


def _error(table: pd.DataFrame, members: list[str], crops: int) -> tuple[float, float]:
    row = table[(table.members == "+".join(members)) & (table.crops == crops)].iloc[0]
    return float(row.top1_error), float(row.top5_error)


def _percent(x: float | None) -> str:
    """A fraction as a percentage with 2 decimals."""
    return "—" if x is None else f"{100 * x:.2f}%"


def _paper_percent(x: float | None) -> str:
    """A paper figure (already in percent) as the paper prints it, without adding digits it did not give."""
    return "—" if x is None else f"{x:g}%"


def fig4_table(run: EnsembleRun, table: pd.DataFrame) -> pd.DataFrame:
    """Fig. 4: the paper's rows, then this run's single crop, multicrop and ensemble rows."""
    columns = ["Model", "Resolution", "Crops", "Models", "Top-1 error", "Top-5 error"]
    rows = [[model, res, crops, models, _paper_percent(top1), _paper_percent(top5)]
            for model, res, crops, models, top1, top5 in PAPER_FIG4]
    first, most = run.members[0], max(run.crops)
    resolution = str(run.manifest.get("resolution", "—"))
    ours = []
    if 1 in run.crops:
        ours.append((f"single crop ({first})", [first], 1))
    if most > 1:
        ours.append((f"multicrop ({first})", [first], most))
    if len(run.members) > 1:
        ours.append((f"ensemble ({run.manifest.get('recipe', run.rel)}: {', '.join(run.members)})", run.members, most))
    for what, members, crops in ours:
        top1, top5 = _error(table, members, crops)
        rows.append([f"this project: BN-Inception {what}", resolution, str(crops), str(len(members)),
                     _percent(top1), _percent(top5)])
    return pd.DataFrame(rows, columns=columns)


def crop_study(run: EnsembleRun, table: pd.DataFrame) -> pd.DataFrame:
    """Errors at each crop scheme of the first member alone and of all members, beside GoogLeNet's top-5."""
    n = len(run.members)
    rows = []
    for crops in sorted(set(run.crops) | set(PAPER_GOOGLENET_CROPS)):
        row = {"Crops": crops}
        groups = [("1 model", [run.members[0]])] + ([(f"{n} models", run.members)] if n > 1 else [])
        for name, members in groups:
            top1, top5 = _error(table, members, crops) if crops in run.crops else (None, None)
            row[f"{name} top-1"], row[f"{name} top-5"] = _percent(top1), _percent(top5)
        paper = PAPER_GOOGLENET_CROPS.get(crops, (None, None))
        row["GoogLeNet 1 model top-5"], row["GoogLeNet 7 models top-5"] = (_paper_percent(p) for p in paper)
        rows.append(row)
    return pd.DataFrame(rows)


def member_table(run: EnsembleRun, table: pd.DataFrame) -> pd.DataFrame:
    """Each member's and the ensemble's top-1 and top-5 error at 1, 10 and 144 crops (and any other scheme the run
    has; a dash where the run did not evaluate one), then GoogLeNet's top-5 for 1 model and 7 models."""
    schemes = sorted(set(run.crops) | set(PAPER_GOOGLENET_CROPS))
    groups = [(member, [member]) for member in run.members]
    if len(run.members) > 1:
        groups.append((f"ensemble ({len(run.members)} models)", run.members))
    rows = []
    for name, members in groups:
        row = {"Member": name}
        for crops in schemes:
            top1, top5 = _error(table, members, crops) if crops in run.crops else (None, None)
            row[f"{crops} crop top-1"], row[f"{crops} crop top-5"] = _percent(top1), _percent(top5)
        rows.append(row)
    for i, name in enumerate(("GoogLeNet, 1 model (top-5 only)", "GoogLeNet, 7 models (top-5 only)")):
        row = {"Member": name}
        for crops in schemes:
            paper = PAPER_GOOGLENET_CROPS.get(crops)
            row[f"{crops} crop top-1"], row[f"{crops} crop top-5"] = "—", _paper_percent(paper and paper[i])
        rows.append(row)
    return pd.DataFrame(rows)


def _folder(path: str, results: Path) -> str:
    """A member's run folder relative to the results folder where it lies under it, else its last two parts (the
    report names no folder of the machine it ran on)."""
    try:
        return Path(path).resolve().relative_to(Path(results).resolve()).as_posix()
    except (ValueError, OSError):
        return "…/" + "/".join(Path(path).parts[-2:])


# The 1-crop view before the ensemble cut it as each member's trainer did (evaluate/crops.py, ``float_view``),
# measured on the committed cpu-profile member results/imagenet/bn-x30-member1-20261201-222433 (Fashion-MNIST,
# 28 px images to 32 px crops): uint8 resize against the trainer's float resample.
UINT8_VIEW_MEASURED = ("a mean absolute difference of 0.20 grey levels (at most 1) per pixel; 4 of the first "
                       "1,000 validation images' predictions differ (top-1 76.4% against 76.2%), 11 of all 10,000 "
                       "(75.58% against 75.55%, the trainer's own final top-1)")


def view_notes(manifest: dict) -> list[str]:
    """What the views were: whether the single crop is each member's trainer's view (runs from before it was say
    that it is not, and by how much that mattered where measured), and how many of the views are distinct for
    the evaluated image size (a square image's 144 crops are 48 views, each three times)."""
    members = manifest.get("members", [])
    views = {m.get("single_crop_view") for m in members}
    if None in views:
        notes = ["The single crop of this run predates the ensemble cutting each member's trainer's own view: it "
                 "was resized in uint8 (torchvision), while members trained on resident data (idx files, or "
                 "same-size images held in memory) were evaluated by their trainer resampled in float, never "
                 f"rounded. On a committed member that made {UINT8_VIEW_MEASURED}. Its 10- and 144-crop views are "
                 "as they are now."]
    else:
        kinds = {"float": "resampled in float, as the trainer evaluates resident data",
                 "uint8": "resized in uint8 by torchvision, as the trainer evaluates image files"}
        notes = ["The single crop is each member's trainer's own evaluation view: " + "; ".join(
            f"{m['name']} {kinds.get(m['single_crop_view'], m['single_crop_view'])}" for m in members) + "."]
    size = manifest.get("image_size")
    if not size and "idx files" in str(manifest.get("dataset", "")):
        size = [28, 28]  # MNIST-format idx files hold 28 x 28 images
    resolution, crops = manifest.get("resolution"), sorted(int(c) for c in manifest.get("crops", []))
    if size and resolution:
        counted = [f"{distinct_views(*size, c, resolution)} of {c}" for c in crops]
        notes.append(f"Distinct views of the {size[0]} x {size[1]} validation images at {resolution} px: "
                     f"{', '.join(counted)}; the mean over a scheme's views counts each as often as it occurs (a "
                     f"square image's left, centre and right squares are one square).")
    else:
        notes.append("The validation images differ in size, so how many of the views are distinct depends on each "
                     "image (all of them but for square images, whose 144 crops are 48 views, each three times).")
    return notes


def comparability(classes: int, images: int) -> str | None:
    """One sentence when the numbers cannot be set beside the paper's (None when they can)."""
    if classes != IMAGENET_CLASSES:
        return (f"These runs use a {classes}-class dataset, not 1000-class ImageNet, so their numbers are not "
                f"comparable to the paper's.")
    if images != IMAGENET_VAL_IMAGES:
        return (f"These errors are over {images:,} validation images, not the paper's {IMAGENET_VAL_IMAGES:,}, so they "
                f"are only roughly comparable to the paper's.")
    return None


def markdown(run: EnsembleRun, results: Path, superseded: list[EnsembleRun]) -> str:
    """ensemble.md: provenance, the Fig. 4 table, the crop study and the per-member errors."""
    m = run.manifest
    table, classes, images = scores(run)
    members = "; ".join(f"{x['name']} (`{_folder(x['run'], results)}`, commit `{short_commit(x.get('git_commit'))}`)"
                        for x in m["members"])
    skipped = int(m.get("skipped_images") or 0)
    subset = run.subset_note()
    limit = f", a subset: `val_limit` {m['val_limit']:,}" if subset else ""
    data = data_text(m)  # the name, counts and digest of the data, no folder of the machine it ran on
    lines = ["# Ensemble and multi-crop (paper Sec. 4.2.3, Fig. 4)", "",
             f"Data: {data}, {m.get('val_images', images):,} validation images "
             f"({classes} classes{limit}" + (f", {skipped:,} unreadable and left out" if skipped else "") + "). "
             f"Profile {run.profile or 'not recorded'}. "
             f"Members: {members}. Ensemble run `{run.rel}`, commit `{short_commit(m.get('git_commit'))}`.",
             ""]
    note = comparability(classes, images)
    if note:
        lines += [f"**{note}**", ""]
    beside = [f"*{subset}*", ""] if subset else []  # said again beside each table
    lines += [deviations_list(m.get("deviations"), "this evaluation and its members"), ""]
    lines += [" ".join(view_notes(m)), ""]
    lines += ["Errors are recombined from the run's cached class probabilities: the mean over crops, then over "
              "models (the paper's arithmetic mean). The paper's rows are its Fig. 4 (shared/paper/README.md, "
              "section 4), validation errors as it prints them (ours have 2 decimals); its ensemble's 4.82% top-5 is "
              "on the test set.", "",
              "## Fig. 4", "", *beside, markdown_table(fig4_table(run, table)), "",
              "## Crop study", "",
              "Like GoogLeNet's (Szegedy et al. 2014, Sec. 7): the first member alone and all members, at each crop "
              "scheme; GoogLeNet's columns are its top-5 errors for 1 model and its 7-model ensemble "
              "(1/10/144 crops: 10.07/9.15/7.89% and 8.09/7.62/6.67%). Every member's are under Members.", "",
              *beside, markdown_table(crop_study(run, table)), "",
              "## Members", "",
              "Each member and the ensemble at 1, 10 and 144 crops (a dash: not evaluated in this run), beside "
              "GoogLeNet's top-5 errors, single model 10.07/9.15/7.89% and 7 models 8.09/7.62/6.67%.", "",
              *beside, markdown_table(member_table(run, table)), ""]
    if superseded:
        lines += ["Older finished ensemble runs, not shown: " + ", ".join(f"`{r.rel}`" for r in superseded), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def build(results: Path, out: Path) -> list[Path]:
    """Write ensemble.md for the latest finished ensemble run whose cached probabilities can be read (a damaged one
    is skipped with a line); [] when there is none."""
    runs = finished_runs(Path(results))
    if not runs:
        return []
    check_writable(out)
    while runs:
        run = runs.pop()
        try:
            text = markdown(run, Path(results), runs)
        except Damaged as damage:
            skip(damage)
            continue
        atomic_write(out / "ensemble.md", text)
        return [out / "ensemble.md"]
    return []


def top1_correct(run: EnsembleRun, members: list[str], crops: int) -> pd.Series:
    """Per image, whether the mean of ``members``' cached probabilities at ``crops`` ranks its label first (as
    ``evaluation.errors`` ranks them), indexed by the image's position in the validation split: a paired test of two
    error rates (claims.md's McNemar) needs the images, not the rates. Loads only the caches it needs."""

    cached = {(m, crops): evaluation.read_cache(evaluation.cache_path(run.path, m, crops)) for m in members}
    probs, labels = evaluation.combine(cached, members, crops)
    first = probs.topk(min(5, probs.shape[1]), dim=1).indices[:, 0]
    return pd.Series((first == labels).numpy(), index=cached[(members[0], crops)]["indices"].numpy())
