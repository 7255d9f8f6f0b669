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
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from bnrepro.errors import UserError

Statistics = Literal["moving", "population"]  # what BN uses at inference: its moving averages, or Alg. 2's
RECIPES_DIR = Path(os.environ.get("BNREPRO_RECIPES", Path(__file__).resolve().parent.parent / "recipes"))


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, not silently ignored; so are infinite and NaN
    numbers (``--set train.lr=.inf`` would train nothing, and no bound such as ``gt=0`` refuses inf)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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
    percentiles: list[Annotated[float, Field(ge=0, le=100)]] = Field(min_length=1)
    population_batches: int = Field(gt=0, description="Alg. 2: training mini-batches averaged for BN's population "
                                                     "statistics, estimated afresh at each evaluation that uses them")
    statistics: Statistics = Field("moving", description="what BN infers with at the evaluations between step 0 "
                                   "and the end (those two always use Alg. 2's population statistics); the default is "
                                   "what runs recorded before this field existed did, every recipe states its own")


class RecipeBase(Strict):
    """What every recipe carries besides its experiment's sections."""

    label: str = Field(description="short name in tables and figures")
    description: str
    paper: str = Field(description="where in the paper this recipe comes from")
    assumptions: dict[str, str] = Field(description="dotted key -> source, for every value the paper leaves open")

    @model_validator(mode="after")
    def _assumptions_name_real_keys(self) -> RecipeBase:
        flat = flatten(self.model_dump(exclude={"assumptions"}))
        sections = {prefix for key in flat for prefix in _prefixes(key)}
        missing = [key for key in self.assumptions if key not in flat and key not in sections]
        if missing:
            raise ValueError(f"assumptions name keys that do not exist: {', '.join(missing)}")
        return self

    @property
    def digest(self) -> str:
        """A short hash of the whole resolved recipe, prose included: a run folder's recipe.yaml must still have the
        one its manifest recorded (a resume refuses an edited one)."""
        return _digest_of(self.model_dump(mode="json"))

    def training_digest(self, profile: str | None = None) -> str:
        """A short hash of what the recipe trains or evaluates at ``profile`` (None: at every profile it has): all of
        it but its prose (``PROSE``) and its other profiles' settings. Runs are matched to a recipe by this one
        (``bnrepro reproduce`` keeping finished runs, the reports finding them), so that rewording a description or
        an assumption's source, or changing another profile, does not make finished runs look like another
        experiment: two runs at a profile with equal training digests trained the same thing. It is coarse the
        other way: settings that change no number (``checkpoint_every``, an ensemble's ``batch_crops``) count, so
        editing them still makes finished runs look new."""
        tree = self.model_dump(mode="json", exclude=PROSE)
        if profile is not None and "profiles" in tree:
            tree["profiles"] = {profile: tree["profiles"].get(profile)}
        return _digest_of(tree)


PROSE = frozenset({"label", "description", "paper", "assumptions"})  # what a recipe says about itself


