"""Recipes: declarative YAML files under ``recipes/``, resolved and validated before anything runs.

A recipe may ``extends:`` another (by name, relative to ``recipes/``); the child's mappings are merged
into the parent's key by key, so a child states only what it changes. ``--set dotted.key=value``
overrides apply after inheritance. Every value the paper leaves open is listed under ``assumptions:``
(dotted key -> where the value comes from), and validation checks each listed key exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bnrepro.errors import UserError

RECIPES_DIR = Path(os.environ.get("BNREPRO_RECIPES", Path(__file__).resolve().parent.parent / "recipes"))


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MLPModel(Strict):
    hidden: list[int] = Field(min_length=1, description="width of each hidden layer")
    nonlinearity: Literal["sigmoid", "relu"]
    batch_norm: bool = Field(description="BN on the input of every hidden nonlinearity; drops that bias")
    bn_eps: float = Field(gt=0)
    bn_momentum: float = Field(gt=0, le=1, description="moving-average weight of each new batch statistic")
    init: Literal["normal", "truncated_normal"]
    init_std: float = Field(gt=0)


class MnistData(Strict):
    dataset: Literal["mnist"] = "mnist"
    binarize_threshold: float = Field(ge=0, lt=1, description="pixel/255 above this is 1, else 0")


class SGD(Strict):
    steps: int = Field(ge=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)


class MnistEval(Strict):
    every: int = Field(gt=0, description="evaluate on the whole test set every this many steps")
    probe_unit: int = Field(ge=0, description="which unit of the last hidden layer Fig. 1(b, c) follows")
    percentiles: list[float] = Field(min_length=1)


class MnistRecipe(Strict):
    experiment: Literal["mnist"]
    label: str = Field(description="short name in tables and figures")
    description: str
    paper: str = Field(description="where in the paper this recipe comes from")
    model: MLPModel
    data: MnistData
    train: SGD
    eval: MnistEval
    assumptions: dict[str, str] = Field(description="dotted key -> source, for every value the paper leaves open")

    @model_validator(mode="after")
    def _assumptions_name_real_keys(self) -> MnistRecipe:
        flat = flatten(self.model_dump(exclude={"assumptions"}))
        missing = [key for key in self.assumptions if key not in flat]
        if missing:
            raise ValueError(f"assumptions name keys that do not exist: {', '.join(missing)}")
        return self

    @property
    def digest(self) -> str:
        """A short hash of the resolved recipe: two runs with equal digests trained the same thing."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


Recipe = MnistRecipe


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def available() -> list[str]:
    """Names of every recipe under the recipes folder, e.g. ``mnist/bn``."""
    return sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))


def _path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no recipe named '{name}'; `bnrepro recipes list` shows the {len(available())} there are")
    return path


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read(name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe as a plain mapping with its ``extends:`` chain merged in."""
    if name in chain:
        raise UserError(f"recipe '{name}' extends itself through {' -> '.join(chain)}")
    path = _path(name)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise UserError(f"recipe {path} must be a mapping of keys to values")
    parent = tree.pop("extends", None)
    return _merge(_read(parent, (*chain, name)), tree) if parent else tree


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is read as YAML, so types come out right."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set '{text}' must look like dotted.key=value, e.g. --set train.lr=0.1")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"--set '{text}': cannot read the value '{raw}'") from None


def _apply(tree: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    node = tree
    for i, section in enumerate(sections):
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: '{'.'.join(sections[: i + 1])}' is a value, not a section")
    node[leaf] = value


def load(name: str, overrides: list[str] = ()) -> Recipe:
    """Resolve ``extends:``, apply ``--set`` overrides, and validate; any problem is one clear line."""
    tree = _read(name)
    for text in overrides:
        _apply(tree, *parse_override(text))
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "recipe"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise UserError(f"recipe '{name}': {where}: {first['msg']}{more}") from None


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=100)
