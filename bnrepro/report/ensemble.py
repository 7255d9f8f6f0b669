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
from bnrepro.paper import PAPER
from bnrepro.report import selection  # not by name: finished_runs, select and other_data_line are ours too
from bnrepro.report.text import data_caveat, data_text, deviations_list, markdown_table, short_commit
from bnrepro.runs import Damaged, atomic_write, check_writable, runs_of, skip

TITLE = "# Ensemble and multi-crop (paper Sec. 4.2.3, Fig. 4)"
# The paper's Fig. 4, its ensemble's test error, GoogLeNet's crop study and ImageNet's counts are data:
# bnrepro/paper.yaml (``PAPER.ensemble``, ``PAPER.imagenet``).


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
        """The profile its members were trained at: the manifest's ``profile``, else (``bnrepro ensemble`` has not
        written it so far) the run's resolved recipe.yaml's, else its first member's run manifest's; None where none
        says."""
        found = self.manifest.get("profile") or _recipe_profile(self.path) or _member_profile(self.manifest)
        return str(found) if found else None

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


def _recipe_profile(folder: Path) -> str | None:
    """``profile`` of an ensemble run's resolved recipe.yaml; None where it is missing, unreadable or says none."""
    try:
        resolved = yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return resolved.get("profile") if isinstance(resolved, dict) else None


