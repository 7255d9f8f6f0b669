"""Recipes: inheritance, --set overrides, validation errors as one-line UserErrors, digests, assumptions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bnrepro import recipes
from bnrepro.errors import UserError
from bnrepro.recipes import flatten

REPO = Path(__file__).resolve().parents[1]


def flat(recipe) -> dict:
    return flatten(recipe.model_dump(mode="json"))


def test_available_lists_both_mnist_recipes():
    names = recipes.available()
    assert "mnist/baseline" in names
    assert "mnist/bn" in names


def test_baseline_values():
    base = recipes.load("mnist/baseline")
    assert base.experiment == "mnist"
    assert base.model.batch_norm is False
    assert base.model.hidden == [100, 100, 100]
    assert base.model.nonlinearity == "sigmoid"
    assert base.train.steps == 50_000
    assert base.train.batch_size == 60
    assert base.eval.percentiles == [15, 50, 85]


def test_bn_inherits_everything_but_batch_norm_and_its_own_words():
    base, bn = flat(recipes.load("mnist/baseline")), flat(recipes.load("mnist/bn"))
    assert bn["model.batch_norm"] is True
    assert base.keys() == bn.keys()
    differ = {key for key in base if base[key] != bn[key]}
    assert differ == {"model.batch_norm", "label", "description"}
    assert recipes.load("mnist/bn").label != recipes.load("mnist/baseline").label


def test_override_gives_a_float():
    recipe = recipes.load("mnist/bn", ["train.lr=0.1"])
    assert isinstance(recipe.train.lr, float)
    assert recipe.train.lr == 0.1
    assert recipe.model.batch_norm is True  # the rest still comes from the chain


@pytest.mark.parametrize(
    ("override", "pick", "expected", "kind"),
    [
        ("train.steps=300", lambda r: r.train.steps, 300, int),
        ("model.batch_norm=false", lambda r: r.model.batch_norm, False, bool),
        ("model.hidden=[50, 20]", lambda r: r.model.hidden, [50, 20], list),
        ("train.lr=1e-3", lambda r: r.train.lr, 0.001, float),
        ("train.momentum=0.9", lambda r: r.train.momentum, 0.9, float),
        ("model.init=normal", lambda r: r.model.init, "normal", str),
        ("eval.percentiles=[10, 90]", lambda r: r.eval.percentiles, [10.0, 90.0], list),
    ],
)
def test_override_values_are_read_as_yaml(override, pick, expected, kind):
    value = pick(recipes.load("mnist/bn", [override]))
    assert isinstance(value, kind)
    assert value == expected


def test_later_override_wins():
    assert recipes.load("mnist/baseline", ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


def test_parse_override():
    assert recipes.parse_override("train.lr=0.1") == ("train.lr", 0.1)
    assert recipes.parse_override(" train.steps = 7") == ("train.steps", 7)
    assert recipes.parse_override("label=a=b") == ("label", "a=b")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.lrr=1"], "train.lrr"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=-1"], "train.steps"),
        (["train.lr=0"], "train.lr"),
        (["nokey"], "nokey"),
        (["=1"], "=1"),
        (["train.lr.x=1"], "train.lr"),
        (["model.hidden=[1, 2"], "model.hidden"),
        (["nosection.key=1"], "nosection"),
    ],
)
def test_bad_overrides_are_one_line_user_errors(overrides, fragment):
    with pytest.raises(UserError) as caught:
        recipes.load("mnist/bn", overrides)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(UserError) as caught:
        recipes.load("mnist/nope")
    assert "mnist/nope" in str(caught.value)
    assert "\n" not in str(caught.value)


def _write(path, tree) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_recipe_file_by_path_extending_a_named_recipe(tmp_path):
    path = _write(tmp_path / "mine.yaml", {"extends": "mnist/bn", "label": "mine", "train": {"lr": 0.25}})
    recipe = recipes.load(path)
    assert recipe.label == "mine"
    assert recipe.train.lr == 0.25
    assert recipe.model.batch_norm is True
    assert recipe.train.steps == 50_000


def test_assumptions_must_name_real_keys(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"extends": "mnist/baseline", "assumptions": {"model.no_such_key": "why"}})
    with pytest.raises(UserError) as caught:
        recipes.load(path)
    assert "model.no_such_key" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_key_in_a_recipe_file_is_rejected(tmp_path):
    path = _write(tmp_path / "bad.yaml", {"extends": "mnist/baseline", "model": {"widht": 3}})
    with pytest.raises(UserError, match="widht"):
        recipes.load(path)


def test_invalid_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(UserError) as caught:
        recipes.load(str(path))
    assert "\n" not in str(caught.value)


def test_extends_cycle_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path)
    (tmp_path / "a.yaml").write_text("extends: b\nlabel: a\n")
    (tmp_path / "b.yaml").write_text("extends: a\nlabel: b\n")
    (tmp_path / "self.yaml").write_text("extends: self\n")
    for name in ("a", "b", "self"):
        with pytest.raises(UserError, match="extends itself") as caught:
            recipes.load(name)
        assert "\n" not in str(caught.value)


def test_child_mapping_merges_into_parent(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path)
    (tmp_path / "x").mkdir()
    parent = yaml.safe_load((REPO / "recipes" / "mnist" / "baseline.yaml").read_text())
    (tmp_path / "x" / "parent.yaml").write_text(yaml.safe_dump(parent))
    (tmp_path / "x" / "child.yaml").write_text("extends: x/parent\ntrain:\n  lr: 0.05\n")
    child = recipes.load("x/child")
    assert child.train.lr == 0.05
    assert child.train.batch_size == 60  # the sibling keys of the section survive the merge
    assert recipes.available() == ["x/child", "x/parent"]


def test_digest_is_stable_and_tracks_values():
    a, b = recipes.load("mnist/bn"), recipes.load("mnist/bn")
    assert a.digest == b.digest
    assert len(a.digest) == 16
    assert recipes.load("mnist/bn", ["train.lr=0.5"]).digest == a.digest  # same value, same digest
    assert recipes.load("mnist/bn", ["train.lr=0.1"]).digest != a.digest
    assert recipes.load("mnist/bn", ["train.steps=49999"]).digest != a.digest
    assert recipes.load("mnist/baseline").digest != a.digest


@pytest.mark.parametrize("name", ["mnist/baseline", "mnist/bn"])
def test_open_values_of_the_paper_are_listed_as_assumptions(name):
    recipe = recipes.load(name)
    for key in ("model.init_std", "model.bn_eps", "train.lr", "train.momentum"):
        assert key in recipe.assumptions, key
        assert recipe.assumptions[key].strip()
    keys = flat(recipe)
    assert all(key in keys for key in recipe.assumptions)


def test_the_training_digest_leaves_out_the_prose_and_other_profiles_and_nothing_else():
    """Runs are matched by what a recipe trains at their profile: rewording its label, description, paper reference
    or an assumption's source keeps the training digest (the whole-recipe digest changes), and so does changing
    another profile; any trained value at the profile changes it."""
    recipe = recipes.load("imagenet/bn-x5")
    reworded = recipe.model_copy(update={"label": "x", "description": "x", "paper": "x",
                                         "assumptions": {key: "x" for key in recipe.assumptions}})
    assert reworded.training_digest("cpu") == recipe.training_digest("cpu") and reworded.digest != recipe.digest
    assert reworded.training_digest() == recipe.training_digest()
    assert {"label", "description", "paper", "assumptions"} == recipes.PROSE
    other = recipes.load("imagenet/bn-x5", ["profiles.paper.steps=7"])
    assert other.training_digest("cpu") == recipe.training_digest("cpu")
    assert other.training_digest("paper") != recipe.training_digest("paper")
    assert other.training_digest() != recipe.training_digest()
    for text in ("train.lr=0.01", "model.dropout=0.1", "profiles.cpu.steps=7", "data.crop_min_area=0.5"):
        assert recipes.load("imagenet/bn-x5", [text]).training_digest("cpu") != recipe.training_digest("cpu"), text
    mnist = recipes.load("mnist/bn")  # no profiles: the profile changes nothing
    assert mnist.training_digest("cpu") == mnist.training_digest()


def test_to_yaml_round_trips():
    recipe = recipes.load("mnist/bn", ["train.lr=0.1"])
    again = type(recipe).model_validate(yaml.safe_load(recipes.to_yaml(recipe)))
    assert again == recipe
    assert again.digest == recipe.digest
