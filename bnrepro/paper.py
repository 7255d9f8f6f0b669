"""The paper's numbers and the campaign's lists, read once from ``paper.yaml`` beside this module.

Why data and not constants: the same facts (Fig. 3's steps, Fig. 4's errors, the order and colour of each ImageNet
recipe, the runs ``bnrepro reproduce`` plans) were spread over five modules, so adding a recipe meant editing Python
in several places and a number could differ between two of them. Kept as one typed data file, a recipe is added by
its recipe YAML and a few lines here, every number of the paper is checked against shared/paper/README.md in one
test (tests/test_paper.py), and the reports and the campaign read the same values. pycls keeps its model zoo the
same way: its MODEL_ZOO.md tables are generated from the zoo's configs and a file of their results, not written by
hand. The models below refuse unknown keys, so a typo in the file fails at import rather than dropping a value.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PAPER_YAML = Path(__file__).resolve().with_name("paper.yaml")


class Frozen(BaseModel):
    """A section of paper.yaml: unknown keys are errors, and nothing changes it after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ImageNet(Frozen):
    """Sec. 4.2's scalars: the data set's counts, the mini-batch, Fig. 3's target and the text's round figures."""

    classes: int = Field(gt=0)
    train_images: int = Field(gt=0)
    val_images: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    target: float = Field(gt=0, lt=1)
    speedup_in_text: float = Field(gt=0)  # "14 times fewer steps"
    change_6_gain: float  # "about +1%" from within-shard shuffling


class Fig3(Frozen):
    """One row of the paper's Fig. 3: steps to 72.2% (None: never reached) and max single-crop top-1."""

    steps: float | None = Field(gt=0)
    max_top1: float = Field(gt=0, lt=1)


class Recipe(Frozen):
    """An ImageNet recipe as the report draws and compares it."""

    colour: str
    fig3: Fig3 | None = None
    note: str | None = None  # what the paper says of it outside Fig. 3


class Variant(Frozen):
    """A recipe run with ``--set`` overrides: a row of its own, with its name in the tables."""

    recipe: str  # the recipe's name for ``recipes.load`` (imagenet/bn-x5)
    overrides: tuple[str, ...] = Field(min_length=1)
    label: str

    @property
    def stem(self) -> str:
        """The recipe's name in a run's manifest and in the report (bn-x5)."""
        return Path(self.recipe).name


class Fig4Row(Frozen):
    """One row of the paper's Fig. 4; errors in percent as printed, None where the paper gives none."""

    model: str
    resolution: int | str
    crops: int | None
    models: int | None
    top1_error: float | None
    top5_error: float | None


class GoogLeNetCrops(Frozen):
    """GoogLeNet's top-5 error in percent at one crop scheme: one model and its ensemble."""

    one_model: float
    ensemble: float


class Ensemble(Frozen):
    """Sec. 4.2.3 and Fig. 4, with GoogLeNet's crop study."""

    fig4: tuple[Fig4Row, ...]
    test_top5_error: float
    googlenet_models: int = Field(gt=1)
    googlenet_crops: dict[int, GoogLeNetCrops]

    def fig4_row(self, model: str) -> Fig4Row:
        return next(row for row in self.fig4 if row.model == model)


class Mnist(Frozen):
    """Sec. 4.1: what the paper says of Fig. 1, and the public reproduction its notes cite (digits as printed)."""

    note: str
    public_reproduction: dict[str, tuple[Decimal, ...]]


class CampaignRun(Frozen):
    """A run ``bnrepro reproduce`` plans (at each of the campaign's seeds): a recipe, or a variant (recipe and
    overrides), and why it is there."""

    recipe: str | None = None
    variant: str | None = None
    why: str

    @model_validator(mode="after")
    def _one_of(self) -> CampaignRun:
        if (self.recipe is None) == (self.variant is None):
            raise ValueError("a campaign run names a recipe or a variant, not both and not neither")
        return self


class Planned(NamedTuple):
    """A campaign run with its variant resolved: what ``bnrepro.experiments.reproduce.Planned`` is made from."""

    recipe: str
    seed: int
    overrides: tuple[str, ...]
    why: str


class CampaignProfile(Frozen):
    """The campaign's settings at one profile."""

    val_limit: int | None = Field(None, gt=0)  # the ensemble's validation images unless --val-limit says


