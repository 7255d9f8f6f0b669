"""Beyond the paper (issue 22): which of Sec. 4.2.1's seven changes buys what, one change at a time.

The paper turns BN-Baseline into BN-x5 with seven changes at once (``paper.yaml``'s ``changes``) and credits only
one with a number. The study takes them apart in both directions, each run a recipe variant that differs from its
reference in exactly one change (``bnrepro recipes diff`` shows it):

- leave one out: BN-x5 with change k undone (its keys set back to BN-Baseline's values), against BN-x5;
- add one in: BN-Baseline with change k made (its keys set to BN-x5's values) at BN-x5's budget, against
  BN-Baseline at that budget (its own budget is Inception's, 5x longer: the comparison would be the budget's).

The values come from the two resolved recipes, never restated here, so the study follows the recipes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Literal

import yaml

from bnrepro import recipes as recipe_io
from bnrepro.experiments.reproduce import Planned, campaign
from bnrepro.paper import PAPER

BASELINE, X5 = "imagenet/bn-baseline", "imagenet/bn-x5"
HOME = "changes"  # results/changes/: the study's own runs (results/changes/imagenet/) and records (.../campaign/)
RECORDS = f"{HOME}/campaign"
BUDGET_KEYS = ("steps", "eval_every", "checkpoint_every")  # what "at BN-x5's budget" sets


@dataclass(frozen=True)
class Variant:
    """A run of the study: which change (0 for a reference), which way, the run, and the run it is compared with
    (None for a reference)."""

    change: int
    direction: Literal["reference", "leave one out", "add one in"]
    run: Planned
    reference: Planned | None = None


def override(key: str, value: object) -> str:
    """``--set`` text for ``key`` that YAML (``recipes.parse_override``) reads back as ``value``: a plain string as
    it is (``train.shuffle=shards``, as the campaign's shards-only run says it, so that run counts here too), any
    other value in JSON."""
    plain = isinstance(value, str) and yaml.safe_load(value) == value
    return f"{key}={value if plain else json.dumps(value)}"


def variants(profile: str, seeds: int) -> list[Variant]:
    """Every run of the study at ``profile``, each at seeds 0 .. seeds - 1: the two references, then each change
    left out of BN-x5, then each change added to BN-Baseline at BN-x5's budget."""
    baseline, x5 = (recipe_io.flatten(recipe_io.load(name).model_dump(mode="json")) for name in (BASELINE, X5))
    budget = tuple(override(f"profiles.{profile}.{key}", x5[f"profiles.{profile}.{key}"]) for key in BUDGET_KEYS)
    found = []
    for seed in range(seeds):
        left = Planned(X5, seed, (), "leave-one-out reference: BN-x5")
        added = Planned(BASELINE, seed, budget, "add-one-in reference: BN-Baseline at BN-x5's budget")
        found += [Variant(0, "reference", left), Variant(0, "reference", added)]
        for number, change in PAPER.changes.items():
            undo = tuple(override(key, baseline[key]) for key in change.keys)
            found.append(Variant(number, "leave one out", Planned(
                X5, seed, undo, f"BN-x5 without change {number} ({change.name})"), left))
        for number, change in PAPER.changes.items():
            make = tuple(override(key, x5[key]) for key in change.keys)
            found.append(Variant(number, "add one in", Planned(
                BASELINE, seed, budget + make, f"BN-Baseline with change {number} ({change.name})"), added))
    return found


def runs(profile: str, seeds: int) -> list[Planned]:
    """The study as a plan for ``reproduce.plan``, each run once (``variants`` names the references again beside
    every variant), in ``variants``' order. A run the campaign also makes (BN-x5, and BN-x5 without change 6: the
    campaign's shards-only run) lives where the campaign's runs do, so either command keeps the other's; the rest
    live in ``results/changes/``, out of the paper's figures."""
    paper = {(run.recipe, run.seed, run.overrides) for run in campaign()}
    planned: dict[tuple, Planned] = {}
    for variant in variants(profile, seeds):
        run = variant.run
        key = (run.recipe, run.seed, run.overrides)
        planned.setdefault(key, replace(run, home="" if key in paper else HOME))
    return list(planned.values())
