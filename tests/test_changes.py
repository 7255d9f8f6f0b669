"""The changes study (issue 22): every variant differs from its reference in exactly one of Sec. 4.2.1's changes."""

from __future__ import annotations

from bnrepro import recipes
from bnrepro.experiments import changes, reproduce
from bnrepro.paper import PAPER

NOT_A_CHANGE = ("label", "description")  # what BN-x5 renames beside its changes


def _differences(run: reproduce.Planned, other: reproduce.Planned) -> set[str]:
    a, b = (recipes.load(r.recipe, list(r.overrides)) for r in (run, other))
    return {key for key, _, _ in recipes.diff(a, b) if key not in NOT_A_CHANGE}


def test_the_changes_are_exactly_what_makes_bn_x5_of_bn_baseline_beside_the_budgets():
    keys = {key for change in PAPER.changes.values() for key in change.keys}
    found = _differences(reproduce.Planned(changes.BASELINE), reproduce.Planned(changes.X5))
    assert {k for k in found if not k.startswith("profiles.")} == keys
    assert sorted(PAPER.changes) == list(range(1, 8))


def test_every_variant_differs_from_its_reference_in_its_change_alone_at_every_profile():
    for profile in ("cpu", "smoke"):
        study = changes.variants(profile, seeds=2)
        assert len(study) == 2 * (2 + 7 + 7)
        for variant in study:
            if variant.direction == "reference":
                assert variant.change == 0 and variant.reference is None
                continue
            assert variant.reference.seed == variant.run.seed
            assert _differences(variant.run, variant.reference) == set(PAPER.changes[variant.change].keys), variant


def test_add_one_in_runs_at_bn_x5s_budget_and_leave_one_out_reuses_the_campaigns_shards_only_run():
    study = changes.variants("cpu", seeds=1)
    x5 = recipes.load(changes.X5).profiles["cpu"]
    for variant in study:
        resolved = recipes.load(variant.run.recipe, list(variant.run.overrides)).profiles["cpu"]
        assert (resolved.steps, resolved.eval_every) == (x5.steps, x5.eval_every), variant
    shards_only = PAPER.variants["shards-only"]
    (undo_6,) = [v for v in study if v.change == 6 and v.direction == "leave one out"]
    assert (undo_6.run.recipe, undo_6.run.overrides) == (shards_only.recipe, tuple(shards_only.overrides))