class Campaign(Frozen):
    ensemble: str  # the ensemble recipe: its members follow ``runs`` in the plan
    seeds: int = Field(gt=0)  # every run of ``runs`` at seeds 0 .. seeds - 1
    runs: tuple[CampaignRun, ...] = Field(min_length=1)
    profiles: dict[str, CampaignProfile] = {}

    def val_limit(self, profile: str) -> int | None:
        """The validation images the ensemble evaluates at ``profile`` (None: all of them)."""
        return self.profiles.get(profile, CampaignProfile()).val_limit

    def val_limit_text(self) -> str:
        """The per-profile limits in words, for --help: "1,000 at cpu, all elsewhere"."""
        limits = [f"{p.val_limit:,} at {name}" for name, p in self.profiles.items() if p.val_limit]
        return ", ".join([*limits, "all elsewhere" if limits else "all"])


class Change(Frozen):
    """One of Sec. 4.2.1's changes: its name, the recipe keys it sets, and what the paper says it buys (None: the
    paper gives no number)."""

    name: str
    keys: tuple[str, ...] = Field(min_length=1)
    paper: str | None = None


class Paper(Frozen):
    """The whole of paper.yaml."""

    imagenet: ImageNet
    recipes: dict[str, Recipe] = Field(min_length=1)
    spare_colours: tuple[str, ...] = Field(min_length=1)
    profile_order: tuple[str, ...]
    variants: dict[str, Variant]
    changes: dict[int, Change] = Field(min_length=1)
    seed_spread: tuple[str, ...]
    ensemble: Ensemble
    mnist: Mnist
    campaign: Campaign

    @model_validator(mode="after")
    def _names_resolve(self) -> Paper:
        """Every name the file uses is defined in it: a campaign run's variant, the seed-spread recipes, and no
        colour given twice (Fig. 2 tells recipes apart by it)."""
        unknown = [run.variant for run in self.campaign.runs if run.variant and run.variant not in self.variants]
        unknown += [name for name in self.seed_spread if name not in self.recipes]
        if unknown:
            raise ValueError(f"paper.yaml names what it does not define: {', '.join(unknown)}")
        colours = [r.colour for r in self.recipes.values()] + list(self.spare_colours)
        if len(set(colours)) != len(colours):
            raise ValueError("paper.yaml gives a colour twice")
        if "inception" not in self.recipes or self.recipes["inception"].fig3 is None:
            raise ValueError("paper.yaml lacks Inception's Fig. 3 row, the reference of every speed-up")
        return self

    @property
    def recipe_order(self) -> tuple[str, ...]:
        return tuple(self.recipes)

    @property
    def colours(self) -> dict[str, str]:
        return {name: recipe.colour for name, recipe in self.recipes.items()}

    @property
    def notes(self) -> dict[str, str]:
        return {name: recipe.note for name, recipe in self.recipes.items() if recipe.note}

    def fig3(self, name: str) -> Fig3 | None:
        """The paper's Fig. 3 row of recipe ``name`` (None: not in the table)."""
        recipe = self.recipes.get(name)
        return recipe.fig3 if recipe else None

    def speedup(self, name: str) -> float | None:
        """Fig. 3's steps of Inception over those of ``name`` (None: ``name`` never reaches 72.2% or is not there)."""
        row = self.fig3(name)
        return None if row is None or row.steps is None else self.fig3("inception").steps / row.steps

    @property
    def variant_labels(self) -> dict[tuple[str, tuple[str, ...]], str]:
        """(recipe stem, sorted overrides) -> the row's name in the tables."""
        return {(v.stem, tuple(sorted(v.overrides))): v.label for v in self.variants.values()}

    def planned(self) -> list[Planned]:
        """The campaign's runs before the ensemble's members, in order: every run at seed 0, then every run at seed 1,
        and so on (a campaign stopped part way has every recipe at its first seeds), each variant as its recipe and
        overrides."""
        found = []
        for seed in range(self.campaign.seeds):
            for run in self.campaign.runs:
                variant = self.variants.get(run.variant) if run.variant else None
                recipe, overrides = (variant.recipe, variant.overrides) if variant else (run.recipe, ())
                found.append(Planned(recipe, seed, overrides, run.why))
        return found


def load(path: Path = PAPER_YAML) -> Paper:
    """paper.yaml, validated (pydantic's ValidationError names the key where it is wrong)."""
    return Paper.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


PAPER = load()