def _member_profile(manifest: dict) -> str | None:
    """``profile`` of the first member's run manifest, where the ensemble's manifest names its folder and that
    folder is still there (it is a path of the machine the ensemble ran on); None otherwise."""
    members = manifest.get("members")
    first = members[0] if isinstance(members, list) and members else None
    if not isinstance(first, dict) or not isinstance(first.get("run"), str):
        return None
    try:
        recorded = json.loads((Path(first["run"]) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None
    return recorded.get("profile") if isinstance(recorded, dict) else None


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


def select(results: Path) -> tuple[list[EnsembleRun], list[EnsembleRun]]:
    """The finished ensemble runs on the data imagenet.md shows at their profile (``selection.data_choices``; one at a
    profile it does not know is kept), and those on other data; both oldest first. ensemble.md and claims.md's claim 7
    both choose from the first."""
    return selection.split_by_data(finished_runs(Path(results)), selection.data_choices(Path(results)))


def other_data_line(other: list[EnsembleRun], results: Path) -> str:
    """The line naming the ensemble runs left out for their data (``selection.other_data_line``)."""
    profiles = {run.profile for run in other}
    choice = selection.data_choices(Path(results)).get(str(profiles.pop())) if len(profiles) == 1 else None
    return selection.other_data_line(other, choice, lambda run: f"`{run.rel}` (profile {run.profile})")


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


def _count(x: int | None) -> str:
    """A count of the paper's table (crops, models), a dash where it gives none."""
    return "—" if x is None else str(x)


def googlenet(crops: int) -> tuple[float | None, float | None]:
    """GoogLeNet's top-5 error in percent at ``crops``, one model and its ensemble; (None, None) where not given."""
    found = PAPER.ensemble.googlenet_crops.get(crops)
    return (found.one_model, found.ensemble) if found else (None, None)


def _googlenet_schemes(run: EnsembleRun) -> list[int]:
    """The run's crop schemes and GoogLeNet's, in order."""
    return sorted(set(run.crops) | set(PAPER.ensemble.googlenet_crops))


def googlenet_text(ensemble: bool) -> str:
    """GoogLeNet's top-5 errors over its crop schemes as the text gives them (10.07/9.15/7.89%): one model's, or
    its ensemble's."""
    study = PAPER.ensemble.googlenet_crops.values()
    return "/".join(f"{c.ensemble if ensemble else c.one_model:g}" for c in study) + "%"


def fig4_table(run: EnsembleRun, table: pd.DataFrame) -> pd.DataFrame:
    """Fig. 4: the paper's rows, then this run's single crop, multicrop and ensemble rows."""
    columns = ["Model", "Resolution", "Crops", "Models", "Top-1 error", "Top-5 error"]
    rows = [[r.model, str(r.resolution), _count(r.crops), _count(r.models), _paper_percent(r.top1_error),
             _paper_percent(r.top5_error)] for r in PAPER.ensemble.fig4]
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
    for crops in _googlenet_schemes(run):
        row = {"Crops": crops}
        groups = [("1 model", [run.members[0]])] + ([(f"{n} models", run.members)] if n > 1 else [])
        for name, members in groups:
            top1, top5 = _error(table, members, crops) if crops in run.crops else (None, None)
            row[f"{name} top-1"], row[f"{name} top-5"] = _percent(top1), _percent(top5)
        many = f"GoogLeNet {PAPER.ensemble.googlenet_models} models top-5"
        row["GoogLeNet 1 model top-5"], row[many] = (_paper_percent(p) for p in googlenet(crops))
        rows.append(row)
    return pd.DataFrame(rows)


def member_table(run: EnsembleRun, table: pd.DataFrame) -> pd.DataFrame:
    """Each member's and the ensemble's top-1 and top-5 error at 1, 10 and 144 crops (and any other scheme the run
    has; a dash where the run did not evaluate one), then GoogLeNet's top-5 for 1 model and its ensemble."""
    schemes = _googlenet_schemes(run)
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
    names = ("GoogLeNet, 1 model (top-5 only)", f"GoogLeNet, {PAPER.ensemble.googlenet_models} models (top-5 only)")
    for i, name in enumerate(names):
        row = {"Member": name}
        for crops in schemes:
            row[f"{crops} crop top-1"], row[f"{crops} crop top-5"] = "—", _paper_percent(googlenet(crops)[i])
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
    if classes != PAPER.imagenet.classes:
        return (f"These runs use a {classes}-class dataset, not {PAPER.imagenet.classes}-class ImageNet, so their "
                f"numbers are not comparable to the paper's.")
    if images != PAPER.imagenet.val_images:
        return (f"These errors are over {images:,} validation images, not the paper's {PAPER.imagenet.val_images:,}, "
                f"so they "
                f"are only roughly comparable to the paper's.")
    return None


def markdown(run: EnsembleRun, results: Path, superseded: list[EnsembleRun], other: list[EnsembleRun] = ()) -> str:
    """ensemble.md: provenance, the Fig. 4 table, the crop study and the per-member errors; the older runs
    (``superseded``) and those on other data (``other``) named."""
    m = run.manifest
    table, classes, images = scores(run)
    members = "; ".join(f"{x['name']} (`{_folder(x['run'], results)}`, commit `{short_commit(x.get('git_commit'))}`)"
                        for x in m["members"])
    skipped = int(m.get("skipped_images") or 0)
    subset = run.subset_note()
    limit = f", a subset: `val_limit` {m['val_limit']:,}" if subset else ""
    data = data_text(m)  # the name, counts and digest of the data, no folder of the machine it ran on
    lines = [TITLE, "",
             f"Data: {data}, {m.get('val_images', images):,} validation images "
             f"({classes} classes{limit}" + (f", {skipped:,} unreadable and left out" if skipped else "") + "). "
             f"Profile {run.profile or 'not recorded'}. "
             f"Members: {members}. Ensemble run `{run.rel}`, commit `{short_commit(m.get('git_commit'))}`.",
             ""]
    for note in (comparability(classes, images), data_caveat(m)):
        if note:
            lines += [f"**{note}**", ""]
    beside = [f"*{subset}*", ""] if subset else []  # said again beside each table
    lines += [deviations_list(m.get("deviations"), "this evaluation and its members"), ""]
    lines += [" ".join(view_notes(m)), ""]
    one, many, n = googlenet_text(ensemble=False), googlenet_text(ensemble=True), PAPER.ensemble.googlenet_models
    schemes = "/".join(map(str, PAPER.ensemble.googlenet_crops))
    lines += ["Errors are recombined from the run's cached class probabilities: the mean over crops, then over "
              "models (the paper's arithmetic mean). The paper's rows are its Fig. 4 (shared/paper/README.md, "
              "section 4), validation errors as it prints them (ours have 2 decimals); its ensemble's "
              f"{_paper_percent(PAPER.ensemble.test_top5_error)} top-5 is on the test set.", "",
              "## Fig. 4", "", *beside, markdown_table(fig4_table(run, table)), "",
              "## Crop study", "",
              "Like GoogLeNet's (Szegedy et al. 2014, Sec. 7): the first member alone and all members, at each crop "
              f"scheme; GoogLeNet's columns are its top-5 errors for 1 model and its {n}-model ensemble "
              f"({schemes} crops: {one} and {many}). Every member's are under Members.", "",
              *beside, markdown_table(crop_study(run, table)), "",
              "## Members", "",
              "Each member and the ensemble at 1, 10 and 144 crops (a dash: not evaluated in this run), beside "
              f"GoogLeNet's top-5 errors, single model {one} and {n} models {many}.", "",
              *beside, markdown_table(member_table(run, table)), ""]
    if superseded:
        lines += ["Older finished ensemble runs, not shown: " + ", ".join(f"`{r.rel}`" for r in superseded), ""]
    if other:
        lines += [other_data_line(list(other), results), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def build(results: Path, out: Path) -> list[Path]:
    """Write ensemble.md for the latest finished ensemble run on its profile's chosen data (``select``) whose cached
    probabilities can be read (a damaged one is skipped with a line); where every run is on other data, a page that
    names them, so no earlier ensemble.md stands for them; [] when there is no run at all."""
    runs, other = select(Path(results))
    if not runs and not other:
        return []
    check_writable(out)
    while runs:
        run = runs.pop()
        try:
            text = markdown(run, Path(results), runs, other)
        except Damaged as damage:
            skip(damage)
            continue
        atomic_write(out / "ensemble.md", text)
        return [out / "ensemble.md"]
    if not other:
        return []
    atomic_write(out / "ensemble.md", f"{TITLE}\n\nNo finished ensemble run on the data the report shows at its "
                                      f"profile (imagenet.md).\n\n{other_data_line(other, Path(results))}\n")
    return [out / "ensemble.md"]


def top1_correct(run: EnsembleRun, members: list[str], crops: int) -> pd.Series:
    """Per image, whether the mean of ``members``' cached probabilities at ``crops`` ranks its label first (as
    ``evaluation.errors`` ranks them), indexed by the image's position in the validation split: a paired test of two
    error rates (claims.md's McNemar) needs the images, not the rates. Loads only the caches it needs."""

    cached = {(m, crops): evaluation.read_cache(evaluation.cache_path(run.path, m, crops)) for m in members}
    probs, labels = evaluation.combine(cached, members, crops)
    first = probs.topk(min(5, probs.shape[1]), dim=1).indices[:, 0]
    return pd.Series((first == labels).numpy(), index=cached[(members[0], crops)]["indices"].numpy())