def _digest_of(tree: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


class MnistRecipe(RecipeBase):
    experiment: Literal["mnist"]
    model: MLPModel
    data: MnistData
    train: SGD
    eval: MnistEval

    @model_validator(mode="after")
    def _probe_unit_exists(self) -> MnistRecipe:
        if self.eval.probe_unit >= self.model.hidden[-1]:
            raise ValueError(f"eval.probe_unit {self.eval.probe_unit} is not a unit of the last hidden layer "
                             f"(it has {self.model.hidden[-1]})")
        return self


class InceptionModel(Strict):
    """Switches of the Fig. 5 network (see bnrepro.models.inception)."""

    batch_norm: bool = Field(description="BN before every nonlinearity, conv bias dropped")
    nonlinearity: Literal["relu", "sigmoid"]
    lrn: bool = Field(description="Local Response Normalization in the stem (removed by Sec. 4.2.1 change 5)")
    lrn_size: int = Field(gt=0)
    lrn_alpha: float = Field(ge=0)
    lrn_beta: float = Field(ge=0)
    lrn_k: float = Field(ge=0)
    dropout: float = Field(ge=0, lt=1, description="before the classifier (Sec. 4.2.1 change 2 removes it)")
    per_activation_bn: bool = Field(description="non-convolutional BN on the last hidden layer (Sec. 4.2.3)")
    init_scale: float = Field(gt=0, description="multiplies the initial conv weights (Sec. 4.2.3)")
    conv_init: Literal["he_normal", "he_truncated_normal", "lecun_uniform"] = Field(
        description="initial conv weights, before init_scale (bnrepro.models.inception.CONV_INIT)")
    classifier_init_std: float = Field(ge=0, description="softmax layer weights ~ N(0, std^2), bias 0")
    pool_count_include_pad: bool = Field(description="the modules' 3x3/1 average pools divide by the zero padding")
    stem: Literal["plain", "separable"]
    depth_multiplier: int = Field(gt=0)
    bn_eps: float = Field(gt=0)
    bn_momentum: float = Field(gt=0, le=1)


class LrDecay(Strict):
    """Exponential decay: lr * rate ** (epoch / (every_epochs / speedup)), stepwise."""

    rate: float = Field(gt=0, le=1)
    every_epochs: float = Field(gt=0)
    speedup: float = Field(ge=1, description="Sec. 4.2.1 change 4: decay 6x faster")

    @property
    def period(self) -> float:
        """Epochs between two decays."""
        return self.every_epochs / self.speedup

    def factor(self, epoch: float) -> float:
        """What the initial learning rate is multiplied by after ``epoch`` epochs."""
        return self.rate ** math.floor(epoch / self.period)


class ImagenetTrain(Strict):
    lr: float = Field(gt=0, description="initial learning rate (Sec. 4.2.1 change 1)")
    momentum: float = Field(ge=0, lt=1)
    l2_base: float = Field(ge=0, description="the baseline Inception's L2 weight")
    l2_multiplier: float = Field(ge=0, description="Sec. 4.2.1 change 3: 0.2 = reduced 5x")
    lr_decay: LrDecay
    shuffle: Literal["shards", "within_shard"] = Field(description="Sec. 4.2.1 change 6")
    shuffle_buffer_shards: int = Field(gt=0, description="within_shard: examples mix across this many shards")
    distortions: Literal["full", "reduced"] = Field(description="Sec. 4.2.1 change 7")
    bn_sync: bool = Field(description="BN statistics over all DDP replicas (the paper: per replica)")
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        description="learning rate x (global batch / the paper's 32) ** 1, 0.5 or 0")

    def lr_factor(self, batch_ratio: float) -> float:
        """What the rule multiplies the paper's learning rate by for a global batch ``batch_ratio`` x the paper's."""
        return {"linear": batch_ratio, "sqrt": batch_ratio ** 0.5, "none": 1.0}[self.lr_scaling]

    @property
    def weight_decay(self) -> float:
        return self.l2_base * self.l2_multiplier


class Photometric(Strict):
    """Colour jitter strengths (torchvision ColorJitter arguments)."""

    brightness: float = Field(ge=0)
    contrast: float = Field(ge=0)
    saturation: float = Field(ge=0)
    hue: float = Field(ge=0, le=0.5)


class ImagenetData(Strict):
    crop_min_area: float = Field(gt=0, le=1, description="random-size crop, smallest fraction of the area")
    crop_aspect: tuple[float, float] = Field(description="random-size crop aspect-ratio range")
    flip: bool
    photometric: dict[Literal["full", "reduced"], Photometric]
    eval_resize: float = Field(gt=1, description="evaluation: resize the shorter side to resolution * this")
    population_transform: Literal["train", "eval"] = Field(
        description="Alg. 2's population batches: training images with the training augmentation, or the "
                    "evaluation view (resize and centre crop)")
    mean: tuple[float, float, float] = Field(description="per-channel input mean (pixels in [0, 1])")
    std: tuple[float, float, float] = Field(description="per-channel input std")


class Profile(Strict):
    """A scale at which a recipe runs: data set, resolution, batch and budgets, all in steps."""

    dataset: str = Field(description="imagenet, cifar10, fashion-mnist, or generated (tests): what the profile was "
                                     "made for (a run records the data it opened)")
    resolution: int = Field(gt=0)
    width: float = Field(1.0, gt=0, le=1, description="the network's width: every filter count of Fig. 5 (the "
                                                         "stem's too) times this; 1 is the paper's network")
    batch_size: int = Field(gt=0)
    train_examples: int = Field(gt=0, description="size of the training set, to convert steps to epochs")
    steps: int = Field(ge=0)
    eval_every: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    population_batches: int = Field(gt=0, description="Alg. 2: training mini-batches averaged for BN's population "
                                                     "statistics, estimated afresh at each evaluation that uses them")
    compression: float | None = Field(None, gt=0, description="this profile's steps per paper step: set, the "
                                      "learning-rate decay runs on paper-equivalent steps (step / compression), so "
                                      "a budget of compression x the paper's spans as many decays as the paper's")
    crop_min_area: float | None = Field(None, gt=0, le=1, description="the random-size crop's smallest fraction of "
                                        "the area at this profile (None: the recipe's data.crop_min_area), where its "
                                        "images are too small for the paper's (a recorded deviation)")
    shard_size: int = Field(1000, gt=0,
                            description="class folders: examples per virtual shard (stored order by path hash)")

    def epochs(self, steps: int) -> float:
        return steps * self.batch_size / self.train_examples


