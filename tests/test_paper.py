"""bnrepro/paper.yaml, the paper's numbers and the campaign's lists: every ImageNet recipe file is in it and every
recipe it names is a file, the campaign uses each recipe, and its numbers are those of shared/paper/README.md (the
paper's facts; skipped where ../shared is absent). Reads files only: no training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from bnrepro import paper, recipes
from bnrepro.experiments import reproduce
from bnrepro.paper import PAPER

README = Path(__file__).resolve().parents[2] / "shared" / "paper" / "README.md"
needs_readme = pytest.mark.skipif(not README.is_file(), reason="no ../shared/paper/README.md beside the checkout")


def recipe_files(folder: str) -> set[str]:
    """The recipes of ``recipes/<folder>``, by the name ``recipes.load`` takes."""
    return {f"{folder}/{path.stem}" for path in (recipes.RECIPES_DIR / folder).glob("*.yaml")}


def test_every_imagenet_recipe_has_its_row_and_every_row_its_recipe():
    assert {f"imagenet/{name}" for name in PAPER.recipes} == recipe_files("imagenet")


def test_the_campaign_trains_every_imagenet_recipe_and_only_those():
    """The runs paper.yaml plans (variants resolved) are the top-level recipes; the ensemble recipe's members, which
    the campaign trains after them, are recipes/imagenet/ensemble, each once."""
    planned = {run.recipe for run in PAPER.planned()}
    assert planned == recipe_files("imagenet")
    ensemble = recipes.load(PAPER.campaign.ensemble)
    assert isinstance(ensemble, recipes.EnsembleRecipe)
    assert sorted(ensemble.members) == sorted(recipe_files("imagenet/ensemble"))
    assert [run.recipe for run in reproduce.campaign()] == [*(r.recipe for r in PAPER.planned()), *ensemble.members]


def test_every_variant_is_a_recipe_with_overrides_that_load():
    for variant in PAPER.variants.values():
        assert variant.stem in PAPER.recipes
        recipes.load(variant.recipe, list(variant.overrides))  # a typo in a dotted key is refused here


@pytest.mark.parametrize("change, words", [
    (lambda d: d["imagenet"].update(clases=1000), "clases"),  # a typo is refused, not ignored
    (lambda d: d["campaign"]["runs"].append({"variant": "no-such", "why": "test"}), "no-such"),
    (lambda d: d["campaign"]["runs"].append({"recipe": "imagenet/bn-x5", "variant": "shards-only", "why": "t"}),
     "not both"),
    (lambda d: d["recipes"]["bn-x30"].update(colour="black"), "colour twice"),
])
def test_a_wrong_data_file_is_refused_with_what_is_wrong(tmp_path, change, words):
    data = yaml.safe_load(paper.PAPER_YAML.read_text())
    change(data)
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValidationError, match=words):
        paper.load(tmp_path / "paper.yaml")


def readme_table(after: str) -> list[list[str]]:
    """The body rows of the first Markdown table after the line starting with ``after``, as cells."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    rows, seen = [], False
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if seen:
                break
            continue
        seen = True
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]  # past the header and the separator


def number(cell: str) -> float | None:
    """A cell's first number (24.88% -> 24.88, 31.0e6 -> 3.1e7), None for a dash."""
    found = re.match(r"[\d.]+(?:e\d+)?", cell)
    return float(found.group(0)) if found else None


@needs_readme
def test_fig3_and_the_target_are_the_readmes():
    rows = readme_table("Fig. 3 table")
    assert {row[0].lower(): (number(row[1]), number(row[2]) / 100) for row in rows} == \
        {name: (r.fig3.steps, r.fig3.max_top1) for name, r in PAPER.recipes.items() if r.fig3}
    assert "| Model | Steps to 72.2% | Max accuracy |" in README.read_text()
    assert PAPER.imagenet.target == 0.722 and PAPER.fig3("inception").max_top1 == PAPER.imagenet.target


@needs_readme
def test_fig4_and_googlenets_crop_study_are_the_readmes():
    rows = readme_table("Fig. 4 table")
    ours = [[r.model, str(r.resolution), r.crops, r.models, r.top1_error, r.top5_error] for r in PAPER.ensemble.fig4]
    assert [[row[0], row[1], number(row[2]), number(row[3]), number(row[4]), number(row[5])] for row in rows] == \
        [[model, res, crops and float(crops), models and float(models), top1, top5]
         for model, res, crops, models, top1, top5 in ours]
    assert f"({PAPER.ensemble.test_top5_error}% on test)" in rows[-1][5]
    text = " ".join(README.read_text().split())
    crops = r"1/10/144 crops ([\d./]+)%"
    one, n, many = re.search(rf"1 model {crops}; (\d+) models {crops}", text).groups()
    study = PAPER.ensemble.googlenet_crops
    assert list(study) == [1, 10, 144] and int(n) == PAPER.ensemble.googlenet_models
    assert one.split("/") == [f"{c.one_model:g}" for c in study.values()]
    assert many.split("/") == [f"{c.ensemble:g}" for c in study.values()]
    assert f"validation, {PAPER.imagenet.val_images:,} images" in text


@needs_readme
def test_the_scalars_and_the_mnist_reproduction_are_the_readmes():
    text = " ".join(README.read_text().split())
    assert f"mini-batch {PAPER.imagenet.batch_size}," in text
    assert f"Softmax over {PAPER.imagenet.classes} classes" in text
    assert f"over {PAPER.imagenet.train_images / 1e6:.2f}M images" in text
    assert f'"{PAPER.imagenet.speedup_in_text:g} times fewer steps"' in text
    assert f"about {PAPER.imagenet.change_6_gain:+.0%} validation accuracy" in text
    assert "never above chance, 1/1000" in text and "1/1000" in PAPER.notes["inception-sigmoid"]
    assert "| inception at 0.0075 | paper: parameters reach \"machine infinity\"" in text
    assert "0.0075" in PAPER.notes["inception-x5"]
    bn, baseline, bn2, baseline2 = re.search(
        r"test accuracy (\d\.\d+) \(BN\) vs (\d\.\d+) \(no BN\), second run (\d\.\d+) vs (\d\.\d+)", text).groups()
    reproduction = {name: [str(x) for x in v] for name, v in PAPER.mnist.public_reproduction.items()}
    assert reproduction == {"bn": [bn, bn2], "baseline": [baseline, baseline2]}