class ImagenetEval(Strict):
    statistics: Statistics = Field(description="what BN infers with at the evaluations between step 0 and the end "
                                               "(those two always use Alg. 2's population statistics)")


MOVING_BETWEEN = ImagenetEval(statistics="moving")  # what runs recorded before ``eval`` existed did


class ImagenetRecipe(RecipeBase):
    experiment: Literal["imagenet"]
    model: InceptionModel
    train: ImagenetTrain
    data: ImagenetData
    eval: ImagenetEval = Field(MOVING_BETWEEN, description="the default reads run folders recorded before this "
                                                           "section existed; every recipe states its own")
    profiles: dict[Literal["paper", "proxy", "cpu", "smoke"], Profile]


def recorded_digest(recipe: RecipeBase, tree: dict[str, Any]) -> str:
    """The digest of ``recipe`` as the run that wrote ``tree`` (the run folder's recipe.yaml, ``recipe`` validated
    from it) computed it. A run recorded before ImageNet recipes had ``eval`` hashed a recipe without that section;
    its recipe.yaml now loads with the default (``MOVING_BETWEEN``), which today's digest includes, so such a run is
    compared the old way: without ``eval``."""
    if isinstance(recipe, ImagenetRecipe) and isinstance(tree, dict) and "eval" not in tree:
        return _digest_of(recipe.model_dump(mode="json", exclude={"eval"}))
    return recipe.digest


@dataclass(frozen=True)
class Trained:
    """What a run (or ensemble) folder says it trained: its training digest at its profile
    (``RecipeBase.training_digest``) and its manifest's whole-recipe digest, either of which may be unknown."""

    digest: str | None
    whole: str | None
    profile: str | None

    def matches(self, recipe: RecipeBase) -> bool:
        """Whether the run trained ``recipe``: by training digest where it is known, else by the whole recipe's
        (equal whole digests imply equal training digests)."""
        if self.digest is not None:
            return self.digest == recipe.training_digest(self.profile)
        return self.whole is not None and self.whole == recipe.digest


def trained(folder: Path, manifest: dict[str, Any]) -> Trained:
    """What the run in ``folder`` trained, as ``Trained``. Its training digest is recomputed from its own
    recipe.yaml (the resolved recipe it ran) rather than read from the manifest, so a field a recipe section gains
    later, with a default, counts as it does for today's recipes (a recipe.yaml from before ImageNet recipes had
    ``eval`` loads with ``MOVING_BETWEEN``, what such a run did); the manifest's ``recipe_training_digest`` stands in
    only where recipe.yaml is missing or no longer a valid recipe. A recipe.yaml edited since the run (its digest, as
    the run computed it, no longer the manifest's ``recipe_digest``) says nothing: such a run matches no recipe, as a
    resume refuses it."""
    whole, profile = manifest.get("recipe_digest"), manifest.get("profile")
    try:
        tree = yaml.safe_load((Path(folder) / "recipe.yaml").read_text())
        recipe = _RECIPE.validate_python(tree)
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: pydantic's ValidationError too
        return Trained(manifest.get("recipe_training_digest"), whole, profile)
    if whole is not None and recorded_digest(recipe, tree) != whole:
        return Trained(None, None, profile)
    return Trained(recipe.training_digest(profile), whole, profile)


def learning_rate(recipe: ImagenetRecipe, profile: Profile, train_examples: int,
                  replicas: int = 1) -> Callable[[int], float]:
    """The rate of the update that starts at step ``step``: the paper's rate x ``train.lr_scaling``'s factor for
    the global batch against the paper's 32, decayed stepwise by rate ** floor(epoch / (every_epochs / speedup))
    (Sec. 4.2.1 change 4). The epoch is this data's (step x batch / examples), or, with ``profile.compression``,
    the paper's at the paper-equivalent step (step / compression), so a compressed budget spans as many decays."""
    t, paper = recipe.train, recipe.profiles["paper"]
    factor = t.lr_factor(profile.batch_size * replicas / paper.batch_size)

    def epoch(step: int) -> float:
        if profile.compression:
            return step / profile.compression * paper.batch_size / paper.train_examples
        return step * profile.batch_size / train_examples

    def at(step: int) -> float:
        return t.lr * factor * t.lr_decay.factor(epoch(step))

    return at


class EnsembleRecipe(RecipeBase):
    """Fig. 4: which trained ImageNet recipes form the ensemble, and the crop schemes to evaluate."""

    experiment: Literal["ensemble"]
    members: list[str] = Field(min_length=1, description="ImageNet recipes; each member is its latest finished run")
    profile: Literal["paper", "proxy", "cpu", "smoke"] = Field(description="the scale the members were trained at")
    crops: list[Literal[1, 10, 144]] = Field(min_length=1, description="crop schemes, each evaluated per member")
    batch_crops: int = Field(gt=0, description="crops per forward pass (memory, not results)")
    val_limit: int | None = Field(None, gt=0, description="evaluate the first this many validation images only "
                                                          "(the CPU campaign: 144 crops each); None: all")


Recipe = Annotated[MnistRecipe | ImagenetRecipe | EnsembleRecipe, Field(discriminator="experiment")]
_RECIPE = TypeAdapter(Recipe)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _prefixes(key: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b"]``: the sections a dotted key lies in."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def available() -> list[str]:
    """Names of every recipe under the recipes folder, e.g. ``mnist/bn``."""
    return sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))


def _path(name: str) -> Path:
    """A recipe file from a path, a full name (``imagenet/bn-x30``) or a unique short name (``bn-x30``)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = RECIPES_DIR / f"{name}.yaml"
    if path.is_file():
        return path
    matches = [full for full in available() if full.rsplit("/", 1)[-1] == name]
    if len(matches) == 1:
        return RECIPES_DIR / f"{matches[0]}.yaml"
    if matches:
        raise UserError(f"recipe name '{name}' is ambiguous: {', '.join(matches)}")
    raise UserError(f"no recipe named '{name}'; `bnrepro recipes list` shows the {len(available())} there are")


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
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"recipe {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        f"save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise UserError(f"cannot read recipe {path} ({err.strerror})") from None
    if not isinstance(tree, dict):
        raise UserError(f"recipe {path} must be a mapping of keys to values")
    parent = tree.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise UserError(f"recipe {path}: extends must name one recipe (e.g. extends: imagenet/bn-x5), not "
                        f"{type(parent).__name__} {parent!r}")
    return _merge(_read(parent, (*chain, name)), tree) if parent else tree


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is read as YAML, so types come out right."""
    key, sep, raw = text.partition("=")
    if not sep or not all(part.strip() for part in key.split(".")):
        raise UserError(f"--set '{text}' must look like dotted.key=value (no empty part in the key), e.g. "
                        f"--set train.lr=0.1")
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


def load(name: str, overrides: list[str] = ()) -> MnistRecipe | ImagenetRecipe | EnsembleRecipe:
    """Resolve ``extends:``, apply ``--set`` overrides, and validate; any problem is one clear line."""
    tree = _read(name)
    for text in overrides:
        _apply(tree, *parse_override(text))
    try:
        return _RECIPE.validate_python(tree)
    except ValidationError as err:
        raise UserError(f"recipe '{name}': {first_error(err)}") from None


def first_error(err: ValidationError) -> str:
    """A validation error in one line: where (a dotted key) and what, and how many more there are."""
    first = err.errors()[0]
    experiments = ("mnist", "imagenet", "ensemble")
    loc = first["loc"][1:] if first["loc"] and first["loc"][0] in experiments else first["loc"]
    where = ".".join(str(part) for part in loc) or "recipe"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def to_yaml(recipe: RecipeBase) -> str:
    tree = recipe.model_dump(mode="json")
    head = {key: tree.pop(key) for key in ("experiment", "label", "description", "paper")}
    notes = {"assumptions": tree.pop("assumptions")}
    return yaml.safe_dump({**head, **tree, **notes}, sort_keys=False, width=100)


def diff(a: RecipeBase, b: RecipeBase) -> list[tuple[str, Any, Any]]:
    """Every dotted key whose value differs between two resolved recipes: (key, value in a, value in b).

    Assumption notes are left out: they explain values, they are not values.
    """
    left, right = (flatten(r.model_dump(mode="json", exclude={"assumptions"})) for r in (a, b))
    missing = object()
    rows = [(key, left.get(key, missing), right.get(key, missing)) for key in sorted(left.keys() | right.keys())]
    return [(k, None if x is missing else x, None if y is missing else y) for k, x, y in rows if x != y]
